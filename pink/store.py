"""All of PINK's etcd access: keys, JSON records, transactions, leases, watches.

etcd is the authority for live state. Every key PINK writes is built here
(`Keys`), and every change goes through `Txn`, a compare-and-swap on the
mod_revision of the records it read, optionally fenced by the create_revision
of a lease-bound key (a runner's node key or the leader key), so two actors
can never both move a task. No other module imports the etcd client, so the
client library can change in one place; its errors become `Unavailable`.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc
from pyetcd.events import DeleteEvent

from pink.errors import ConfigError, PinkError, Unavailable
from pink.tasks import Task


class Keys:
    """Every etcd key PINK uses, under one configurable prefix.

    Each family of keys is a directory (an attribute: what a range read
    lists) and a method naming one key in it."""

    def __init__(self, prefix: str):
        self.prefix = prefix.rstrip("/")
        self.tasks = f"{self.prefix}/tasks/"
        self.nodes = f"{self.prefix}/nodes/"
        # A node's reservations: {task_id: {"gpus": [...], "attempt": n}}.
        self.allocs = f"{self.prefix}/alloc/"
        # A web node's presence: `{host, url, since}`, bound to a lease its pink-web keeps.
        self.webs = f"{self.prefix}/web/"
        # An operator's wish for a node (drain, stop); outlives the runner's lease.
        self.controls = f"{self.prefix}/control/"
        self.leader = f"{self.prefix}/leader"
        # The leader's summary of the queue: each waiting task's position and reason.
        self.queue = f"{self.prefix}/queue"
        # Each sweep's live indexes: `sweeps/<sweep>/<task>` (see `sweep`).
        self.sweeps = f"{self.prefix}/sweeps/"

    def task(self, task_id: str) -> str:
        return self.tasks + task_id

    def node(self, name: str) -> str:
        return self.nodes + name

    def alloc(self, node: str) -> str:
        return self.allocs + node

    def web(self, host: str) -> str:
        return self.webs + host

    def control(self, node: str) -> str:
        return self.controls + node

    def assignments(self, node: str) -> str:
        return f"{self.prefix}/assign/{node}/"

    def assignment(self, node: str, task_id: str) -> str:
        return self.assignments(node) + task_id

    def owned(self, user: str) -> str:
        """A user's index of live tasks, one entry each (`{"size": image bytes}`):
        created and removed in the same transactions as the task record, so
        per-user limits read one user's entries instead of every live task."""
        return f"{self.prefix}/owners/{user}/"

    def owner(self, user: str, task_id: str) -> str:
        return self.owned(user) + task_id

    def gate(self, user: str) -> str:
        """Rewritten by every task creation of `user` and compared by the next: two
        submits counting the same index cannot both pass a limit."""
        return f"{self.prefix}/gates/{user}"

    def idempotencies(self, user: str) -> str:
        """A user's Idempotency-Keys (by their digest): `{"task", "fingerprint"}`, leased for a day."""
        return f"{self.prefix}/idem/{user}/"

    def idempotency(self, user: str, digest: str) -> str:
        return self.idempotencies(user) + digest

    def sweep(self, sweep_id: str) -> str:
        """A sweep's index of live tasks, one entry each (`{"index": n}`): created and
        removed with the task record, like `owned`, so a sweep is read without scanning."""
        return f"{self.sweeps}{sweep_id}/"

    def sweep_member(self, sweep_id: str, task_id: str) -> str:
        return self.sweep(sweep_id) + task_id


@dataclass
class Record:
    """A JSON value read from etcd with the revisions a CAS needs."""

    key: str
    value: Any
    mod_revision: int
    create_revision: int
    lease: int = 0


log = logging.getLogger("pink.store")
_ETCD_ERRORS = (etcd_exc.Etcd3Exception, grpc.RpcError)
LIST_PAGE = 100  # keys per range read: a page of task records (at most ~100 KiB each) is ~10 MiB at worst
MAX_ANSWER = 64 * 2**20  # bytes of one etcd answer we accept (gRPC's default, 4 MiB, is below a full page)
SMALL_PAGE = 1000  # keys per range read of small values (index entries, idempotency keys)
ENDPOINT_RETRY = 1.0  # seconds before an endpoint that failed is tried again
LEASE_MARGIN = 0.8  # fraction of a TTL without a successful refresh after which a lease counts as lost


