"""A lab's history: finished tasks leave etcd for MariaDB, and are paged,
filtered, summed up (usage), migrated and expired from there."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pink import archive, db, journal
from pink.store import Store
from pink.tasks import Params, Task, new_record
from tests import images
from tests.helpers import Api, etcd_record, make_user

T0 = 1_700_000_000.0  # archived rows in these tests were submitted from here on


def _record(task_id: str, user: str, name: str, state: str, submitted: float, gpus: int = 0,
            ran: float = 0.0, output: dict | None = None) -> dict:
    rec = new_record(task_id, user, Params(name=name, gpus=gpus), {"sha256": "0" * 64, "size": 10},
                     "web1").to_json()
    rec.update(state=state, result=state, created_at=submitted, updated_at=submitted + ran + 2,
               gpus=[str(g) for g in range(gpus)], output=output)
    rec["timings"] = {"submitted": submitted, "running": submitted + 1, "exported": submitted + 1 + ran,
                      state: submitted + 2 + ran}
    rec["history"] = [[submitted, "queued", ""], [submitted + 2 + ran, state, ""]]
    return rec


def _archive(config, *records: dict, expires_at: float | None = None) -> None:
    with archive.connection(config.db) as conn:
        for rec in records:
            assert archive.archive_task(conn, Task.from_json(rec), b"log of " + rec["id"].encode(),
                                        expires_at=expires_at)


def _live(store: Store, rec: dict) -> None:
    """A live task as a submit leaves it: its record and its user's index entry."""
    assert store.create(store.keys.task(rec["id"]), rec)
    assert store.create(store.keys.owner(rec["user"], rec["id"]), {"size": 0})


def _sql(config, statement: str, args=()) -> list[dict]:
    conn = db.connect(config.db)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, args)
            rows = cur.fetchall()
        conn.commit()
        return list(rows)
    finally:
        conn.close()


def _pages(api: Api, **params) -> list[list[dict]]:
    pages, cursor = [], None
    while True:
        r = api("GET", "/tasks", params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body["tasks"])
        cursor = body["next"]
        if cursor is None:
            return pages


def test_pages_merge_live_and_archived_tasks_newest_first(web):
    alice = Api(web, make_user(web, "alice"))
    admin = Api(web, make_user(web, "root", admin=True))
    make_user(web, "bob")
    _archive(web, *[_record(f"a{i:04d}", "alice", f"job-{i}", "failed" if i % 2 else "succeeded", T0 + i)
                    for i in range(120)])
    _archive(web, *[_record(f"b{i:04d}", "bob", f"bob-{i}", "succeeded", T0 + i) for i in range(5)])
    store = Store.from_config(web)
    live = _record("z0001", "alice", "live-one", "queued", T0 + 500)
    _live(store, live)
    # A task archived but not yet removed from etcd shows once, as etcd has it.
    _live(store, _record("a0119", "alice", "job-119", "exported", T0 + 119))

    pages = _pages(alice, limit=50)
    assert [len(p) for p in pages] == [50, 50, 21]
    tasks = [t for p in pages for t in p]
    ids = [t["id"] for t in tasks]
    assert len(set(ids)) == 121 and ids[0] == "z0001" and ids[1] == "a0119"
    assert tasks[1]["state"] == "exported"
    assert ids[2:] == [f"a{i:04d}" for i in range(118, -1, -1)]
    assert all(t["user"] == "alice" for t in tasks)

    failed = [t for p in _pages(alice, state="failed", limit=500) for t in p]
    assert len(failed) == 59 and {t["state"] for t in failed} == {"failed"}
    named = [t["name"] for p in _pages(alice, name="job-11") for t in p]
    assert sorted(named) == sorted(["job-11"] + [f"job-11{d}" for d in range(10)])
    window = [t["id"] for p in _pages(alice, since=str(T0 + 10), until="2023-11-14T22:13:40Z") for t in p]
    assert window == [f"a{i:04d}" for i in range(19, 9, -1)]

    for bad in ({"limit": 501}, {"limit": 0}, {"cursor": "not-a-cursor"}, {"state": "sleeping"},
                {"since": "yesterday"}):
        r = alice("GET", "/tasks", params=bad)
        assert r.status_code == 400 and r.json()["error"] == "bad_param", (bad, r.text)
    assert alice("GET", "/tasks", params={"user": "bob"}).status_code == 403
    bobs = [t["id"] for p in _pages(admin, user="bob") for t in p]
    assert bobs == [f"b{i:04d}" for i in range(4, -1, -1)]
    assert alice("GET", "/tasks/b0001").status_code == 404

    newest = alice.cli("status", "--limit", "20")
    assert len(newest.stdout.splitlines()) == 21 and "--all" in newest.stderr
    every = json.loads(alice.cli("status", "--all", "--limit", "50", "--json").stdout)
    assert [t["id"] for t in every] == ids
    failed_json = json.loads(alice.cli("status", "--state", "failed", "--name", "job-11", "--json").stdout)
    assert sorted(t["name"] for t in failed_json) == ["job-11", "job-111", "job-113", "job-115", "job-117"]


