"""Prometheus metrics for sweeps: submits, indexes and cancels counted in Redis
(as `pink.metrics` counts the jobs' events, cluster-wide), and the live sweeps
read from their etcd index at scrape time (live indexes only, like the task gauges)."""

from __future__ import annotations

import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from redis import Redis
from redis.exceptions import RedisError

from pink import metrics
from pink.errors import PinkError
from pink.store import SMALL_PAGE, Store

log = logging.getLogger("pink.metrics")
NAME = "sweeps"  # the Redis hash: event -> total
COUNTERS = (("submitted", "pink_sweeps_submitted", "Sweeps created"),
            ("indexes", "pink_sweep_indexes_submitted", "Tasks created as indexes of sweeps"),
            ("cancelled", "pink_sweeps_cancelled", "Sweeps whose owner cancelled every index"))


def submitted(redis: Redis, indexes: int) -> None:
    metrics.count(redis, NAME, "submitted")
    metrics.count(redis, NAME, "indexes", indexes)


def cancelled(redis: Redis) -> None:
    metrics.count(redis, NAME, "cancelled")


class SweepCollector:
    """Read at scrape time: counters from Redis, live sweeps and indexes from etcd."""

    def __init__(self, store: Store, redis: Redis):
        self.store, self.redis = store, redis

    def collect(self):
        try:
            raw = {k.decode(): float(v) for k, v in self.redis.hgetall(metrics.KEY + NAME).items()}
        except RedisError as exc:
            log.warning("/metrics: Redis unreachable, sweep counters left out: %s", exc)
            raw = None
        if raw is not None:
            for label, name, text in COUNTERS:
                family = CounterMetricFamily(name, text)
                family.add_metric([], raw.get(label, 0.0))
                yield family
        prefix = self.store.keys.sweeps
        try:
            members = self.store.keys_under(prefix, SMALL_PAGE)  # keys only: the index's entries
        except PinkError as exc:
            log.warning("/metrics: etcd unreachable, sweep gauges left out: %s", exc)
            return
        live = {key[len(prefix):].split("/", 1)[0] for key in members}
        yield GaugeMetricFamily("pink_sweeps_live", "Sweeps with an index not yet archived", value=len(live))
        yield GaugeMetricFamily("pink_sweep_indexes_live", "Indexes of sweeps not yet archived", value=len(members))