def encode(value: Any) -> str:
    """JSON for etcd; typed records (`Task`) give their JSON shape."""
    return json.dumps(value.to_json() if isinstance(value, Task) else value, sort_keys=True)


def _guard(fn):
    """Translate the client's errors into PINK's `Unavailable` at one boundary,
    after moving the client off the member that failed."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _ETCD_ERRORS as exc:
            _move_off_failed(_client_of(fn, args))
            raise Unavailable(f"etcd is unreachable: {exc}") from exc

    return wrapper


def _client_of(fn, args) -> "pyetcd.MultiEndpointEtcd3Client | None":
    """The etcd client behind a guarded call: a Store's or a Txn's method, or the client's own."""
    target = getattr(fn, "__self__", None) or (args[0] if args else None)
    if isinstance(target, Txn):
        target = target._store
    return target._client if isinstance(target, Store) else target


def _move_off_failed(client) -> None:
    """Point the client at a member not marked failed, now.

    pyetcd marks the member a call failed on and moves off it only at the
    next call, and only while the mark lasts (ENDPOINT_RETRY): a process whose
    next call comes later than that (a leader campaigning once a second, a
    lease refreshed every few seconds) goes back to the dead member every time
    and never reaches the live ones. Its `channel` property moves on when the
    current member is marked; with every member marked, the next call tries
    again."""
    if isinstance(client, pyetcd.MultiEndpointEtcd3Client):
        try:
            client.channel
        except Exception:  # noqa: BLE001 - no member available now: the next call tries again
            pass


def _guard_read(fn):
    """`_guard` for a read, tried once more when it fails: pyetcd marks the
    endpoint that failed and raises, and only the next call goes to another
    member, so without this the first read after a member dies fails for
    every client (a web node would answer 503 with four members healthy).
    Writes are not retried: a transaction may have committed before its
    answer was lost."""

    guarded = _guard(fn)

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if len(self._endpoints) > 1:
            try:
                return fn(self, *args, **kwargs)
            except _ETCD_ERRORS as exc:
                log.warning("etcd read failed (%s); trying another member", exc)
        return guarded(self, *args, **kwargs)

    return wrapper