def test_the_first_page_reads_an_index_not_the_table(web):
    rows = [_record(f"i{i:05d}", "alice" if i % 3 else "carol", f"n{i}", "succeeded", T0 + i)
            for i in range(3000)]
    _archive(web, *rows)
    conn = db.connect(web.db)
    try:
        with conn.cursor() as cur:
            for query in (archive.Query(user="alice", limit=100), archive.Query(limit=100),
                          archive.Query(state="succeeded", limit=100)):
                cur.execute("ANALYZE TABLE tasks")
                cur.fetchall()
                plan = _explain(cur, query)
                assert plan["key"] in ("by_user_time", "by_time", "by_state_time"), plan
                assert "filesort" not in (plan.get("Extra") or ""), plan
    finally:
        conn.close()


def _explain(cur, query: archive.Query) -> dict:
    """The plan MariaDB picks for `archive.page`'s statement."""
    statement, args = archive.page_statement(query)
    cur.execute("EXPLAIN " + statement, args)
    return cur.fetchone()


def test_usage_sums_the_archive_per_user(web):
    alice = Api(web, make_user(web, "alice"))
    admin = Api(web, make_user(web, "root", admin=True))
    make_user(web, "bob")
    _archive(web, _record("u1", "alice", "a", "succeeded", T0, gpus=2, ran=3600),
             _record("u2", "alice", "b", "failed", T0 + 10, gpus=1, ran=1800),
             _record("u3", "bob", "c", "cancelled", T0 + 20, gpus=4, ran=900),
             _record("u4", "bob", "d", "succeeded", T0 + 10 * 86400, gpus=4, ran=3600))
    mine = alice("GET", "/usage").json()["usage"]
    assert mine == [{"user": "alice", "tasks": 2, "succeeded": 1, "failed": 1, "timed_out": 0,
                     "cancelled": 0, "gpu_hours": 2.5, "wall_hours": 1.5, "measured_tasks": 0,
                     "gpu_hours_measured": None, "gpu_hours_used": None, "gpu_hours_idle": None}]
    assert alice("GET", "/usage", params={"user": "bob"}).status_code == 403
    everyone = {r["user"]: r for r in admin("GET", "/usage", params={"until": T0 + 86400}).json()["usage"]}
    assert everyone["bob"]["tasks"] == 1 and everyone["bob"]["gpu_hours"] == 1.0
    assert everyone["alice"]["tasks"] == 2
    shown = json.loads(admin.cli("usage", "--since", "2023-11-20", "--json").stdout)
    assert [(r["user"], r["tasks"], r["gpu_hours"]) for r in shown] == [("bob", 1, 4.0)]
    assert "GPU-HOURS" in alice.cli("usage").stdout


