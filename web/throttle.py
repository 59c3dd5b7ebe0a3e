"""Login throttling: each password check is a 16 MiB scrypt, so an open login
endpoint is a memory and CPU denial of service, and a password guesser's tool.

The throttle must stop guessing without handing strangers a way to lock an
account out: a per-account counter that every address's failures feed lets
anyone who knows a user name (an admin's, say) keep its owner out for good.
So, as OWASP's "device cookies" advise and as GitHub and Google do, a
failure throttles the client that made it, and the account-wide limit
applies only to clients the account has never seen succeed:

- a *known device*: a browser or CLI that logged into this account before
  carries a signed cookie naming it (HttpOnly, Secure, SameSite=Strict,
  `DEVICE_DAYS`). Its failures count against that device alone
  (`DEVICE_FAILURES`), never against the address it shares or the account;
- a *known address*: a network (IPv6 by /64) this account logged in from in
  the last `KNOWN_DAYS` (the last `KNOWN_MAX` of them, in Redis), for
  clients that keep no cookie (`pink login`). It is exempt from the
  account-wide limit only; its own limits below still hold;
- anything else is a stranger: failures per user name from one address
  (`USER_FAILURES`), attempts of any name from one address
  (`ADDRESS_ATTEMPTS`: one client spraying names), and failures per user
  name from all strangers together (`ACCOUNT_FAILURES`: a guess spread over
  many addresses, still ~100 guesses per 15 minutes at most).

So a distributed attack can keep the owner out only on a device and address
they never used before, and then an admin's reset or an API token still
works: bearer tokens never pass through this module. Counters live in Redis,
so every web node shares them, in fixed windows that expire by themselves.
Concurrent password checks per process are bounded by a semaphore, so memory
stays bounded even when the counters cannot be read: with Redis unreachable
the counters let the attempt through (logging in must not depend on Redis),
the semaphore still holds.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from flask import after_this_request, current_app, request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from redis.exceptions import RedisError

from pink.errors import PinkError, Unavailable
from web.resources import res

log = logging.getLogger("pink.web")

USER_FAILURES = (10, 900)  # a stranger's failed attempts per user name from one address, per window of seconds
ACCOUNT_FAILURES = (100, 900)  # failed attempts per user name from all strangers together (a distributed guess)
ADDRESS_ATTEMPTS = (30, 300)  # a stranger's attempts (failed or not, any name) per client address, per window
DEVICE_FAILURES = (10, 900)  # failed attempts per known device, per window
DEVICE_COOKIE = "pink_device"  # the signed cookie naming the accounts this browser logged into
DEVICE_DAYS = 90  # how long a device stays known after its last successful login
DEVICE_ACCOUNTS = 8  # accounts one device cookie remembers (the most recent)
KNOWN_DAYS = 30  # how long an address stays known after a successful login from it
KNOWN_MAX = 10  # known addresses kept per account (the most recent)
CONCURRENT_CHECKS = 2  # password checks a web process computes at once
CHECK_WAIT = 10.0  # seconds an attempt waits for a free check before it is refused
_checks = threading.BoundedSemaphore(CONCURRENT_CHECKS)


class Throttled(PinkError):
    code = "throttled"
    status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Limit:
    """One counter: a Redis key, its limit and window, and what to tell the refused."""

    key: str
    limit: int
    window: int
    refusal: str


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


# -- known devices and addresses -------------------------------------------------

def _signer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.secret_key, salt="pink-login-device")


def _devices() -> dict[str, str]:
    """The accounts this client's device cookie names: {lowered name: device id}."""
    raw = request.cookies.get(DEVICE_COOKIE)
    if not raw:
        return {}
    try:
        found = _signer().loads(raw, max_age=DEVICE_DAYS * 86400)
    except BadSignature:
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def _remember_device(lowered: str, device: str | None) -> None:
    """After a successful login: the response (re)sets the cookie, this account most recent."""
    devices = {k: v for k, v in _devices().items() if k != lowered}
    devices[lowered] = device or secrets.token_urlsafe(16)
    kept = dict(list(devices.items())[-DEVICE_ACCOUNTS:])

    @after_this_request
    def set_cookie(response):
        response.set_cookie(DEVICE_COOKIE, _signer().dumps(kept), max_age=DEVICE_DAYS * 86400,
                            secure=True, httponly=True, samesite="Strict", path="/")
        return response


def _known_address(lowered: str, network: str) -> bool:
    try:
        score = res().redis.zscore(_key("known", lowered), network)
    except RedisError:
        return False
    return score is not None and score > time.time() - KNOWN_DAYS * 86400


def _remember_address(lowered: str, network: str) -> None:
    key = _key("known", lowered)
    try:
        pipe = res().redis.pipeline()
        pipe.zadd(key, {network: time.time()})
        pipe.zremrangebyrank(key, 0, -KNOWN_MAX - 1)
        pipe.expire(key, KNOWN_DAYS * 86400)
        pipe.execute()
    except RedisError as exc:
        log.warning("login throttle: Redis unreachable, not remembering the address: %s", exc)


# -- the attempt -------------------------------------------------------------------

def _limits(name: str, lowered: str, network: str, device: str | None) -> list[_Limit]:
    """The failure counters this attempt is judged by (and its failure feeds)."""
    locked = (f"too many failed logins for {name}: wait and try again, log in from a device or "
              "address you used before, or ask an admin to reset the password")
    if device:
        return [_Limit(_key("device", f"{lowered}@{device}"), *DEVICE_FAILURES, locked)]
    limits = [_Limit(_key("user", f"{lowered}@{network}"), *USER_FAILURES, locked)]
    if not _known_address(lowered, network):
        limits.append(_Limit(_key("account", lowered), *ACCOUNT_FAILURES, locked))
    return limits


def _check_address(network: str) -> None:
    """A stranger's attempt, failed or not, counts against its address (name spraying)."""
    limit, window = ADDRESS_ATTEMPTS
    key = _key("addr", network)
    if _seen(key, window, count=True) > limit:
        raise Throttled(f"too many login attempts from {network}: wait and try again", _ttl(key, window))


@contextmanager
def attempt(name: str):
    """Wrap one password check for `name`; raises Throttled before it when over a limit.

    The body reports a failure by calling `failed()` on the yielded object;
    after a success the client becomes a known device and address of `name`.
    """
    network = _network(client_address())
    lowered = name.lower()
    device = _devices().get(lowered)
    if not device:
        _check_address(network)
    limits = _limits(name, lowered, network, device)
    for limit in limits:
        if _seen(limit.key, limit.window, count=False) >= limit.limit:
            raise Throttled(limit.refusal, _ttl(limit.key, limit.window))
    if not _checks.acquire(timeout=CHECK_WAIT):
        raise Unavailable("too many logins at once: try again in a few seconds", code="busy")
    outcome = _Outcome()
    try:
        yield outcome
    finally:
        _checks.release()
    if outcome.failure:
        for limit in limits:
            _count(limit.key, limit.window)
    else:
        _remember_address(lowered, network)
        _remember_device(lowered, device)


class _Outcome:
    failure = False

    def failed(self) -> None:
        self.failure = True
