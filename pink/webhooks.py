"""Where a webhook may go, and sending one there without being turned against the cluster.

A webhook URL is the user's choice, so PINK's own network position is the
risk: a URL naming localhost, the metadata service or the cluster's etcd
would make a web node or worker a proxy into places the user cannot reach.
`check` refuses, when the URL is set and again before each delivery (DNS
may change in between):

- anything but http and https, and URLs without a host;
- hosts resolving (any of their addresses) to loopback, link-local,
  unspecified, multicast or reserved addresses, IPv4 wrapped in IPv6
  (mapped, compatible, 6to4, Teredo, NAT64) checked as the IPv4 it carries;
- the cluster's own addresses (`Policy.of`: the hosts of PINK's config,
  etcd endpoints, Redis, the database, web nodes and runners as etcd and
  the config know them, and this host's interfaces when pink-web listens
  on a wildcard address), whatever the allow-list says;
- private (non-global) addresses, unless in `[notifications] allow_private`.

`post` connects to the very address `check` approved (the original name
for SNI, the certificate and the Host header), so no second lookup can swap
in another one, never follows a redirect (a 3xx is a failed try, reported
with its Location), and bounds the bytes of answer it reads and the whole
try's time: a watchdog shuts the socket at the deadline, so a receiver
sending a byte now and then cannot hold a notify worker.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pink.errors import BadRequest, ConfigError
from pink.notifications import MAX_URL_CHARS

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_PORTS = {"http": 80, "https": 443}
WILDCARDS = {"", "0.0.0.0", "::", "*"}  # a bind host meaning: every interface of this host
NAT64 = ipaddress.ip_network("64:ff9b::/96")
POLICY_TTL = 60.0  # seconds a process keeps the cluster's addresses it read (runners come and go)


class Refused(BadRequest, code="bad_webhook"):
    """A webhook URL PINK will not send to; the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (`address`) and what to say there."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    address: str


@dataclass(frozen=True)
class Outcome:
    """One try's result: delivered, or why not (an HTTP status, or an error without one)."""

    delivered: bool
    status: int | None = None
    error: str | None = None
    final: bool = False  # no retry can help (the URL is refused)


@dataclass
class Policy:
    """The networks receivers may be in, and the cluster's own addresses (never allowed)."""

    allow_private: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    own: set[Address] = field(default_factory=set)

    @classmethod
    def of(cls, config, store=None) -> "Policy":
        """From PINK's config and, with `store`, the runners and web nodes etcd knows.

        Hosts that do not resolve are skipped: a name nobody can reach is
        nobody's address."""
        allow = []
        for text in config.notifications.allow_private:
            try:
                allow.append(ipaddress.ip_network(text, strict=False))
            except ValueError as exc:
                raise ConfigError(f"[notifications] allow_private: {text!r} is no network: {exc}") from None
        own = set()
        for host in cluster_hosts(config, store):
            own.update(_resolve_quietly(host))
        if _host_of(config.web.bind) in WILDCARDS:  # pink-web answers on every address of this host
            own.update(local_addresses())
        return cls(allow_private=allow, own=own)


_cached: dict[str, tuple[float, Policy]] = {}


def cached_policy(config, store=None, ttl: float = POLICY_TTL) -> Policy:
    """`Policy.of`, read again at most every `ttl` seconds per config in this process:
    a submit or a try must not resolve every cluster host and list etcd's nodes."""
    read_at, policy = _cached.get(config.path, (float("-inf"), None))
    if policy is None or time.monotonic() - read_at > ttl:
        policy = Policy.of(config, store)
        _cached[config.path] = (time.monotonic(), policy)
    return policy


_FIB_ADDRESS = re.compile(r"[|+]-- ([0-9.]+)$")


