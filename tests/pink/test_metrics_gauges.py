"""/metrics gauges the alert rules (docs/metrics/alerts.yml) need: how long
tasks have sat in their state, and each runner's free spool space. Built by
`ClusterCollector` from records put in the test cluster's etcd."""

from __future__ import annotations

import time
from dataclasses import replace

from pink.metrics import ClusterCollector
from pink.redisconn import connect as redis_connect
from pink.store import Keys, Store
from pink.tasks import Params, State, new_record


def samples(config, records: dict) -> dict[tuple[str, tuple], float]:
    """What /metrics reports with `records` in this test's etcd (its real etcd and Redis)."""
    store = Store.from_config(config)
    try:
        for key, value in records.items():
            assert store.create(key, value)
        families = ClusterCollector(store, redis_connect(config)).collect()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}
    finally:
        store.close()


def task(task_id, state, entered):
    return replace(new_record(task_id, "ann", Params(), {"sha256": "a" * 64, "size": 1}, "web1"),
                   state=state, updated_at=entered)


def test_the_task_longest_in_each_state_is_reported(pink_config):
    now, keys = time.time(), Keys(pink_config.etcd.prefix)
    got = samples(pink_config, {keys.task("t1"): task("t1", State.EXPORTED, now - 7200),
                                keys.task("t2"): task("t2", State.EXPORTED, now - 60),
                                keys.task("t3"): task("t3", State.RUNNING, now - 30)})
    assert 7190 < got[("pink_tasks_oldest_in_state_seconds", (("state", "exported"),))] < 7300
    assert 20 < got[("pink_tasks_oldest_in_state_seconds", (("state", "running"),))] < 120
    assert got[("pink_tasks_oldest_in_state_seconds", (("state", "queued"),))] == 0
    assert not [labels for (name, labels) in got if name == "pink_tasks_oldest_in_state_seconds"
                and dict(labels)["state"] in ("succeeded", "failed", "timed_out", "cancelled")]


def test_a_runners_free_spool_is_reported_when_it_told(pink_config):
    keys = Keys(pink_config.etcd.prefix)
    got = samples(pink_config, {keys.node("run1"): {"name": "run1", "gpus": ["g0"], "spool_free": 5 * 2**30},
                                keys.node("run2"): {"name": "run2", "gpus": []}})  # an older runner: no figure
    assert got[("pink_node_spool_free_bytes", (("node", "run1"),))] == 5 * 2**30
    assert ("pink_node_spool_free_bytes", (("node", "run2"),)) not in got
    assert got[("pink_node_gpus", (("node", "run1"), ("use", "free")))] == 1
