"""Big logs, big outputs, full disks and single copies: a task that writes
too much ends, with a reason, and takes nothing from other users' work; an
output kept once gets its second copy when a second web node comes up."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from devcluster.ports import free_port
from pink import archive, outputs, redisconn, sftp
from pink import config as pink_config_module
from pink.config import LimitsConfig, RetentionConfig
from pink.store import Store
from pink.tasks import Params, State, new_record
from tests import images
from tests.helpers import Api, make_user

MIB = 2**20
ROOT = Path(__file__).resolve().parents[2]


def _lab(pink_processes, pink_config, path: str) -> Api:
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader, pink_processes.runner):
        start(config_path=path)
    return Api(pink_config, make_user(pink_config, "alice"))


def _writing(docker_client, tmp_path, tag: str, script: str) -> str:
    """An image whose command runs `script` with sh."""
    return images.build_archive(docker_client, tag, f'CMD ["sh", "-c", "{script}"]\n', tmp_path / "image.tar")


# -- (a) a log of the shipped cap ----------------------------------------------------

def test_a_log_over_the_shipped_cap_is_archived_whatever_the_packet_limit(api, docker_client, tmp_path):
    """A chatty task cannot wedge in `exported`: a 12 MiB log ends `succeeded`
    with its last 8 MiB (the shipped `max_log_bytes`) archived and readable,
    on a MariaDB whose max_allowed_packet is no larger than 10.11's default
    (16 MiB, which one INSERT of 8 MiB sent as hex overflows)."""
    assert api.config.retention.max_log_bytes == RetentionConfig.max_log_bytes == 8 * MIB
    with archive.connection(api.config.db) as conn, conn.cursor() as cur:
        cur.execute("SELECT @@global.max_allowed_packet AS packet")
        assert cur.fetchone()["packet"] <= 16 * MIB
    total = 12 * MIB
    noisy = _writing(docker_client, tmp_path, "pink/test-chatty:1",
                     f"yes 0123456789abcdef | head -c {total}; echo THE-END")
    task = api.wait(api.submit(noisy).json()["task"]["id"], timeout=240)
    assert task["state"] == "succeeded", task
    assert task["logs_truncated"] == total + 8 - 8 * MIB
    logs = api("GET", f"/tasks/{task['id']}/logs").content
    notice = f"[pink: the log was {total + 8} bytes; only its last {8 * MIB} are kept]\n".encode()
    assert logs.startswith(notice) and logs.endswith(b"THE-END\n") and len(logs) == len(notice) + 8 * MIB
    assert b"0123456789abcdef\n" * 4 in logs[len(notice):len(notice) + 200]


def test_a_finalize_that_can_never_succeed_ends_its_task(pink_processes, pink_config, config_variant):
    """A task cannot wait in `exported` for ever: a finalize failing for a
    reason retrying cannot change (here a record whose export names no
    runner) is given up after `max_job_failures` tries (shrunk to 2 here for
    speed; transfer and run use the same setting, shipped as 8), and the task
    is archived failed with the reason. (A database or runner that is away
    is waited for: that raises Unavailable, which is never given up on.)"""
    path = config_variant("giveup", max_job_failures=2)
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader):
        start(config_path=path)
    api = Api(pink_config, make_user(pink_config, "alice"))
    record = new_record("f1na1e000001", "alice", Params(name="stuck"), {"sha256": "0" * 64, "size": 10},
                        "web1").to_json()
    record.update(state="exported", result="succeeded", export={"path": "/x.tar.zst", "size": 1, "log": "/x.log"})
    store = Store.from_config(api.config)
    assert store.create(store.keys.task(record["id"]), record)
    task = api.wait(record["id"], timeout=60)
    assert task["state"] == "failed" and task["error"].startswith("finalize failed 2 times; last: KeyError"), task
    assert (task["failure"]["cause"], task["failure"]["class"]) == ("finalize_failed", "infrastructure")


# -- (b) an export over the cap ------------------------------------------------------------

def test_the_output_cap_is_shipped_and_documented():
    """Every user's export is capped out of the box: `output_bytes_per_task`
    has a default (100 GiB), and the docs name it."""
    assert LimitsConfig().output_bytes_per_task == LimitsConfig.output_bytes_per_task == 100 * 2**30
    assert RetentionConfig().max_log_bytes == 8 * MIB
    assert "output_bytes_per_task" in (ROOT / "docs" / "security.md").read_text()


def test_an_export_over_the_cap_fails_its_task_naming_the_limit(pink_processes, pink_config, config_variant,
                                                                docker_client, tmp_path):
    """A task cannot write an export past `limits.output_bytes_per_task` (shrunk
    here to 1 MiB; the shipped default is checked above): the runner stops
    the export and the task fails with the limit's name; another task goes on."""
    path = config_variant("capped", limits={"output_bytes_per_task": MIB})
    lab = _lab(pink_processes, pink_config, path)
    big = _writing(docker_client, tmp_path, "pink/test-bigout:1", "head -c 3000000 /dev/urandom > /big")
    task = lab.wait(lab.submit(big).json()["task"]["id"], timeout=180)
    assert task["state"] == "failed", task
    assert "output_bytes_per_task" in task["error"] and str(MIB) in task["error"], task
    assert (task["failure"]["cause"], task["attempt"]) == ("output_too_big", 1), task  # its own: not again
    assert task["output"] is None
    small = lab.wait(lab.submit(big, cmd="sh -c 'echo small > /small'", output="/small").json()["task"]["id"])
    assert small["state"] == "succeeded", small


def test_finalize_counts_an_exports_bytes_and_never_leaves_a_part(pink_config, tmp_path):
    """A runner cannot get more than the cap onto a web node by claiming a small
    size: the fetch counts bytes as they arrive and stops past the cap; a
    fetch cut off (by the cap or a full disk) leaves no `.part` behind."""
    r = pink_config.runner
    node = {"name": r.name, "ssh_host": r.ssh_host, "ssh_port": r.ssh_port, "ssh_user": r.ssh_user}
    data = os.urandom(3 * MIB)
    Path(r.outbox_dir, "f0000000cafe-1.tar.zst").write_bytes(data)
    remote = f"{r.ssh_outbox}/f0000000cafe-1.tar.zst"
    store = tmp_path / "store"
    store.mkdir()
    local = str(store / "f0000000cafe-1.tar.zst")
    with sftp.session(pink_config.ssh, node) as conn:
        with pytest.raises(outputs.Refused, match=r"limits.output_bytes_per_task \(1048576 bytes\)"):
            outputs.fetch(conn, remote, local, MIB)
        assert list(store.iterdir()) == []
        with _small_filesystem(tmp_path / "tiny", 2) as tiny:
            with pytest.raises(outputs.NoRoom, match="No space left"):
                outputs.fetch(conn, remote, str(tiny / "f0000000cafe-1.tar.zst"), 100 * MIB)
            assert list(tiny.iterdir()) == []
        assert outputs.fetch(conn, remote, local, 100 * MIB) == (len(data), hashlib.sha256(data).hexdigest())


# -- (c) a full output disk ---------------------------------------------------------------