def _prefix_end(prefix: str) -> bytes:
    """The first key after every key starting with `prefix` (etcd's range_end)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # prefixes here end in "/" or a letter, never 0xff
    return bytes(raw)


class Txn:
    """A compare-and-swap over several keys, committed at once or not at all."""

    def __init__(self, store: "Store"):
        self._store = store
        self._compare = []
        self._ops = []

    def expect(self, record_or_key, mod_revision: int | None = None) -> "Txn":
        """Succeed only if the key is unchanged since it was read (0: absent)."""
        t = self._store._client.transactions
        if isinstance(record_or_key, Record):
            key, rev = record_or_key.key, record_or_key.mod_revision
        else:
            key, rev = record_or_key, mod_revision or 0
        self._compare.append(t.mod(key) == rev)
        return self

    def expect_value(self, key: str, value: Any) -> "Txn":
        """Succeed only if the key holds `value` (as `encode` writes it)."""
        self._compare.append(self._store._client.transactions.value(key) == encode(value))
        return self

    def fence(self, key: str, create_revision: int) -> "Txn":
        """Succeed only while the lease-bound key is the incarnation we hold."""
        self._compare.append(self._store._client.transactions.create(key) == create_revision)
        return self

    def put(self, key: str, value: Any, lease: int = 0) -> "Txn":
        self._ops.append(self._store._client.transactions.put(key, encode(value), lease=lease or None))
        return self

    def delete(self, key: str) -> "Txn":
        self._ops.append(self._store._client.transactions.delete(key))
        return self

    @_guard
    def commit(self) -> bool:
        ok, _ = self._store._client.transaction(compare=self._compare, success=self._ops, failure=[])
        return ok


class LeaseGone(PinkError):
    """The lease an earlier process held has expired: nothing bound to it can be taken over."""


class Lease:
    """A lease kept alive by a thread; `lost` is set once it may have expired.

    A failed refresh is retried (the client fails over to another endpoint
    on the next call): one lost request or one etcd member restarting must
    not cost a runner its tasks. But once a whole TTL (less a margin) has
    passed since the last successful refresh, etcd may have expired the lease
    and handed the work to someone else: `lost` is set, and holders must stop
    acting on anything bound to the lease.
    """

    def __init__(self, store: "Store", ttl: int, lease_id: int | None = None):
        self.ttl = ttl
        self._client = store._client
        if lease_id is None:
            self._lease = store._guarded(store._client.lease, ttl)
        else:  # an earlier process's lease, taken over: it must still be alive
            self._lease = pyetcd.leases.Lease(lease_id, ttl, store._client)
            responses = store._guarded(self._lease.refresh)
            if not responses or responses[0].TTL <= 0:
                raise LeaseGone(f"lease {lease_id:x} has expired")
        self.id = self._lease.id
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep_alive, daemon=True, name="lease")
        self._thread.start()

    def _keep_alive(self):
        renewed = time.monotonic()
        while not self._stop.wait(self.ttl / 6):
            try:
                responses = self._lease.refresh()
                if not responses or responses[0].TTL <= 0:
                    self.lost.set()  # etcd says it is gone: no point retrying
                    return
                renewed = time.monotonic()
            except Exception:  # noqa: BLE001 - retried until the lease may have expired
                _move_off_failed(self._client)
                if time.monotonic() - renewed >= self.ttl * LEASE_MARGIN:
                    self.lost.set()
                    return

    def revoke(self):
        self._stop.set()
        try:
            self._lease.revoke()
        except _ETCD_ERRORS:
            pass

    def stop(self):
        """Stop refreshing without revoking (the lease then expires on its own)."""
        self._stop.set()

    def hand_over(self):
        """Stop refreshing after one last refresh: the lease then lasts a whole
        TTL, for the next process to take over (`Store.lease(ttl, lease_id)`)."""
        self._stop.set()
        try:
            self._lease.refresh()
        except _ETCD_ERRORS:
            pass


def _tls_credentials(ca: str, cert: str, key: str) -> grpc.ChannelCredentials | None:
    """gRPC credentials for etcd's TLS (None: plain HTTP). With a client
    certificate, etcd's authentication takes the user from its CN."""
    if not ca:
        if cert or key:
            raise ConfigError("[etcd] cert and key need ca (etcd's CA certificate)")
        return None
    if bool(cert) != bool(key):
        raise ConfigError("[etcd] cert and key go together (the client certificate and its key)")
    try:
        files = [Path(p).read_bytes() if p else None for p in (ca, key, cert)]
    except OSError as exc:
        raise ConfigError(f"[etcd] cannot read a TLS file: {exc}") from exc
    return grpc.ssl_channel_credentials(*files)


