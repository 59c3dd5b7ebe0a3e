"""/metrics gauges the alert rules (docs/metrics/alerts.yml) need: how long
tasks have sat in their state, and each runner's free spool space. Built by
`ClusterCollector` from a stand-in store and Redis: no services needed."""

from __future__ import annotations

import time
from dataclasses import replace

from pink.metrics import ClusterCollector
from pink.store import Keys, Record
from pink.tasks import Params, State, new_record


class FakeStore:
    """What the collector reads: `list(prefix)`, `get(key)` and `keys`."""

    def __init__(self, values: dict):
        self.keys, self.values = Keys("/pink"), values

    def _record(self, key, value):
        return Record(key=key, value=value, mod_revision=1, create_revision=7, lease=0)

    def list(self, prefix):
        return [self._record(k, v) for k, v in sorted(self.values.items()) if k.startswith(prefix)]

    def get(self, key):
        return self._record(key, self.values[key]) if key in self.values else None


class FakeRedis:
    """A pipeline of HGETALLs answering empty hashes: no counters recorded yet."""

    def pipeline(self):
        return self

    def hgetall(self, key):
        pass

    def execute(self):
        return [{} for _ in range(5)]


def samples(store) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in ClusterCollector(store, FakeRedis()).collect() for s in family.samples}


def task(task_id, state, entered):
    return replace(new_record(task_id, "ann", Params(), {"sha256": "a" * 64, "size": 1}, "web1"),
                   state=state, updated_at=entered)


def test_the_task_longest_in_each_state_is_reported():
    now, keys = time.time(), Keys("/pink")
    store = FakeStore({keys.task("t1"): task("t1", State.EXPORTED, now - 7200),
                       keys.task("t2"): task("t2", State.EXPORTED, now - 60),
                       keys.task("t3"): task("t3", State.RUNNING, now - 30)})
    got = samples(store)
    assert 7190 < got[("pink_tasks_oldest_in_state_seconds", (("state", "exported"),))] < 7300
    assert 20 < got[("pink_tasks_oldest_in_state_seconds", (("state", "running"),))] < 120
    assert got[("pink_tasks_oldest_in_state_seconds", (("state", "queued"),))] == 0
    assert not [labels for (name, labels) in got if name == "pink_tasks_oldest_in_state_seconds"
                and dict(labels)["state"] in ("succeeded", "failed", "timed_out", "cancelled")]


def test_a_runners_free_spool_is_reported_when_it_told():
    keys = Keys("/pink")
    store = FakeStore({keys.node("run1"): {"name": "run1", "gpus": ["g0"], "spool_free": 5 * 2**30},
                       keys.node("run2"): {"name": "run2", "gpus": []}})  # an older runner: no figure
    got = samples(store)
    assert got[("pink_node_spool_free_bytes", (("node", "run1"),))] == 5 * 2**30
    assert ("pink_node_spool_free_bytes", (("node", "run2"),)) not in got
    assert got[("pink_node_gpus", (("node", "run1"), ("use", "free")))] == 1