@contextlib.contextmanager
def _small_filesystem(where: Path, size_mib: int):
    """A tmpfs of `size_mib` at `where` (root may mount here), unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_output_disk_fails_a_finalize_cleanly(pink_processes, pink_config, config_variant,
                                                      docker_client, tmp_path):
    """A task cannot fill a web node's output disk for everyone: with too little
    room, finalize fails that try without writing (no `.part` is left) and
    other tasks finish; the task finishes once there is room; an output bigger
    than the whole disk fails its task with the reason instead of waiting."""
    with _small_filesystem(tmp_path / "outputs", 32) as out:
        path = config_variant("fulldisk", web={"spool_dir": pink_config.web.spool_dir, "output_dir": str(out)})
        lab = _lab(pink_processes, pink_config, path)
        ballast = out / "ballast"
        ballast.write_bytes(b"\0" * (27 * MIB))
        image = _writing(docker_client, tmp_path, "pink/test-fill:1", "head -c 5000000 /dev/urandom > /big")
        waiting = lab.submit(image).json()["task"]["id"]
        store = Store.from_config(lab.config)
        _finalize_failed(store, waiting)
        small = lab.wait(lab.submit(image, cmd="sh -c 'echo small > /small'", output="/small")
                         .json()["task"]["id"], timeout=120)
        assert small["state"] == "succeeded", small
        assert lab.task(waiting)["state"] == "exported"
        assert [p.name for p in out.iterdir() if p.name.endswith(".part")] == []

        ballast.unlink()
        assert lab.wait(waiting, timeout=120)["state"] == "succeeded"

        huge = lab.submit(image, cmd="sh -c 'head -c 40000000 /dev/urandom > /big'").json()["task"]["id"]
        task = lab.wait(huge, timeout=180)
        assert task["state"] == "failed" and "holds only" in task["error"], task
        assert task["failure"]["cause"] == "output_too_big", task
        assert [p.name for p in out.iterdir() if p.name.endswith(".part")] == []


def _finalize_failed(store: Store, task_id: str, timeout: float = 120) -> None:
    """Wait until the leader has counted a failed finalize for the task."""
    deadline = time.monotonic() + timeout
    while True:
        rec = store.get(store.keys.task(task_id))
        if rec is not None and rec.value.job_failures.get("finalize"):
            return
        assert time.monotonic() < deadline, f"no finalize failed for {task_id}: {rec and rec.value}"
        time.sleep(0.3)


# -- (d) a single copy gets its second -------------------------------------------------------

def test_finding_single_copies_reads_an_index_not_the_history(pink_config):
    """The sweep's search for outputs with one holder costs the same however
    long the history is: it reads the `by_single_copy` index."""
    rows = []
    for i in range(2000):
        rec = new_record(f"{i:012x}", "alice", Params(), {"sha256": "0" * 64, "size": 10}, "web1")
        rec.state, rec.result, rec.created_at = State.SUCCEEDED, "succeeded", time.time()
        rec.output = {"stored": True, "host": "web1", "path": f"/o/{i}", "size": 1, "sha256": "0" * 64,
                      "copies": ["web1"] if i % 500 == 0 else ["web1", "web2"]}
        rows.append(rec)
    with archive.connection(pink_config.db) as conn:
        for rec in rows:
            archive.archive_task(conn, rec, b"")
        assert len(archive.single_copies(conn, "web1", "", 100).tasks) == 4
        with conn.cursor() as cur:
            cur.execute("ANALYZE TABLE tasks")
            cur.fetchall()
            cur.execute("EXPLAIN " + archive.SINGLE_COPIES, ("web1", "", 100))
            plan = cur.fetchone()
        conn.commit()
    assert plan["key"] == "by_single_copy" and int(plan["rows"]) < 100, plan
    assert "filesort" not in (plan["Extra"] or ""), plan  # pages in id order straight from the index


def test_an_output_kept_once_gets_a_second_copy_when_a_peer_comes_up(pink_processes, pink_config,
                                                                     config_variant, docker_client, tmp_path):
    """An output finalized while web1 was the only web node is not kept on one
    disk for ever: once web2 is up, web1's sweep pushes it a copy and the
    archive names both holders."""
    path = config_variant("alone", retention={"sweep_interval": 1})
    lab = _lab(pink_processes, pink_config, path)
    archive_path = images.save_image(docker_client, images.ensure_busybox_image(docker_client), tmp_path / "bb.tar")
    task_id = lab.submit(archive_path, cmd="sh -c 'echo once > /once.txt'").json()["task"]["id"]
    assert lab.wait(task_id, timeout=120)["state"] == "succeeded"
    with archive.connection(lab.config.db) as conn:
        output = archive.get_record(conn, task_id).output
    assert output["copies"] == ["web1"], output

    out2 = tmp_path / "out2"
    path2 = config_variant("web2", host="web2", web_port=free_port(), retention={"sweep_interval": 1},
                           web={"spool_dir": str(tmp_path / "spool2"), "output_dir": str(out2)})
    pink_processes.web(path2, role="web2")
    pink_processes.leader(path2, role="leader2")
    deadline = time.monotonic() + 60
    while True:
        with archive.connection(lab.config.db) as conn:
            output = archive.get_record(conn, task_id).output
        if output["copies"] == ["web1", "web2"]:
            break
        assert time.monotonic() < deadline, f"no second copy was made: {output}"
        time.sleep(0.5)
    copy = out2 / f"{task_id}-1.tar.zst"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == output["sha256"]
    web2 = Api(pink_config_module.load(path2), lab.token)
    r = web2("GET", f"/tasks/{task_id}/output")
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == output["sha256"]
    assert os.path.getsize(copy) == output["size"]


def _kept_once(conn, config, task_id: str, content: bytes | None, sha256: str | None = None) -> str:
    """Archive a finished task whose output web1 holds alone: `content` in
    its output store (no file when None), recorded with `sha256` (the
    content's digest unless given)."""
    rec = new_record(task_id, "alice", Params(), {"sha256": "0" * 64, "size": 10}, "web1")
    rec.state, rec.result, rec.created_at = State.SUCCEEDED, "succeeded", time.time()
    path = outputs.local_path(config.web.output_dir, rec)
    if content is not None:
        Path(path).write_bytes(content)
    data = content or b"gone"
    rec.output = {"stored": True, "host": "web1", "path": path, "size": len(data),
                  "sha256": sha256 or hashlib.sha256(data).hexdigest(), "copies": ["web1"]}
    archive.archive_task(conn, rec, b"")
    return task_id


def test_with_no_peer_up_the_copy_pass_reads_no_row_and_no_file(pink_config):
    """A one-web-node cluster pays nothing each sweep for second copies it
    cannot make: with no other web node up, the pass reads no row and opens
    no output (outputs may be 100 GiB each)."""
    store, redis = Store.from_config(pink_config), redisconn.connect(pink_config)
    redis.delete(outputs.COPY_CURSOR + "web1")
    assert outputs.live_peers(pink_config, store) == {}
    os.makedirs(pink_config.web.output_dir, exist_ok=True)
    with archive.connection(pink_config.db) as conn:
        unreadable = _kept_once(conn, pink_config, "0000000000a1", None)
        os.mkdir(outputs.local_path(pink_config.web.output_dir, archive.get_record(conn, unreadable)))
        missing = _kept_once(conn, pink_config, "0000000000a2", None)
        # Reading the first (a directory) would raise; looking at the second would forget its row.
        assert outputs.add_missing_copies(pink_config, store, conn, redis) == 0
        assert [t.id for t in archive.single_copies(conn, "web1", "", 10).tasks] == [unreadable, missing]
    assert redis.get(outputs.COPY_CURSOR + "web1") is None


def test_outputs_that_never_get_a_copy_do_not_hold_back_the_rest(pink_processes, pink_config, config_variant,
                                                                   tmp_path):
    """More single-copy outputs that can never be copied (their file gone
    from web1, or a peer refusing them) than one pass tries do not keep a
    good one from its second copy: each pass goes on from where the last
    stopped, and a row whose file is gone is not read again."""
    out2 = tmp_path / "out2"
    path2 = config_variant("web2", host="web2", web_port=free_port(),
                           web={"spool_dir": str(tmp_path / "spool2"), "output_dir": str(out2)})
    pink_processes.web(path2, role="web2")
    store, redis = Store.from_config(pink_config), redisconn.connect(pink_config)
    redis.delete(outputs.COPY_CURSOR + "web1")
    deadline = time.monotonic() + 60
    while "web2" not in outputs.live_peers(pink_config, store):
        assert time.monotonic() < deadline, "web2 never came up"
        time.sleep(0.3)
    os.makedirs(pink_config.web.output_dir, exist_ok=True)
    with archive.connection(pink_config.db) as conn:
        for i in range(1, 13):
            _kept_once(conn, pink_config, f"{i:012x}", None)
        refused = [_kept_once(conn, pink_config, f"{i:012x}", b"bytes", "0" * 64) for i in range(13, 25)]
        good = _kept_once(conn, pink_config, "ffffffffff01", b"a good output")
        for _ in range(3):  # 25 rows, 10 a pass
            outputs.add_missing_copies(pink_config, store, conn, redis)
        output = archive.get_record(conn, good).output
        assert output["copies"] == ["web1", "web2"], output
        assert [t.id for t in archive.single_copies(conn, "web1", "", 100).tasks] == refused
    assert (out2 / os.path.basename(output["path"])).read_bytes() == b"a good output"
