"""Login throttling: each password check is a 16 MiB scrypt, so an open login
endpoint is a memory and CPU denial of service, and a password guesser's tool.

Four limits. Failed attempts per user name from one address, the same
from anywhere (a higher limit: a guess spread over many addresses), and
attempts per client address (one client trying many names; IPv6 by /64) are
counted in Redis, so every web node shares them, in
fixed windows that expire by themselves. Concurrent password checks per
process are bounded by a semaphore, so memory stays bounded even when the
counters cannot be read: with Redis unreachable the counters let the attempt
through (logging in must not depend on Redis), the semaphore still holds.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import socket
import threading
from contextlib import contextmanager

from flask import request
from redis.exceptions import RedisError

from pink.errors import PinkError, Unavailable
from web.resources import res

log = logging.getLogger("pink.web")

USER_FAILURES = (10, 900)  # failed attempts per user name from one address, per window of seconds
ACCOUNT_FAILURES = (100, 900)  # failed attempts per user name from anywhere (a distributed guess)
ADDRESS_ATTEMPTS = (30, 300)  # attempts (failed or not) per client address, per window
CONCURRENT_CHECKS = 2  # password checks a web process computes at once
CHECK_WAIT = 10.0  # seconds an attempt waits for a free check before it is refused
_checks = threading.BoundedSemaphore(CONCURRENT_CHECKS)


class Throttled(PinkError):
    code = "throttled"
    status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def client_address() -> str:
    """The client's address: the router's X-Real-IP when the peer is a trusted router."""
    peer = request.remote_addr or "unknown"
    forwarded = request.headers.get("X-Real-IP", "")
    if forwarded and peer in _trusted(tuple(res().config.web.trusted_proxies)):
        try:
            return str(ipaddress.ip_address(forwarded.strip()))
        except ValueError:
            return peer
    return peer


@functools.lru_cache(maxsize=4)
def _trusted(proxies: tuple[str, ...]) -> frozenset[str]:
    """The routers' addresses: an inventory may name them, and the peer is an address."""
    found = set()
    for proxy in proxies:
        try:
            found.update(info[4][0] for info in socket.getaddrinfo(proxy, None))
        except OSError:
            log.warning("trusted proxy %s does not resolve: its clients count as it", proxy)
    return frozenset(found)


def _key(kind: str, value: str) -> str:
    return f"pink:login:{kind}:{hashlib.sha256(value.encode()).hexdigest()[:32]}"


def _count(key: str, window: int) -> int | None:
    try:
        pipe = res().redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, window, nx=True)
        return pipe.execute()[0]
    except RedisError as exc:
        log.warning("login throttle: Redis unreachable, not counting: %s", exc)
        return None


def _ttl(key: str, default: int) -> int:
    try:
        ttl = res().redis.ttl(key)
    except RedisError:
        return default
    return ttl if ttl and ttl > 0 else default


def _seen(key: str, window: int, count: bool) -> int:
    """The key's count, first adding this attempt when `count`; 0 when Redis cannot say."""
    if count:
        return _count(key, window) or 0
    try:
        return int(res().redis.get(key) or 0)
    except RedisError:
        return 0


def _network(address: str) -> str:
    """An IPv6 client is its /64 (one machine holds a whole one); IPv4 as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


@contextmanager
def attempt(name: str):
    """Wrap one password check for `name`; raises Throttled before it when over a limit.

    The body reports a failure by calling `failed()` on the yielded object.
    A failure counts against the name from this address, so a stranger
    guessing cannot lock the owner out from elsewhere, and against the name
    from anywhere, with a higher limit, for a guess spread over many addresses.
    """
    address = _network(client_address())
    lowered = name.lower()
    address_key = _key("addr", address)
    limits = ((_key("user", f"{lowered}@{address}"), USER_FAILURES), (_key("account", lowered), ACCOUNT_FAILURES))
    limit, window = ADDRESS_ATTEMPTS
    if _seen(address_key, window, count=True) > limit:
        raise Throttled(f"too many login attempts from {address}: wait and try again",
                        _ttl(address_key, window))
    for key, (limit, window) in limits:
        if _seen(key, window, count=False) >= limit:
            raise Throttled(f"too many failed logins for {name}: wait and try again, or ask an admin "
                            "to reset the password", _ttl(key, window))
    if not _checks.acquire(timeout=CHECK_WAIT):
        raise Unavailable("too many logins at once: try again in a few seconds", code="busy")
    outcome = _Outcome()
    try:
        yield outcome
    finally:
        _checks.release()
        if outcome.failure:
            for key, (_, window) in limits:
                _count(key, window)


class _Outcome:
    failure = False

    def failed(self) -> None:
        self.failure = True