def local_addresses(proc: Path = Path("/proc/net")) -> set[Address]:
    """This host's own interface addresses (Linux: the kernel's LOCAL routes and
    IPv6 address list); an empty set where /proc does not say."""
    found: set[Address] = set()
    last = None
    try:
        for line in (proc / "fib_trie").read_text().splitlines():
            if match := _FIB_ADDRESS.search(line.strip()):
                last = match.group(1)
            elif "/32 host LOCAL" in line and last:
                found.add(ipaddress.ip_address(last))
    except OSError:
        pass
    try:
        for line in (proc / "if_inet6").read_text().splitlines():
            found.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
    except (OSError, ValueError, IndexError):
        pass
    return found


def cluster_hosts(config, store=None) -> set[str]:
    """Every host name or address PINK's config and etcd give for the cluster's parts."""
    hosts = {config.db.host, config.runner.ssh_host, config.notifications.smtp_host}
    hosts.update(_host_of(e) for e in config.etcd.endpoints)
    hosts.update(_host_of(s) for s in config.redis_sentinels)
    hosts.update(urlsplit(u).hostname or "" for u in (config.redis_url, config.web.url))
    hosts.add(_host_of(config.web.bind))
    if store is not None:
        from pink import nodes  # etcd's view; only when a store is at hand
        hosts.update(urlsplit(u).hostname or "" for u in nodes.web_urls(store).values())
        hosts.update(str(r.value.get("ssh_host") or "") for r in store.list(store.keys.nodes)
                     if isinstance(r.value, dict))
    return {h for h in hosts if h}


def _host_of(endpoint: str) -> str:
    """The host of `host:port`, `[v6]:port` or a URL."""
    if "://" in endpoint:
        return urlsplit(endpoint).hostname or ""
    if endpoint.startswith("["):
        return endpoint[1:].split("]", 1)[0]
    return endpoint.rsplit(":", 1)[0] if endpoint.count(":") == 1 else endpoint


def _resolve_quietly(host: str) -> set[Address]:
    try:
        return set(resolve(host, 0))
    except Refused:
        return set()


