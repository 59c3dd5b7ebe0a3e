"""Cluster metrics for Prometheus: counters the jobs keep, read at scrape time
with the live state, as `prometheus_client` metric families.

Events happen in many processes on many hosts (transfer and finalize jobs
on every web node's workers), so their counters live in Redis hashes, where
each web node's `/metrics` reads the same cluster-wide totals: scrape any one
web node (or the router) and the numbers are whole. A Redis that lost its
data restarts the counters at zero, which Prometheus reads as a reset.
Gauges (tasks by state, the queue, GPUs per runner, the leader) are read from
etcd at scrape time: live tasks only, so a scrape costs the same after a
year of history. Runners publish their GPU readings in their node record
(see `gpu_runner.agent`), not on an endpoint of their own: runners accept
only SSH, and a scraper would need its own route, TLS and credentials to
each; the web node already reads node records.

Recording never fails a job: a metric lost to a Redis outage is a gap in a
graph, a job failed by one is a task delayed.
"""

from __future__ import annotations

import logging
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from redis import Redis
from redis.exceptions import RedisError

from pink import nodes, placement
from pink.store import Store
from pink.tasks import FINAL, State, Task

log = logging.getLogger("pink.metrics")

KEY = "pink:metrics:"  # Redis hashes: KEY + name -> {label value: total}
LATENCY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600)
NVML_READINGS = (("utilization", "pink_gpu_utilization_ratio", "GPU busy fraction (NVML)"),
                 ("memory_used", "pink_gpu_memory_used_bytes", "GPU memory in use (NVML)"),
                 ("memory_total", "pink_gpu_memory_total_bytes", "GPU memory (NVML)"))


# ---------------------------------------------------------------- recording (jobs)

def count(redis: Redis, name: str, label: str, amount: float = 1) -> None:
    """Add `amount` to counter `name` for `label` (a direction, an outcome, a state)."""
    try:
        redis.hincrbyfloat(KEY + name, label, amount)
    except RedisError as exc:
        log.warning("metric %s not recorded: %s", name, exc)


def observe_start(redis: Redis, task: Task) -> None:
    """Record a finished task's submit-to-start wait, if it started."""
    started, submitted = task.timings.get(State.RUNNING.value), task.timings.get("submitted")
    if not isinstance(started, (int, float)) or not isinstance(submitted, (int, float)):
        return
    wait = max(0.0, started - submitted)
    bucket = next((str(b) for b in LATENCY_BUCKETS if wait <= b), "+Inf")
    try:
        pipe = redis.pipeline()
        pipe.hincrby(KEY + "start_wait", bucket, 1)
        pipe.hincrbyfloat(KEY + "start_wait", "sum", wait)
        pipe.execute()
    except RedisError as exc:
        log.warning("metric start_wait not recorded: %s", exc)


# ---------------------------------------------------------------- reading (/metrics)

