"""The one way PINK processes connect to Redis: straight to `redis_url`, or
through Redis Sentinel when `redis_sentinels` is set.

With Sentinel, the client asks the sentinels which server is the master of
`redis_master` and asks again after a failover (redis-py's
`SentinelConnectionPool`), so a web node, worker or leader goes on when the
Redis host dies; RQ takes the client as it is. The password and database
number still come from `redis_url` (its host and port are then ignored);
the sentinels are asked with the same password.

A worker's connection blocks in BLPOP for up to DEQUEUE_TIMEOUT, so its
socket timeout must be longer than that (`connect(config, blocking=True)`):
RQ raises a shorter one to 415 s otherwise, and a master that vanished
without closing its sockets (power loss, partition) would hold every worker
for minutes. Bounded here, it costs at most BLOCKING_TRIES socket timeouts.
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

SOCKET_TIMEOUT = 5.0  # seconds: a dead master is noticed, and another asked for, this fast
# Seconds to open a connection: milliseconds on a lab's network, while a host
# that is gone drops the SYNs and each try would wait the whole socket timeout.
CONNECT_TIMEOUT = 2.0
DEQUEUE_TIMEOUT = 5  # seconds a worker's BLPOP waits for a job before it looks around again
BLOCKING_SOCKET_TIMEOUT = DEQUEUE_TIMEOUT + SOCKET_TIMEOUT  # the BLPOP's wait plus a reply's
# One retry (on a new connection, which asks the sentinels again after a
# failover), not redis-py's 10: a silent master stalls a worker two socket
# timeouts, not eleven.
BLOCKING_TRIES = 2


def connect(config, blocking: bool = False) -> Redis:
    """A client for PINK's Redis; `blocking` for one that waits in BLPOP (an RQ worker's)."""
    timeouts = {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT}
    if blocking:
        timeouts.update(socket_timeout=BLOCKING_SOCKET_TIMEOUT,
                        retry=Retry(NoBackoff(), BLOCKING_TRIES - 1))
    if not config.redis_sentinels:
        return Redis.from_url(config.redis_url, **(timeouts if blocking else {}))
    url = urlparse(config.redis_url)
    password = unquote(url.password) if url.password else None
    db = int(url.path.lstrip("/") or 0)
    sentinels = [(host, int(port)) for host, port in (s.rsplit(":", 1) for s in config.redis_sentinels)]
    # A sentinel that does not answer is not tried again (redis-py's client
    # retries 3 times with backoff): the next one in the list is asked instead.
    # With a dead host's sentinel first, the first command after it died waited
    # 53 s in the lab; each later one starts from the sentinel that answered.
    sentinel = Sentinel(sentinels, sentinel_kwargs={
        "password": password, "socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT,
        "retry": Retry(NoBackoff(), 0)})
    return sentinel.master_for(config.redis_master, password=password, db=db, **timeouts)