def test_a_database_of_the_first_schema_is_migrated_in_place(pink_config, tmp_path):
    conn = db.connect(pink_config.db)
    try:
        with conn.cursor() as cur:
            for statement in db.SCHEMA_V1:
                cur.execute(statement)
            old = _record("m1", "alice", "old", "succeeded", T0, gpus=2,
                          output={"stored": True, "host": "web7", "path": "/srv/out/m1.tar.zst", "size": 5})
            cur.execute("INSERT INTO tasks (id, user_name, name, state, attempt, image_sha256, image_size, "
                        "gpus, submitted_at, finished_at, record) VALUES "
                        "(%s,%s,%s,%s,1,%s,10,%s,%s,%s,%s)",
                        ("m1", "alice", "old", "succeeded", "0" * 64, json.dumps(old["gpus"]), T0, T0 + 5,
                         json.dumps(old)))
            cur.execute("INSERT INTO task_logs (task_id, logs) VALUES ('m1', 'a log of one piece')")
        conn.commit()
        assert db.schema_version(conn) == 1
    finally:
        conn.close()
    out = Api(pink_config, "unused").cli("admin", "migrate", "--config", pink_config.path).stdout
    assert f"schema version {db.VERSION} (upgraded from 1)" in out
    row = _sql(pink_config, "SELECT gpu_count, output_host, output_path, expires_at FROM tasks WHERE id='m1'")
    assert row == [{"gpu_count": 2, "output_host": "web7", "output_path": "/srv/out/m1.tar.zst",
                    "expires_at": None}]
    assert _sql(pink_config, "SELECT version FROM schema_version") == [{"version": db.VERSION}]
    again = Api(pink_config, "unused").cli("admin", "migrate", "--config", pink_config.path).stdout
    assert "already current" in again
    with archive.connection(pink_config.db) as conn:
        assert [t.id for t in archive.page(conn, archive.Query(user="alice"))] == ["m1"]
        assert archive.get_logs(conn, "m1") == b"a log of one piece"  # an older log is its piece 0
        assert [t.id for t in archive.single_copies(conn, "web7", "", 10).tasks] == ["m1"]  # one holder: copied later


def test_a_user_over_the_output_cap_loses_the_oldest_first(pink_config):
    out = {"stored": True, "host": "web1", "path": "/x", "size": 100}
    _archive(pink_config, *[_record(f"q{i}", "alice", "q", "succeeded", T0 + i * 100, output=out)
                            for i in range(3)], _record("r0", "bob", "r", "succeeded", T0, output=out))
    with archive.connection(pink_config.db) as conn:
        assert archive.expire(conn, T0, max_bytes_per_user=150) == 2
        assert archive.expire(conn, T0, max_bytes_per_user=150) == 0
    expired = _sql(pink_config, "SELECT id FROM tasks WHERE expired_at IS NOT NULL ORDER BY id")
    assert [r["id"] for r in expired] == ["q0", "q1"]
    assert _sql(pink_config, "SELECT task_id FROM task_logs WHERE task_id IN ('q0','q1')") == []


# -- end to end: with a runner ----------------------------------------------------------

@pytest.fixture
def lab(pink_processes, pink_config, config_variant):
    """Web, worker, leader and runner, with a retention sweep every second and logs
    archived up to 1 MiB; the runner runs one container at a time."""
    path = config_variant("history", retention={"sweep_interval": 1, "max_log_bytes": 2**20},
                          runner={"max_containers": 1})
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader, pink_processes.runner):
        start(config_path=path)
    return Api(pink_config, make_user(pink_config, "alice"))


def test_a_finished_task_leaves_etcd_and_is_served_from_the_archive(lab, writer_archive, tmp_path):
    task_id = lab.submit(writer_archive, name="to-archive").json()["task"]["id"]
    task = lab.wait(task_id)
    assert task["state"] == "succeeded" and task["expires_at"]
    store = Store.from_config(lab.config)
    deadline = time.monotonic() + 20
    while etcd_record(store, task_id) is not None:
        assert time.monotonic() < deadline, "the archived task stayed in etcd"
        time.sleep(0.2)
    assert [t["id"] for t in lab("GET", "/tasks").json()["tasks"]] == [task_id]
    shown = lab.cli("status", task_id).stdout
    assert "succeeded" in shown and "expires:" in shown
    assert task_id in lab.cli("status", "--state", "succeeded").stdout
    assert "done" in lab.cli("logs", task_id).stdout
    saved = lab.cli("download", task_id, "-o", str(tmp_path / "out.tar.zst")).stdout.strip()
    assert os.path.getsize(saved) == task["output"]["size"]
    output_path = _sql(lab.config, "SELECT output_path FROM tasks WHERE id=%s", (task_id,))[0]["output_path"]
    assert os.path.exists(output_path)

    assert lab("DELETE", f"/tasks/{task_id}").json() == {"deleted": task_id}
    assert lab("GET", f"/tasks/{task_id}").status_code == 404
    assert not os.path.exists(output_path)