class ClusterCollector:
    """A prometheus_client collector: every family built fresh at each scrape."""

    def __init__(self, store: Store, redis: Redis):
        self.store, self.redis = store, redis

    def collect(self):
        yield from self._tasks()
        yield from self._nodes()
        yield from self._leader()
        yield from self._counters()
        yield from self._notifications()

    def _tasks(self):
        live = [rec.value for rec in self.store.list(self.store.keys.tasks)]
        by_state = GaugeMetricFamily("pink_tasks", "Live tasks (in etcd) by state", labels=["state"])
        for state in State:
            if state not in FINAL:
                by_state.add_metric([state.value], sum(1 for t in live if t.state == state))
        yield by_state
        waiting = [t for t in live if t.state == State.QUEUED]
        yield GaugeMetricFamily("pink_queue_length", "Tasks waiting for a runner", value=len(waiting))
        now = time.time()
        oldest = max((now - t.created_at for t in waiting), default=0.0)
        yield GaugeMetricFamily("pink_queue_oldest_wait_seconds", "How long the oldest waiting task has waited",
                                value=oldest)
        # From the tasks already read: a task stuck in one state (`exported`
        # while finalize cannot run) shows here, whatever the counters say.
        in_state = GaugeMetricFamily("pink_tasks_oldest_in_state_seconds",
                                     "Seconds since the live task longest in each state entered it (0: none)",
                                     labels=["state"])
        for state in State:
            if state not in FINAL:
                in_state.add_metric([state.value], max((now - t.updated_at for t in live if t.state == state),
                                                       default=0.0))
        yield in_state

    def _nodes(self):
        views = nodes.view(self.store)
        allocs = {r.key.rsplit("/", 1)[1]: r.value for r in self.store.list(self.store.keys.allocs)}
        gpus = GaugeMetricFamily("pink_node_gpus", "GPUs of a runner, free or reserved", labels=["node", "use"])
        slots = GaugeMetricFamily("pink_node_slots", "Containers a runner may run at once", labels=["node"])
        tasks = GaugeMetricFamily("pink_node_tasks", "Tasks holding a reservation on a runner", labels=["node"])
        state = GaugeMetricFamily("pink_node_state", "A runner's operator state (1 for its state)",
                                  labels=["node", "state"])
        spool = GaugeMetricFamily("pink_node_spool_free_bytes",
                                  "Bytes free in a runner's spool filesystem, as it last reported", labels=["node"])
        readings = {attr: GaugeMetricFamily(name, text, labels=["node", "gpu", "model"])
                    for attr, name, text in NVML_READINGS}
        for node in views:
            free = len(placement.free_gpus(node, allocs.get(node.name, {})))
            gpus.add_metric([node.name, "free"], free)
            gpus.add_metric([node.name, "used"], len(node.gpus) - free)
            slots.add_metric([node.name], node.max_containers)
            tasks.add_metric([node.name], len(node.tasks))
            state.add_metric([node.name, node.state], 1)
            if node.spool_free is not None:
                spool.add_metric([node.name], node.spool_free)
            models = {g["uuid"]: g.get("model") or "" for g in node.record.get("gpu_inventory") or []}
            for uuid, stats in (node.record.get("gpu_stats") or {}).items():
                for attr, family in readings.items():
                    if stats.get(attr) is not None:
                        family.add_metric([node.name, uuid, models.get(uuid, "")], stats[attr])
        yield from (gpus, slots, tasks, state, spool, *readings.values())

    def _leader(self):
        rec = self.store.get(self.store.keys.leader)
        family = GaugeMetricFamily("pink_leader", "The queue leader (1 for the holder)", labels=["holder"])
        if rec is not None and isinstance(rec.value, dict):
            family.add_metric([str(rec.value.get("holder", ""))], 1)
        yield family

    def _counters(self):
        try:
            pipe = self.redis.pipeline()
            for name in ("transfer_bytes", "transfer_seconds", "finalize", "finished", "start_wait"):
                pipe.hgetall(KEY + name)
            raw = [{k.decode(): float(v) for k, v in h.items()} for h in pipe.execute()]
        except RedisError as exc:
            log.warning("/metrics: Redis unreachable, counters left out: %s", exc)
            return
        transfer_bytes, transfer_seconds, finalize, finished, start_wait = raw
        for name, text, values, label in (
                ("pink_transfer_bytes", "Bytes copied between web nodes and runners", transfer_bytes, "direction"),
                ("pink_transfer_seconds", "Seconds spent copying between web nodes and runners",
                 transfer_seconds, "direction"),
                ("pink_finalize", "Finalize jobs by outcome (retry: a finalize run again for a task)",
                 finalize, "outcome"),
                ("pink_tasks_finished", "Tasks archived, by final state", finished, "state")):
            family = CounterMetricFamily(name, text, labels=[label])
            for value, total in sorted(values.items()):
                family.add_metric([value], total)
            yield family
        yield _histogram(start_wait)

    def _notifications(self):
        """Notification tries by channel and outcome (`queue_workers.notify` counts them as
        "<channel>/<outcome>": delivered, failed (retried), given_up, refused)."""
        try:
            raw = {k.decode(): float(v) for k, v in self.redis.hgetall(KEY + "notifications").items()}
        except RedisError as exc:
            log.warning("/metrics: Redis unreachable, notification counters left out: %s", exc)
            return
        family = CounterMetricFamily("pink_notification_deliveries",
                                     "Notification tries by channel (webhook, email) and outcome",
                                     labels=["channel", "outcome"])
        for label, total in sorted(raw.items()):
            channel, _, outcome = label.partition("/")
            family.add_metric([channel, outcome], total)
        yield family


def _histogram(raw: dict[str, float]) -> HistogramMetricFamily:
    cumulative, buckets = 0.0, []
    for bound in [*map(str, LATENCY_BUCKETS), "+Inf"]:
        cumulative += raw.get(bound, 0.0)
        buckets.append((bound, cumulative))
    return HistogramMetricFamily("pink_submit_to_start_seconds",
                                 "From submit to the container's start, for archived tasks that started",
                                 buckets=buckets, sum_value=raw.get("sum", 0.0))