class Store:
    def __init__(self, endpoints: list[str], prefix: str, timeout: float = 5.0,
                 ca: str = "", cert: str = "", key: str = ""):
        self.keys = Keys(prefix)
        self._timeout = timeout
        self._endpoints = endpoints
        self._credentials = _tls_credentials(ca, cert, key)
        self._client = self._connect()
        self.keys_read = 0  # keys every read so far returned: what a request path costs, counted exactly

    def _connect(self):
        # pyetcd marks an endpoint failed on the first timeout and, by default,
        # refuses to use it again for 300 s; a partitioned runner or leader must
        # instead try again as soon as the network may be back.
        endpoints = []
        for ep in self._endpoints:
            host, port = ep.rsplit(":", 1)
            endpoints.append(pyetcd.Endpoint(host, int(port), secure=self._credentials is not None,
                                             creds=self._credentials, time_retry=ENDPOINT_RETRY,
                                             opts=[("grpc.max_receive_message_length", MAX_ANSWER)]))
        return pyetcd.MultiEndpointEtcd3Client(endpoints=endpoints, timeout=self._timeout, failover=True)

    @classmethod
    def from_config(cls, config) -> "Store":
        etcd = config.etcd
        return cls(etcd.endpoints, etcd.prefix, ca=etcd.ca, cert=etcd.cert, key=etcd.key)

    def close(self):
        self._client.close()

    @staticmethod
    def _guarded(fn, *args, **kwargs):
        return _guard(fn)(*args, **kwargs)

    # -- reading ---------------------------------------------------------

    def _decode(self, key: str, raw: bytes) -> Any:
        """The value of `key`: a `Task` under the tasks prefix, plain JSON elsewhere.

        A value that is not what its key should hold (written by hand, or by
        a bug) raises `PinkError`; `list` and the mirror skip it, so one bad
        record cannot stop the leader or a listing.
        """
        try:
            value = json.loads(raw)
            return Task.from_json(value) if key.startswith(self.keys.tasks) else value
        except Exception as exc:  # noqa: BLE001 - whatever shape it has, it is not a record
            raise PinkError(f"the record at {key} is malformed ({type(exc).__name__}: {exc}); "
                            "delete it with etcdctl", code="malformed_record") from None

    def _decoded(self, key: str, raw: bytes, make) -> Record | None:
        """make(value) for a record read in a batch; None (and a warning) for a malformed one."""
        try:
            return make(self._decode(key, raw))
        except PinkError as exc:
            log.warning("%s", exc.message)
            return None

    def _record(self, value: bytes, meta) -> Record:
        key = meta.key.decode()
        return Record(key=key, value=self._decode(key, value), mod_revision=meta.mod_revision,
                      create_revision=meta.create_revision, lease=meta.lease_id)

    @_guard_read
    def get(self, key: str) -> Record | None:
        value, meta = self._client.get(key)
        self.keys_read += meta is not None
        return None if meta is None else self._record(value, meta)

    @_guard_read
    def get_many(self, keys: list[str]) -> list[Record]:
        """The records of those of `keys` that exist, a transaction of reads per LIST_PAGE keys."""
        t, out = self._client.transactions, []
        for start in range(0, len(keys), LIST_PAGE):
            _, responses = self._client.transaction(compare=[], failure=[], success=[
                t.get(k) for k in keys[start:start + LIST_PAGE]])
            for found in responses:
                self.keys_read += len(found)
                out.extend(self._record(value, meta) for value, meta in found)
        return out

    def list(self, prefix: str, page: int = LIST_PAGE) -> list[Record]:
        """Every record under `prefix`, read in pages at one revision.

        One range read of everything would fail once the answer passed
        gRPC's 4 MiB message limit; pages of LIST_PAGE keys never do, and
        reading them all at the first page's revision keeps the view consistent.
        Small values may be read in bigger pages (SMALL_PAGE).
        """
        return self.list_at(prefix, page)[0]

    @_guard_read
    def list_at(self, prefix: str, page: int = LIST_PAGE) -> tuple[list[Record], int]:
        """`list`, and the revision it read at (a watch continues from the next one)."""
        end = _prefix_end(prefix)
        start, revision, out = prefix, None, []
        while True:
            resp = self._client.get_range_response(start, end, sort_order="ascend", sort_target="key",
                                                   limit=page, revision=revision)
            revision = revision or resp.header.revision
            self.keys_read += len(resp.kvs)
            for kv in resp.kvs:
                key = kv.key.decode()
                rec = self._decoded(key, kv.value, lambda value: Record(
                    key=key, value=value, mod_revision=kv.mod_revision, create_revision=kv.create_revision,
                    lease=kv.lease))
                if rec is not None:
                    out.append(rec)
            if not resp.more or not resp.kvs:
                return out, revision
            start = resp.kvs[-1].key + b"\0"

    @_guard_read
    def keys_under(self, prefix: str, page: int = SMALL_PAGE) -> list[str]:
        """The keys under `prefix` without their values (cheap: an index's entries), in pages."""
        end = _prefix_end(prefix)
        start, revision, out = prefix, None, []
        while True:
            resp = self._client.get_range_response(start, end, sort_order="ascend", sort_target="key",
                                                   limit=page, revision=revision, keys_only=True)
            revision = revision or resp.header.revision
            self.keys_read += len(resp.kvs)
            out.extend(kv.key.decode() for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return out
            start = resp.kvs[-1].key + b"\0"

    @_guard
    def ping(self) -> None:
        self._client.status()

    # -- writing ---------------------------------------------------------

    def txn(self) -> Txn:
        return Txn(self)

    def create(self, key: str, value: Any, lease: int = 0) -> bool:
        """Put a record only if the key does not exist yet."""
        return self.txn().expect(key, 0).put(key, value, lease).commit()

    @_guard
    def delete(self, key: str) -> None:
        self._client.delete(key)

    def lease(self, ttl: int, lease_id: int | None = None) -> Lease:
        """A new lease kept alive; with `lease_id`, an existing one taken
        over (`LeaseGone` if it has expired)."""
        return Lease(self, ttl, lease_id)

    @_guard
    def grant(self, ttl: int) -> int:
        """A lease nobody refreshes (its keys go after `ttl` seconds); its id."""
        return self._client.lease(ttl).id

    @_guard
    def revoke(self, lease_id: int) -> None:
        self._client.revoke_lease(lease_id)

    @_guard
    def lease_ttl(self, lease_id: int) -> tuple[int, int]:
        """(seconds left, seconds granted) of a lease; (-1, 0) once it is gone."""
        info = self._client.get_lease_info(lease_id)
        return info.TTL, info.grantedTTL

    def create_task(self, task: Task, gate: Record | None, idempotency: tuple[str, dict, int] | None = None,
                    evict: list[str] = ()) -> bool:
        """Record a new task with its owner's index entry, in one transaction that
        also rewrites the owner's gate as the caller read it (`gate`; None:
        absent): a concurrent creation by the same user fails this one, which
        counts again. `idempotency`: (key, value, lease) written only if the key
        is absent; `evict`: the owner's oldest idempotency keys, deleted to keep
        their number bounded."""
        keys = self.keys
        txn = self.txn().expect(keys.task(task.id), 0)
        txn.expect(gate) if gate else txn.expect(keys.gate(task.user), 0)
        txn.put(keys.task(task.id), task)
        txn.put(keys.owner(task.user, task.id), {"size": task.image["size"]})
        txn.put(keys.gate(task.user), {"last": task.id})
        if idempotency:
            key, value, lease = idempotency
            txn.expect(key, 0).put(key, value, lease)
        for key in evict:
            txn.delete(key)
        return txn.commit()

    def create_sweep_tasks(self, tasks: list[Task], gate: Record | None, after: str | None = None,
                           idempotency: tuple[str, dict, int] | None = None) -> bool:
        """Record some indexes of one sweep (at most ~40: etcd allows 128 operations
        a transaction), each with its owner's and its sweep's index entries. The
        gate is compared and rewritten: as read (`gate`; None: absent) for the
        first chunk, else (`after`) as the previous chunk left it, naming that
        chunk's last task: a creation by the same user in between fails the
        chunk. The image's bytes count once for the user (on the first index
        written), as its blobs are kept once."""
        keys, user = self.keys, tasks[0].user
        txn = self.txn()
        if after is not None:
            txn.expect_value(keys.gate(user), {"last": after})
        else:
            txn.expect(gate) if gate else txn.expect(keys.gate(user), 0)
        for task in tasks:
            mark = task.extra["sweep"]
            txn.expect(keys.task(task.id), 0).put(keys.task(task.id), task)
            txn.put(keys.owner(user, task.id), {"size": task.image["size"] if mark["index"] == 0 else 0})
            txn.put(keys.sweep_member(mark["id"], task.id), {"index": mark["index"]})
        txn.put(keys.gate(user), {"last": tasks[-1].id})
        if idempotency:
            key, value, lease = idempotency
            txn.expect(key, 0).put(key, value, lease)
        return txn.commit()

    # -- watching --------------------------------------------------------

    def _watch(self, prefix: str, callback: Callable, **options) -> Callable[[], None]:
        """Watch every key under `prefix`; returns the watch's cancel.

        The cancel goes through the watcher that holds the watch: after a
        call fails on a member, pyetcd makes a new watcher, and a cancel sent
        through that one reaches nothing and leaves the old stream open."""
        watcher = self._client.watcher
        watch_id = watcher.add_callback(prefix, callback, range_end=_prefix_end(prefix), **options)

        def cancel() -> None:
            try:
                watcher.cancel(watch_id)
            except Exception:  # noqa: BLE001 - the watch may already be gone
                pass

        return cancel

    def watch_prefix(self, prefix: str, on_change: Callable[[], None],
                     deletes: bool = True) -> Callable[[], None]:
        """Call `on_change` (no arguments) whenever a key under `prefix` changes
        (with `deletes=False`, is written: etcd leaves deletions out, for a
        watcher that acts only on new keys).

        Callers treat a call as a hint to re-read, never as the data itself,
        and also poll: a watch can silently drop, a periodic read cannot.
        Returns a function that cancels the watch.
        """

        def callback(_response):
            on_change()

        try:
            return self._watch(prefix, callback, filters=None if deletes else [etcdrpc.WatchCreateRequest.NODELETE])
        except _ETCD_ERRORS:
            return lambda: None

    def mirror(self, parts: tuple[str, ...], on_change: Callable[[], None]) -> "Mirror":
        return Mirror(self, parts, on_change)


_GONE = Record(key="", value=None, mod_revision=0, create_revision=0)


class Mirror:
    """Every record under some of PINK's prefixes, kept current by one etcd watch.

    The leader plans the whole live queue on every change; reading 10,000
    live tasks from etcd for each pass cost seconds. A mirror reads them once
    (`Store.list_at`), then applies the watch's events from the next revision
    on. One watch over PINK's root delivers every change in revision order,
    a transaction's events together, so a snapshot is etcd's state at one
    revision: a task never names a runner epoch the mirror has not seen yet.
    When the watch fails (a member went away, etcd compacted the revision
    it needed) the mirror is stale and `fresh()` reads everything again.
    """

    def __init__(self, store: Store, parts: tuple[str, ...], on_change: Callable[[], None]):
        self._store = store
        self._parts = parts  # prefixes held, e.g. store.keys.tasks; other keys' events are dropped
        self._on_change = on_change
        self._records: dict[str, dict[str, Record]] = {p: {} for p in parts}
        self._cond = threading.Condition()
        self._stale = True
        self._cancel: Callable[[], None] = lambda: None
        self._generation = 0  # of the current watch: a cancelled one's late callbacks are dropped

    @property
    def stale(self) -> bool:
        return self._stale

    def invalidate(self) -> None:
        """Read everything again on the next `fresh()` (a periodic check against silent drops)."""
        self._stale = True

    def fresh(self) -> None:
        """Make sure the mirror follows etcd: after a failed watch, read and watch again."""
        if not self._stale:
            return
        self._cancel()
        root = self._store.keys.prefix + "/"
        records, revision = self._store.list_at(root)
        with self._cond:
            self._generation += 1
            generation = self._generation
            self._records = {p: {} for p in self._parts}
            for rec in records:
                self._hold(rec.key, rec)
            self._stale = False
        try:
            self._cancel = self._store._watch(root, lambda response: self._apply(generation, response),
                                              start_revision=revision + 1)
        except _ETCD_ERRORS as exc:
            self._stale = True
            raise Unavailable(f"etcd is unreachable: cannot watch {root}: {exc}") from exc

    def close(self) -> None:
        self._cancel()
        self._stale = True

    def snapshot(self) -> dict[str, list[Record]]:
        """Every record held, by prefix, all at one revision."""
        with self._cond:
            return {p: list(held.values()) for p, held in self._records.items()}

    def wait_past(self, written: list[tuple[str, int]], timeout: float) -> bool:
        """Wait until the mirror has seen each (key, mod_revision as read) change:
        the caller's own writes. False if it has not within `timeout`."""

        def seen() -> bool:
            return self._stale or all(self._held(key).get(key, _GONE).mod_revision != rev for key, rev in written)

        with self._cond:
            return self._cond.wait_for(seen, timeout)

    def _held(self, key: str) -> dict[str, Record]:
        return next((held for part, held in self._records.items() if key.startswith(part)), {})

    def _hold(self, key: str, rec: Record | None) -> bool:
        for part in self._parts:
            if key.startswith(part):
                if rec is None:
                    self._records[part].pop(key, None)
                else:
                    self._records[part][key] = rec
                return True
        return False

    def _apply(self, generation: int, response) -> None:
        """Apply one watch response; an error, or the end of the stream (None), makes the mirror stale."""
        changed = False
        with self._cond:
            if generation != self._generation:
                return  # a watch already replaced (after a failover its cancel may not have reached it)
            try:
                if response is None or isinstance(response, Exception):
                    raise RuntimeError(f"the watch ended: {response}")
                for event in response.events:
                    changed |= self._event(event)
            except Exception as exc:  # noqa: BLE001 - whatever went wrong, read everything again
                log.warning("etcd watch of %s: %s; reading everything again", self._store.keys.prefix, exc)
                self._stale = True
                changed = True
            self._cond.notify_all()
        if changed:
            self._on_change()

    def _event(self, event) -> bool:
        """Apply one change; True if it was to a part held. Changes no newer than
        what is held (a late event of an older watch) are ignored."""
        key = event.key.decode()
        if not key.startswith(self._parts):
            return False  # the leader key, the queue summary, assignments: not held, not decoded
        held = self._held(key).get(key)
        if held is not None and event.mod_revision <= held.mod_revision:
            return False
        rec = None if isinstance(event, DeleteEvent) else self._store._decoded(
            key, event.value, lambda value: Record(key=key, value=value, mod_revision=event.mod_revision,
                                                   create_revision=event.create_revision, lease=event.lease))
        return self._hold(key, rec)
