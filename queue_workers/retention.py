"""The leader's retention sweep: expire old outputs, have web hosts delete files.

Every `retention.sweep_interval`, outputs past `retention.output_days` or
over a user's `retention.max_output_bytes_per_user` are expired in the
archive, and each web host (present in etcd, or with a transfer queue: one
that is down still has files) is sent a sweep job that deletes its expired
and orphaned files.
"""

from __future__ import annotations

import logging
import time

from redis import Redis
from redis.exceptions import RedisError

from pink import archive
from pink import config as pink_config
from pink import nodes as pink_nodes
from pink.errors import PinkError
from pink.store import Store
from queue_workers.queues import enqueue_sweep, transfer_hosts

log = logging.getLogger("pink.leader")


class Retention:
    def __init__(self, config: pink_config.Config, store: Store, redis: Redis):
        self.config = config
        self.store = store
        self.redis = redis
        self._swept = 0.0

    def sweep_if_due(self) -> None:
        """Expire old outputs in the archive, and have every web host delete its expired files."""
        if time.monotonic() - self._swept < self.config.retention.sweep_interval:
            return
        self._swept = time.monotonic()
        try:
            with archive.connection(self.config.db) as conn:
                expired = archive.expire(conn, time.time(), self.config.retention.max_output_bytes_per_user,
                                         self.config.retention.output_days)
            if expired:
                log.info("retention: %d outputs expired", expired)
            # Web hosts present in etcd, and any with a transfer queue (one that is down still has files).
            for host in sorted(set(transfer_hosts(self.redis)) | set(pink_nodes.web_urls(self.store))):
                enqueue_sweep(self.redis, host, self.config.node_ttl)
        except (PinkError, RedisError) as exc:
            log.warning("retention sweep: %s", exc)
