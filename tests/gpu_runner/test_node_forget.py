"""`pink node forget`: what etcd keeps of a runner gone for good (its drain)
goes, and never while the runner is up or a task still holds a reservation there."""

from __future__ import annotations

import json

from pink.store import Store
from tests.helpers import wait_for


def test_a_runner_gone_for_good_is_forgotten_and_an_up_one_never(cluster_api, pink_processes, slow_archive):
    api = cluster_api
    store = Store.from_config(api.config)
    api.cli("node", "drain", "run1")
    refused = api.cli("node", "forget", "run1", check=False)
    assert refused.returncode != 0 and "is up: stop pink-runner on it first" in refused.stderr, refused.stderr
    assert store.get(store.keys.control("run1")) is not None
    runner = next(n for n in pink_processes.started if "runner-run1" in n)
    pink_processes.stop(runner)  # the runner's lease lasts one more node_ttl (3 s here), then its key goes
    wait_for(lambda: store.get(store.keys.node("run1")) is None)
    out = api.cli("node", "forget", "run1", "--json")
    assert store.keys.control("run1") in json.loads(out.stdout)
    assert store.get(store.keys.control("run1")) is None
    assert api.cli("node", "forget", "run1", "--json").stdout.strip() == "[]"  # nothing left: not an error
    again = pink_processes.runner()  # the same name again: a new node, ready (the old drain is gone)
    task_id = api.submit(slow_archive).json()["task"]["id"]
    task = api.wait(task_id)
    assert task["state"] == "succeeded", (task, pink_processes.log(again)[-3000:])
