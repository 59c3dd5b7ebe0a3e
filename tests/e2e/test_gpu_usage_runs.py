"""GPU usage through the whole pipeline, on real services. A runner with declared GPUs (the
dev cluster: no NVML) reports "not measured" (null) in the API, `pink status` and `pink
usage`, never zeros. A runner whose sampler replays recorded idle readings (`[runner]
gpu_samples_file`, the test hook) warns an idle task in its log, then stops it: `failed`,
cause `gpu_idle`, its output kept, its usage archived and counted idle in `pink usage`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pink import archive, db
from pink.gpu_usage import GpuUsage
from pink.tasks import Params, new_record
from tests import images
from tests.helpers import Api, files_in_output, make_user

WRITE_THEN_IDLE = "sh -c 'mkdir /o; echo partial > /o/result; sleep 120'"


@pytest.fixture
def busybox(docker_client, tmp_path):
    return images.save_image(docker_client, images.ensure_busybox_image(docker_client), tmp_path / "bb.tar")


def _cluster(pink_processes, pink_config, cluster, config_variant, **runner) -> Api:
    pink_processes.web()
    pink_processes.worker()
    pink_processes.leader()
    cluster.start_sshd("gpu1")
    path = config_variant("gpu1", runner_name="gpu1",
                          runner={"gpus": ["GPU-gpu1-0"], "max_containers": 2, "stop_grace": 1.0, **runner})
    pink_processes.runner("gpu1", path)
    return Api(pink_config, make_user(pink_config, "alice"))


def test_declared_gpus_are_not_measured_never_zero(pink_processes, pink_config, cluster, config_variant, busybox):
    api = _cluster(pink_processes, pink_config, cluster, config_variant)
    with_gpu = api.submit(busybox, gpus=1, cmd="sleep 1").json()["task"]["id"]
    without = api.submit(busybox, gpus=0, cmd="true").json()["task"]["id"]
    for task_id in (with_gpu, without):
        task = api.wait(task_id, timeout=180)
        assert task["state"] == "succeeded", json.dumps(task)
        assert task["gpu_usage"] is None  # archived: null, not zeros
        assert "gpu usage:    not measured" in api.cli("status", task_id).stdout
    usage = api("GET", "/usage").json()["usage"]
    assert [(r["user"], r["measured_tasks"], r["gpu_hours_used"], r["gpu_hours_idle"], r["gpu_hours_measured"])
            for r in usage] == [("alice", 0, None, None, None)]
    assert api.cli("usage").stdout.splitlines()[1].count("not measured") == 2


def test_an_idle_task_is_warned_then_stopped_with_its_output_kept(pink_processes, pink_config, cluster,
                                                                  config_variant, busybox, tmp_path):
    samples = tmp_path / "idle.jsonl"
    samples.write_text(json.dumps({"percent": 0, "memory_used": 2**20}) + "\n")
    api = _cluster(pink_processes, pink_config, cluster, config_variant, gpu_samples_file=str(samples),
                   gpu_sample_seconds=0.5, idle_minutes=0.05, idle_grace_minutes=0.05)  # 3 s, then 3 s more
    task_id = api.submit(busybox, gpus=1, cmd=WRITE_THEN_IDLE, output="/o").json()["task"]["id"]
    task = api.wait(task_id, timeout=180)
    assert (task["state"], task["failure"]["cause"], task["failure"]["class"]) == ("failed", "gpu_idle", "task"), \
        json.dumps(task)
    assert task["attempt"] == 1  # the task's own failure: not tried again
    assert task["error"] == "stopped: its GPUs stayed under 5% for 0.1 minutes"
    usage = task["gpu_usage"]
    assert usage["samples"] >= 6 and usage["mean_percent"] == usage["peak_percent"] == 0
    assert usage["peak_memory_bytes"] == 2**20 and 0.05 <= usage["idle_minutes"] < 1
    assert usage["idle_minutes"] <= round(usage["measured_seconds"] / 60, 2) < 1  # all idle, all measured
    files = files_in_output(api("GET", f"/tasks/{task_id}/output").content)
    assert files["o/result"] == b"partial\n"  # stopped like a timeout: its output kept
    logs = api("GET", f"/tasks/{task_id}/logs").content
    assert b"\n[pink: this task's GPUs have been under 5% for 0.05 minutes" in logs  # on a line of its own
    status = api.cli("status", task_id).stdout
    assert "task: its GPUs stayed idle past the GPU servers' limit and it was stopped, its output kept" in status
    assert "idle 0." in status and "not measured" not in status
    [row] = api("GET", "/usage").json()["usage"]
    assert row["measured_tasks"] == 1 and row["gpu_hours_used"] == 0 and row["gpu_hours_idle"] > 0
    assert row["gpu_hours_measured"] == row["gpu_hours"] >= row["gpu_hours_idle"]
    assert f"of {row['gpu_hours_measured']:.2f} measured GPU-h" in api.cli("usage").stdout


def test_a_cancelled_and_a_timed_out_task_keep_their_usage(pink_processes, pink_config, cluster, config_variant,
                                                           busybox, tmp_path):
    samples = tmp_path / "busy.jsonl"
    samples.write_text(json.dumps({"percent": 60, "memory_used": 2**20}) + "\n")
    api = _cluster(pink_processes, pink_config, cluster, config_variant, gpu_samples_file=str(samples),
                   gpu_sample_seconds=0.5)
    timed = api.submit(busybox, gpus=1, cmd="sleep 300", timeout=2).json()["task"]["id"]
    cancelled = api.submit(busybox, gpus=1, cmd="sleep 300").json()["task"]["id"]
    api.wait(cancelled, states={"running"}, timeout=180)
    api.cli("cancel", cancelled, "--yes")
    for task_id, state in ((timed, "timed_out"), (cancelled, "cancelled")):
        task = api.wait(task_id, timeout=180)
        assert task["state"] == state, json.dumps(task)
        assert task["gpu_usage"]["samples"] >= 2 and task["gpu_usage"]["mean_percent"] == 60, json.dumps(task)


def test_schema_7_adds_the_usage_columns_to_a_table_with_rows(pink_config):
    """A history from before GPU usage (version 6, rows in it) upgrades in place: the columns
    are VIRTUAL (no rebuild of the tasks table), NULL for the old rows (not measured) and
    the measured value for a row whose record has one."""
    conn = db.connect(pink_config.db)
    try:
        with conn.cursor() as cur:
            for statements in db.MIGRATIONS[:6]:
                for statement in statements:
                    cur.execute(statement)
            cur.execute("CREATE TABLE schema_version (version INT NOT NULL) ENGINE=InnoDB")
            cur.execute("INSERT INTO schema_version (version) VALUES (6)")
            base = new_record("v6old", "alice", Params(gpus=1), {"sha256": "0" * 64, "size": 10}, "web1")
            measured = replace(base, id="v7new", gpu_usage=GpuUsage(30.0, 90.0, 2**30, 6.0, 100, 600.0))
            for task in (base, measured):
                record = task.to_json()
                cur.execute("INSERT INTO tasks (id, user_name, name, state, attempt, image_sha256, image_size, "
                            "gpus, submitted_at, finished_at, record) VALUES (%s,%s,%s,%s,1,%s,10,%s,%s,%s,%s)",
                            (task.id, "alice", "n", "succeeded", "0" * 64, json.dumps(["g0"]), 1.7e9, 1.7e9 + 5,
                             json.dumps(record)))
        conn.commit()
        assert db.migrate(conn) == (6, db.VERSION)
        with conn.cursor() as cur:
            cur.execute("SELECT id, gpu_mean_percent, gpu_idle_minutes FROM tasks ORDER BY id")
            assert list(cur.fetchall()) == [{"id": "v6old", "gpu_mean_percent": None, "gpu_idle_minutes": None},
                                            {"id": "v7new", "gpu_mean_percent": 30.0, "gpu_idle_minutes": 6.0}]
            cur.execute("SELECT column_name AS name, extra FROM information_schema.columns WHERE "
                        "table_schema = DATABASE() AND table_name = 'tasks' AND column_name LIKE 'gpu\\_%%' "
                        "AND column_name <> 'gpu_count' ORDER BY column_name")
            assert [(r["name"], r["extra"]) for r in cur.fetchall()] == [
                ("gpu_idle_minutes", "VIRTUAL GENERATED"), ("gpu_mean_percent", "VIRTUAL GENERATED")]
        conn.commit()
        [row] = archive.usage(conn, None, None, "alice")
        assert row["measured_tasks"] == 1 and row["tasks"] == 2
    finally:
        conn.close()