def test_expired_outputs_answer_410_and_the_sweep_removes_orphans(lab, writer_archive):
    c = lab.config
    task_id = lab.submit(writer_archive).json()["task"]["id"]
    assert lab.wait(task_id)["state"] == "succeeded"
    path = _sql(c, "SELECT output_path FROM tasks WHERE id=%s", (task_id,))[0]["output_path"]
    old = time.time() - 2 * 3600
    planted = {name: os.path.join(directory, name) for directory, name in (
        (c.web.output_dir, "lost.tar.zst"), (c.web.spool_dir, "0123456789ab.tar"),
        (c.web.spool_dir, ".0123456789ab.part"), (c.web.output_dir, "fresh.tar.zst"))}
    for name, p in planted.items():
        with open(p, "wb") as fh:
            fh.write(b"x")
        if name == "lost.tar.zst":  # no row: kept while a restore could bring one back
            os.utime(p, (old - journal.KEEP_DAYS * 86400, old - journal.KEEP_DAYS * 86400))
        elif name != "fresh.tar.zst":
            os.utime(p, (old, old))
    _sql(c, "UPDATE tasks SET expires_at=%s WHERE id=%s", (time.time() - 1, task_id))

    deadline = time.monotonic() + 30
    while os.path.exists(path) or os.path.exists(planted["lost.tar.zst"]):
        assert time.monotonic() < deadline, "the sweep did not remove the expired output"
        time.sleep(0.3)
    r = lab("GET", f"/tasks/{task_id}/output")
    assert r.status_code == 410 and r.json()["error"] == "expired", r.text
    assert lab("GET", f"/tasks/{task_id}/logs").status_code == 410
    task = lab.task(task_id)
    assert task["expired_at"] and task["output"] is None
    assert "expired:" in lab.cli("status", task_id).stdout
    assert [os.path.exists(p) for p in planted.values()] == [False, False, False, True]


def test_a_log_over_the_limit_is_archived_truncated(lab, docker_client, tmp_path):
    """A log is archived up to `max_log_bytes` (its end), however big it was:
    before, a log over max_allowed_packet (16 MiB) never archived, and the
    runner cut a chatty log 10 s after the container exited."""
    noisy = images.build_archive(
        docker_client, "pink/test-noisy:1",
        'CMD ["sh", "-c", "yes 0123456789abcdef | head -c 17000000; echo THE-END"]\n', tmp_path / "noisy.tar")
    task_id = lab.submit(noisy).json()["task"]["id"]
    task = lab.wait(task_id, timeout=180)
    assert task["state"] == "succeeded", task
    assert task["logs_truncated"] == 17_000_008 - 2**20
    logs = lab("GET", f"/tasks/{task_id}/logs").content
    assert logs.startswith(b"[pink: the log was 17000008 bytes; only its last 1048576 are kept]\n")
    assert logs.endswith(b"THE-END\n") and len(logs) < 2**20 + 100


def test_a_cancel_survives_the_loss_of_its_runner(lab, pink_processes, writer_archive):
    task_id = lab.submit(writer_archive, cmd="sleep 60").json()["task"]["id"]
    lab.wait(task_id, states={"running"})
    pink_processes.kill(_runner(pink_processes))
    assert lab("DELETE", f"/tasks/{task_id}").status_code == 202
    task = lab.wait(task_id, timeout=60)
    assert task["state"] == "cancelled" and task["attempt"] == 1, task


def test_a_database_outage_holds_exports_without_starving_new_tasks(lab, pink_processes, cluster,
                                                                   writer_archive):
    """One container at a time: the second and third tasks are transferred and
    run while the first waits in `exported` for the database."""
    store = Store.from_config(lab.config)
    ids = [lab.submit(writer_archive, cmd=f"sh -c 'sleep 2; echo task {n}'").json()["task"]["id"]
           for n in range(3)]
    cluster.stop("mariadb")
    try:
        for task_id in ids:
            _reach(store, task_id, "exported")
        # The runner restarts (a new epoch) while its exports wait: they are not lost.
        pink_processes.kill(_runner(pink_processes))
        pink_processes.runner(config_path=_variant(lab))
        time.sleep(3)
        assert {etcd_record(store, t)["state"] for t in ids} == {"exported"}
    finally:
        cluster.start_mariadb()
    for n, task_id in enumerate(ids):
        task = lab.wait(task_id, timeout=120)
        assert task["state"] == "succeeded" and task["attempt"] == 1 and task["output"], task
        assert lab("GET", f"/tasks/{task_id}/logs").text == f"task {n}\n"
    assert lab("GET", f"/tasks/{ids[0]}/output").status_code == 200


