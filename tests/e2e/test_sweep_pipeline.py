"""Sweeps end to end on real services: a grid runs with each index's env, the
concurrency cap holds, a lost index is retried alone, cancel and download all,
and another user sees nothing."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time

import pytest

from pink import control, idempotency, sweep_records, sweeps
from pink.compat import fromisoformat
from pink.errors import Conflict, Unavailable
from pink.store import Store
from pink.tasks import Params, new_record
from tests import images
from tests.helpers import FINAL, Api, files_in_output, make_user, wait_requeued

ENV_CMD = "sh -c 'echo $LR-$BS-$PINK_SWEEP_INDEX > /result.txt'"
# Ends at once on SIGTERM (PID 1 ignores signals it has no handler for).
SLEEPER = "sh -c \"trap 'exit 0' TERM; echo start; while true; do sleep 0.2; done\""


def submit_sweep(api: Api, archive, spec: dict, **params) -> dict:
    r = api.submit(archive, sweep=json.dumps(spec), **params)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["task"]["sweep"]["id"] == body["sweep"]["id"] and body["task"]["sweep"]["index"] == 0
    return body["sweep"]


def sweep_of(api: Api, sweep_id: str, **params) -> dict:
    r = api("GET", f"/sweeps/{sweep_id}", params=params)
    assert r.status_code == 200, r.text
    return r.json()["sweep"]


def wait_sweep(api: Api, sweep_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        sweep = sweep_of(api, sweep_id)
        if sum(sweep["counts"].values()) == sweep["size"] and set(sweep["counts"]) <= FINAL:
            return sweep
        assert time.monotonic() < deadline, f"sweep stuck: {sweep['counts']}"
        time.sleep(0.3)


def test_a_grid_runs_each_index_with_its_env_and_downloads_as_one_tar(api, docker_client, tmp_path):
    archive = images.fresh_archive(docker_client, "sweep", tmp_path / "sweep.tar", images.WRITER)
    made = submit_sweep(api, archive, {"grid": {"LR": ["1e-3", "1e-4"], "BS": ["32", "64"]}},
                        cmd=ENV_CMD, output="/result.txt", env="KEEP=1")
    assert made["size"] == 4 and len(made["tasks"]) == 4
    sweep = wait_sweep(api, made["id"])
    assert sweep["counts"] == {"succeeded": 4}
    assert [i["index"] for i in sweep["indexes"]] == [0, 1, 2, 3]
    expected = ["1e-3-32-0", "1e-3-64-1", "1e-4-32-2", "1e-4-64-3"]
    for index, want in zip(sweep["indexes"], expected):
        assert index["env"]["KEEP"] == "1" and index["exit_code"] == 0
        task = api.task(index["task"])
        assert task["sweep"]["id"] == made["id"] and task["params"]["env"] == index["env"]
        output = api("GET", f"/tasks/{index['task']}/output").content
        assert files_in_output(output) == {"result.txt": f"{want}\n".encode()}
    # The image crossed each hop once for all four indexes: to the web node, then to the runner.
    timings = [api.task(i["task"])["timings"] for i in sweep["indexes"]]
    assert timings[0]["upload_bytes"] > 0 and [t["upload_bytes"] for t in timings[1:]] == [0, 0, 0]
    sent = [t.get("transfer_bytes") or 0 for t in timings]
    # The first placed sent the layers; the rest reused them. Transfers that start
    # together may each send a small blob (the image config) the other is sending
    # too: a known duplication, bounded here, never a layer.
    assert max(sent) > 0 and sum(sent) - max(sent) < 64 * 1024, sent
    # Every output in one tar, a member per index.
    r = api("GET", f"/sweeps/{made['id']}/outputs")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        members = tar.getmembers()
        assert [m.name.split("-")[0] for m in members] == ["0000", "0001", "0002", "0003"]
        got = [files_in_output(tar.extractfile(m).read())["result.txt"] for m in members]
    assert got == [f"{want}\n".encode() for want in expected]
    # A page of indexes.
    page = sweep_of(api, made["id"], offset=1, limit=2)
    assert [i["index"] for i in page["indexes"]] == [1, 2] and page["counts"] == {"succeeded": 4}
    # An output no node holds any more is left out and named, never zero-filled silently.
    lost = sweep["indexes"][1]["task"]
    (held,) = [p for p in os.listdir(api.config.web.output_dir) if p.startswith(f"{lost}-")]
    os.remove(os.path.join(api.config.web.output_dir, held))
    r = api("GET", f"/sweeps/{made['id']}/outputs")
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = [m.name for m in tar.getmembers()]
        assert [n.split("-")[0] for n in names] == ["0000", "0002", "0003", "ERRORS.txt"]
        errors = tar.extractfile("ERRORS.txt").read().decode()
    assert f"index 1 (task {lost}): output left out" in errors


def test_another_user_sees_no_sweep_and_a_bad_spec_creates_nothing(api, writer_archive):
    made = submit_sweep(api, writer_archive, {"items": [{"env": {"A": "1"}}, {"cmd": "true"}]})
    bob = Api(api.config, make_user(api.config, "bob"))
    for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/outputs")):
        r = bob(method, f"/sweeps/{made['id']}{path}")
        assert r.status_code == 404 and r.json()["error"] == "unknown_sweep", r.text
    assert bob("GET", f"/tasks/{made['tasks'][0]}").status_code == 404
    wait_sweep(api, made["id"])
    before = len(api("GET", "/tasks").json()["tasks"])
    r = api.submit(writer_archive, sweep='{"grid": {"LR": []}}')
    assert r.status_code == 400 and r.json()["error"] == "bad_sweep"
    assert "non-empty list" in r.json()["message"]
    assert len(api("GET", "/tasks").json()["tasks"]) == before
    assert api("GET", "/sweeps/snone").status_code == 404
    admin = Api(api.config, make_user(api.config, "root", admin=True))
    scraped = admin.http.get(admin.url + "/metrics", verify=admin.ca, timeout=60).text
    assert "pink_sweeps_submitted_total 1.0" in scraped and "pink_sweep_indexes_submitted_total 2.0" in scraped
    assert "pink_sweeps_cancelled_total 0.0" in scraped  # bob's refused cancel counted nothing
    deadline = time.monotonic() + 60  # the sweep is done once exported; archived a little later
    while "pink_sweeps_live 0.0" not in scraped:
        assert time.monotonic() < deadline, scraped
        time.sleep(0.3)
        scraped = admin.http.get(admin.url + "/metrics", verify=admin.ca, timeout=60).text


def _overlap(indexes: list[dict]) -> int:
    """The most indexes running at once, from their timings (running to exited)."""
    points = []
    for index in indexes:
        t = index["timings"]
        points += [(fromisoformat(t["running"]).timestamp(), 1), (fromisoformat(t["exited"]).timestamp(), -1)]
    most = now = 0
    for _, step in sorted(points, key=lambda p: (p[0], p[1])):
        now += step
        most = max(most, now)
    return most


def test_the_cap_holds_and_waiting_indexes_say_why(api, slow_archive):
    made = submit_sweep(api, slow_archive, {"grid": {"N": ["1", "2", "3", "4"]}, "max_parallel": 2})
    reasons = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not reasons:
        for task_id in made["tasks"][2:]:
            task = api.task(task_id)
            if task["state"] == "queued" and (task.get("waiting") or "").startswith("sweep limit"):
                reasons.add(task["waiting"])
        time.sleep(0.2)
    assert reasons == {"sweep limit: 2 of 2 running"}
    sweep = wait_sweep(api, made["id"])
    assert sweep["counts"] == {"succeeded": 4}
    assert _overlap([api.task(i) for i in made["tasks"]]) <= 2


def test_a_lost_index_is_retried_alone(control_plane, pink_processes, slow_archive):
    runner = pink_processes.runner()
    made = submit_sweep(control_plane, slow_archive, {"grid": {"N": ["0", "1", "2"]}, "max_parallel": 1})
    first = made["tasks"][0]
    control_plane.wait(first, states={"running"})
    pink_processes.kill(runner)
    wait_requeued(Store.from_config(control_plane.config), first)
    # Let attempt 1's container (4 s) end first: a runner restarted beside it has been
    # seen to SIGKILL the next attempt as it cleaned up (a runner matter, not a sweep's).
    time.sleep(5)
    pink_processes.runner()
    sweep = wait_sweep(control_plane, made["id"])
    assert sweep["counts"] == {"succeeded": 3}, sweep["indexes"]
    assert [i["attempt"] for i in sweep["indexes"]] == [2, 1, 1]


def test_cancel_all_ends_every_live_index(api, writer_archive):
    made = submit_sweep(api, writer_archive, {"grid": {"N": ["0", "1", "2"]}, "max_parallel": 1}, cmd=SLEEPER)
    api.wait(made["tasks"][0], states={"running"})
    r = api("POST", f"/sweeps/{made['id']}/cancel")
    assert r.status_code == 202 and set(r.json()["cancelled"]) == set(made["tasks"])
    assert wait_sweep(api, made["id"])["counts"] == {"cancelled": 3}


def test_the_cli_submits_a_grid_waits_shows_and_downloads(api, writer_archive, tmp_path):
    proc = api.cli("submit", str(writer_archive), "--sweep", "LR=1e-3,1e-4", "--sweep", "BS=32,64",
                   "--max-parallel", "2", "--cmd", ENV_CMD, "--output", "/result.txt", "--wait")
    sweep_id = proc.stdout.split()[0]
    assert sweep_id.startswith("s") and "4 succeeded" in proc.stderr
    shown = api.cli("sweep", sweep_id).stdout
    assert "4 indexes, at most 2 at once" in shown and shown.count("succeeded") == 5  # the counts, 4 rows
    assert "BS=64 LR=1e-4" in shown  # env as the record keeps it (sorted)
    api.cli("sweep", "download", sweep_id, "-o", str(tmp_path / "out"))
    with tarfile.open(tmp_path / "out" / f"sweep-{sweep_id}.tar") as tar:
        assert len(tar.getmembers()) == 4
    assert "cancelling 0 indexes" in api.cli("sweep", "cancel", sweep_id).stderr


def test_every_index_counts_in_the_live_task_limit(pink_processes, pink_config, config_variant, writer_archive):
    pink_processes.web(config_path=config_variant("limited", limits={"live_tasks_per_user": 3}))
    api = Api(pink_config, make_user(pink_config, "alice"))
    r = api.submit(writer_archive, sweep=json.dumps({"grid": {"A": ["1", "2", "3", "4"]}}))
    assert r.status_code == 429 and "this submit adds 4" in r.json()["message"], r.text
    assert api("GET", "/tasks").json()["tasks"] == []  # nothing of it was made
    assert api.submit(writer_archive, sweep=json.dumps({"grid": {"A": ["1", "2", "3"]}})).status_code == 201


def test_a_sweep_larger_than_one_transaction_is_made_and_cancelled_whole(control_plane, writer_archive):
    """45 indexes take two etcd transactions; with no runner they all wait, then all cancel."""
    made = submit_sweep(control_plane, writer_archive, {"items": [{"env": {"I": str(i)}} for i in range(45)]})
    sweep = sweep_of(control_plane, made["id"], limit=1000)
    assert sweep["counts"] == {"queued": 45} and [i["env"]["I"] for i in sweep["indexes"]] == \
        [str(i) for i in range(45)]
    r = control_plane("POST", f"/sweeps/{made['id']}/cancel")
    assert r.status_code == 202 and len(r.json()["cancelled"]) == 45
    assert wait_sweep(control_plane, made["id"])["counts"] == {"cancelled": 45}


class _SubmitBetweenChunks(Store):
    """A real store where another submit of the same user lands after the sweep's first chunk."""

    def __init__(self, *args, config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config, self.chunks = config, 0

    def create_sweep_tasks(self, tasks, gate, after=None, idempotency=None):
        done = super().create_sweep_tasks(tasks, gate, after, idempotency)
        self.chunks += 1
        if self.chunks == 1:
            other = new_record("other", tasks[0].user, Params(), {"sha256": "b" * 64, "size": 10}, "web1")
            assert control.create(self, self.config, other, None) == (other.id, True)
        return done


class _FirstChunkTimesOut(Store):
    """A real store whose first sweep chunk is applied, then answered with an error (an etcd timeout)."""

    def create_sweep_tasks(self, tasks, gate, after=None, idempotency=None):
        super().create_sweep_tasks(tasks, gate, after, idempotency)
        raise Unavailable("etcd timed out")


def _sweep_records(user: str, size: int) -> list:
    template = new_record("t", user, Params(), {"sha256": "a" * 64, "size": 100}, "web1")
    spec = sweeps.Spec(indexes=tuple(sweeps.Index(env={"I": str(i)}) for i in range(size)))
    return sweep_records.expand(template, spec, sweeps.new_id())


def _left(store: Store, user: str) -> list[str]:
    return sorted(r.value.id for r in store.list(store.keys.tasks, 1000) if r.value.user == user)


def test_a_submit_between_two_chunks_fails_the_sweep_and_nothing_of_it_stays(pink_config):
    store = _SubmitBetweenChunks.from_config(pink_config)
    store.config = pink_config
    records = _sweep_records("carol", 5)
    claim = idempotency.Claim(key="k1", fingerprint="f")
    with pytest.raises(Conflict, match="nothing of the sweep was kept"):
        sweep_records.create(store, pink_config, records, claim, chunk=2)
    assert store.chunks == 2  # the second chunk saw the gate changed
    left = _left(store, "carol")
    assert len(left) == 1 and left[0] not in {r.id for r in records}  # only the other submit's task
    assert store.get(store.keys.idempotency("carol", claim.digest)) is None
    assert store.list(store.keys.sweep(sweeps.of(records[0])["id"]), 1000) == []


def test_a_first_chunk_that_errors_is_taken_back(pink_config):
    store = _FirstChunkTimesOut.from_config(pink_config)
    records = _sweep_records("dave", 3)
    claim = idempotency.Claim(key="k2", fingerprint="f")
    with pytest.raises(Unavailable):
        sweep_records.create(store, pink_config, records, claim, chunk=2)
    assert _left(store, "dave") == []
    assert store.get(store.keys.idempotency("dave", claim.digest)) is None
