"""The one way PINK processes connect to Redis: straight to `redis_url`, or
through Redis Sentinel when `redis_sentinels` is set.

With Sentinel, the client asks the sentinels which server is the master of
`redis_master` and asks again after a failover (redis-py's
`SentinelConnectionPool`), so a web node, worker or leader goes on when the
Redis host dies; RQ takes the client as it is. The password and database
number still come from `redis_url` (its host and port are then ignored);
the sentinels are asked with the same password.
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from redis import Redis
from redis.sentinel import Sentinel

SOCKET_TIMEOUT = 5.0  # seconds: a dead master is noticed, and another asked for, this fast


def connect(config) -> Redis:
    if not config.redis_sentinels:
        return Redis.from_url(config.redis_url)
    url = urlparse(config.redis_url)
    password = unquote(url.password) if url.password else None
    db = int(url.path.lstrip("/") or 0)
    sentinels = [(host, int(port)) for host, port in (s.rsplit(":", 1) for s in config.redis_sentinels)]
    sentinel = Sentinel(sentinels, socket_timeout=SOCKET_TIMEOUT,
                        sentinel_kwargs={"password": password, "socket_timeout": SOCKET_TIMEOUT})
    return sentinel.master_for(config.redis_master, password=password, db=db, socket_timeout=SOCKET_TIMEOUT)