def test_deleting_an_exported_task_archives_it_as_deleted(lab, pink_processes, writer_archive):
    store = Store.from_config(lab.config)
    task_id = lab.submit(writer_archive, cmd="sh -c 'sleep 2; echo bye'").json()["task"]["id"]
    lab.wait(task_id, states={"running"})
    worker = next(n for n in pink_processes.started if "worker" in n)
    pink_processes.stop(worker)  # nobody finalizes: the task stays `exported`
    _reach(store, task_id, "exported")
    r = lab("DELETE", f"/tasks/{task_id}")
    assert r.status_code == 202 and etcd_record(store, task_id)["delete_requested"], r.text
    pink_processes.worker(n=2, config_path=_variant(lab))
    deadline = time.monotonic() + 60
    while lab("GET", f"/tasks/{task_id}").status_code != 404:
        assert time.monotonic() < deadline, "the deleted task was never archived as deleted"
        time.sleep(0.3)
    assert etcd_record(store, task_id) is None
    assert [n for n in os.listdir(lab.config.web.output_dir) if n != journal.DIRNAME] == []
    entry = next(Path(journal.directory(lab.config.web.output_dir)).glob(f"*/{task_id}-1*"))
    header, logs = journal.read_entry(str(entry))
    assert header["deleted"] and logs == b""  # a deleted task's log is not kept for a restore


def _reach(store, task_id: str, state: str) -> dict:
    deadline = time.monotonic() + 60
    while (rec := etcd_record(store, task_id)) is None or rec["state"] != state:
        assert time.monotonic() < deadline, f"task {task_id} never reached {state}: {rec}"
        time.sleep(0.2)
    return rec


def _runner(pink_processes) -> str:
    return next(n for n in pink_processes.started if "runner" in n)


def _variant(lab) -> str:
    return str(Path(lab.config.path).with_name("history.toml"))


def test_an_unsatisfiable_request_is_refused_once_runners_are_known(pink_processes, pink_config,
                                                                    writer_archive):
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader):
        start()
    api = Api(pink_config, make_user(pink_config, "alice"))
    waiting = api.submit(writer_archive, gpus=64)
    assert waiting.status_code == 201, waiting.text  # no runner registered yet: it waits
    task_id = waiting.json()["task"]["id"]
    deadline = time.monotonic() + 20
    while (task := api.task(task_id))["position"] != 1:
        assert time.monotonic() < deadline, f"the leader never published a position: {task}"
        time.sleep(0.2)
    assert task["waiting"] == "no runner is registered"
    pink_processes.runner()
    store = Store.from_config(pink_config)
    while not store.list(store.keys.nodes):
        assert time.monotonic() < deadline + 20
        time.sleep(0.2)
    refused = api.submit(writer_archive, gpus=64)
    assert refused.status_code == 400 and refused.json()["error"] == "unsatisfiable"
    assert refused.json()["message"] == "no runner has 64 GPUs; the largest has 0"
    assert os.listdir(pink_config.web.spool_dir) == []  # nothing left of the refused one


def _gone_from_etcd(store, *task_ids: str) -> None:
    deadline = time.monotonic() + 20
    while any(etcd_record(store, t) is not None for t in task_ids):
        assert time.monotonic() < deadline, "the task stayed in etcd"
        time.sleep(0.2)


def test_a_finalize_that_crashed_after_archiving_does_not_archive_twice(control_plane):
    """The archive row was committed, then the finalize died before removing
    the etcd record: the next finalize removes it and writes nothing."""
    api = control_plane
    store = Store.from_config(api.config)
    now = time.time()
    done = _record("c0001", "alice", "crashed", "succeeded", now)
    _archive(api.config, done)
    exported_rec = {**_record("c0001", "alice", "crashed", "exported", now), "result": "succeeded",
                    "export": None, "error": "a different ending"}
    store.create(store.keys.task("c0001"), exported_rec)
    _gone_from_etcd(store, "c0001")
    assert api("GET", "/tasks/c0001/logs").content == b"log of c0001"
    assert api.task("c0001")["error"] is None  # the first archive stands
    assert _sql(api.config, "SELECT COUNT(*) AS n FROM task_events WHERE task_id='c0001'") == [{"n": 2}]