def resolve(host: str, port: int) -> list[Address]:
    """The host's addresses (an address names itself); Refused when it has none."""
    try:
        return [_plain(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise Refused(f"the webhook's host {host} does not resolve ({exc}): check the URL's spelling") from None
    found = []
    for info in infos:
        address = _plain(ipaddress.ip_address(info[4][0].split("%", 1)[0]))
        if address not in found:
            found.append(address)
    return found


def _plain(address: Address) -> Address:
    """An IPv4-mapped address (`::ffff:127.0.0.1`) as the IPv4 address itself."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def embedded(address: Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, which a relay or gateway may
    deliver to: 6to4 (2002::/16), Teredo (2001::/32: server and client),
    NAT64 (64:ff9b::/96) and IPv4-compatible (::a.b.c.d)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = []
    if address.sixtofour:
        found.append(address.sixtofour)
    if address.teredo:
        found.extend(address.teredo)
    packed = address.packed
    if address in NAT64 or (packed[:12] == bytes(12) and int(address) > 0xFFFF):
        found.append(ipaddress.IPv4Address(packed[12:]))
    return found


def parse(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path with query) of a URL PINK may send to, or Refused."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS or any(c in url for c in "\r\n\t "):
        raise Refused(f"the webhook must be an http:// or https:// URL of at most {MAX_URL_CHARS} characters, "
                      "without spaces")
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise Refused(f"the webhook's scheme {parts.scheme or '(none)'!r} is not allowed: "
                      "use an http:// or https:// URL")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise Refused("the webhook's port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise Refused("the webhook URL has no host: use e.g. https://hooks.example.org/pink")
    if parts.username or parts.password:
        raise Refused("the webhook URL carries a user name or password: put a token in its path or "
                      "query instead (the signature already proves the sender)")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port, path


def why_refused(address: Address, policy: Policy) -> str | None:
    """Why `address` (or an IPv4 address it carries) may not receive a webhook; None when it may."""
    for inner in embedded(address):
        if why := _why_refused(inner, policy):
            return f"carries the IPv4 address {inner}, which {why}"
    return _why_refused(address, policy)


def _why_refused(address: Address, policy: Policy) -> str | None:
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved"):
        if getattr(address, f"is_{kind}"):
            return f"is a {kind.replace('_', '-')} address"
    if address in policy.own:
        return "is one of this PINK cluster's own addresses"
    if not address.is_global and not any(address in net for net in policy.allow_private):
        return ("is a private address (an operator may allow its network in "
                "[notifications] allow_private)")
    return None


def check(url: str, policy: Policy) -> Target:
    """The URL as a Target to send to, or Refused saying what is wrong and what to do.

    Every address the host resolves to must pass: a name with one public and
    one internal address is refused, whichever a later lookup would pick."""
    scheme, host, port, path = parse(url)
    addresses = resolve(host, port)
    for address in addresses:
        if why := why_refused(address, policy):
            named = host if host == str(address) else f"{host} ({address})"
            raise Refused(f"the webhook's host {named} {why}: PINK sends webhooks only to public "
                          "addresses outside the cluster; use a receiver reachable from the internet")
    return Target(url=url, scheme=scheme, host=host, port=port, path=path, address=str(addresses[0]))


def post(target: Target, data: bytes, headers: dict[str, str], config) -> Outcome:
    """Send `data` to the checked `target`; a 2xx answer is a delivery.

    `config` is `[notifications]`: connecting may take `connect_timeout`,
    and everything from the start of the try `connect_timeout + read_timeout`
    in all (`Watchdog`), however the receiver spaces its bytes."""
    deadline = config.connect_timeout + config.read_timeout
    with Watchdog(deadline) as watchdog:
        try:
            status, location, answer = _exchange(target, data, headers, config, watchdog)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if watchdog.fired:
                return Outcome(False, error=f"no complete answer within {deadline:g} s (the try's deadline)")
            return Outcome(False, error=f"{type(exc).__name__}: {exc}"[:500])
    if 200 <= status < 300:
        return Outcome(True, status=status)
    if 300 <= status < 400:
        where = (location or "(no Location)")[:200]
        return Outcome(False, status=status, error=f"redirect to {where} not followed: set the final URL")
    text = answer.decode("utf-8", "replace").strip().replace("\n", " ")[:200]
    return Outcome(False, status=status, error=f"HTTP {status}" + (f": {text}" if text else ""))


def _exchange(target: Target, data: bytes, headers: dict[str, str], config,
              watchdog: "Watchdog") -> tuple[int, str | None, bytes]:
    """One POST on a connection of our own: (status, Location, the answer's first bytes)."""
    sock = socket.create_connection((target.address, target.port), timeout=config.connect_timeout)
    watchdog.watch(sock)
    sock.settimeout(config.read_timeout)
    if target.scheme == "https":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host,
                                                        do_handshake_on_connect=False)
        watchdog.watch(sock)  # before the handshake, which a slow receiver may drag out too
        sock.do_handshake()
    host_header = target.host if ":" not in target.host else f"[{target.host}]"
    if target.port != DEFAULT_PORTS[target.scheme]:
        host_header += f":{target.port}"
    conn = http.client.HTTPConnection(target.address, target.port, timeout=config.read_timeout)
    conn.sock = sock  # already connected (and checked): http.client must not look the name up again
    try:
        conn.request("POST", target.path, body=data, headers={**headers, "Host": host_header})
        resp = conn.getresponse()
        answer = resp.read(config.max_response_bytes)
        return resp.status, resp.getheader("Location"), answer
    finally:
        conn.close()


class Watchdog:
    """Shuts a try's socket down once `seconds` have passed since the try began,
    which wakes any read blocked on it: a per-read timeout alone lets a
    receiver that sends a byte every few seconds hold the try for ever."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.fired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> "Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.fired:
                self._shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._socks:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:  # the plain socket's shutdown, also for a TLS one: no TLS close_notify from this thread
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass
