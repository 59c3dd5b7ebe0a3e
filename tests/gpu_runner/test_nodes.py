"""Node control with tasks in flight: drain, stop, resume (two runners, real services)."""

from __future__ import annotations

import json
import os
import signal
import time

from pink import nodes
from pink.store import Store
from tests.helpers import Api, archived, make_user, wait_for


def test_drain_lets_running_work_finish_and_takes_no_more(cluster_api, slow_archive):
    api = cluster_api
    first = api.submit(slow_archive).json()["task"]["id"]
    api.wait(first, states={"running"})
    out = api.cli("node", "drain", "run1", "--json")
    assert json.loads(out.stdout)["node"]["state"] == "draining"
    second = api.submit(slow_archive).json()["task"]["id"]
    assert api.wait(first)["state"] == "succeeded"
    time.sleep(1.5)
    waiting = api.task(second)
    assert waiting["state"] == "queued" and waiting["waiting"] == "no runner is accepting tasks"
    assert "draining" in api.cli("nodes").stdout
    api.cli("node", "resume", "run1")
    assert api.wait(second)["state"] == "succeeded"


def test_stop_moves_running_tasks_to_another_runner(cluster_api, slow_archive):
    api = cluster_api
    task_id = api.submit(slow_archive).json()["task"]["id"]
    api.wait(task_id, states={"running"})
    api.start_run2()
    api.cli("node", "stop", "run1", "--yes")
    task = api.wait(task_id)
    assert task["state"] == "succeeded" and task["node"] == "run2" and task["attempt"] == 2
    store = Store.from_config(api.config)
    record = archived(api.config, task_id)
    assert any("stopped by an operator" in h[2] for h in record["history"])
    assert record.get("losses", 0) == 0
    assert nodes.control_state(store, "run1") == nodes.STOPPED


def test_node_control_is_for_admins(cluster_api):
    alice = Api(cluster_api.config, make_user(cluster_api.config, "alice"))
    r = alice("POST", "/nodes/run1/drain")
    assert r.status_code == 403
    assert cluster_api("POST", "/nodes/nope/drain").status_code == 404
    assert cluster_api("POST", "/nodes/run1/explode").status_code == 404


def test_drain_now_moves_tasks_waiting_there(cluster_api, slow_archive, pink_processes):
    api = cluster_api
    api.start_run2()
    runner = next(n for n in pink_processes.started if n.endswith("runner-run1"))
    pid = pink_processes.cluster.pid(runner)
    os.kill(pid, signal.SIGSTOP)  # for a moment run1 stays registered but takes up nothing
    try:
        task_id = api.submit(slow_archive).json()["task"]["id"]
        assert api.wait(task_id, states={"assigned"}, timeout=20)["node"] == "run1"
        out = json.loads(api.cli("node", "drain", "run1", "--now", "--json").stdout)
        assert out["moved"] == 1 and out["node"]["state"] == "draining"
    finally:
        os.kill(pid, signal.SIGCONT)
    task = api.wait(task_id)
    assert task["state"] == "succeeded" and task["node"] == "run2" and task["attempt"] == 2
