"""Where outputs live: each web node's output store, and a second copy on a peer.

A task's output is fetched from its runner by the finalize job into the
output store of the web node that runs it, then pushed to one other live web
node before the task is final, so that losing a web node loses no output.
The record lists both holders (`output.copies`); any web node serves a copy
it holds, or streams one from a live holder at the address that holder
announced in etcd.

Peers push to each other over HTTPS (`PUT /internal/v1/outputs/<name>`),
signed with the web nodes' shared secret key: the signature covers the file's
name, size and digest, and the receiver checks the bytes against them before
the file appears under its name. Names are checked against one pattern, so a
push can only ever write `<task>-<attempt>.tar.<ext>` inside the store.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import re
import shutil
import uuid
from typing import BinaryIO

import requests

from pink import archive, cooperative, nodes, sftp
from pink.errors import BadRequest, Forbidden, PinkError, Unavailable
from pink.store import Store
from pink.tasks import COMPRESSIONS, Task

log = logging.getLogger("pink.outputs")

PEER_PATH = "/internal/v1/outputs/"
NAME = re.compile(r"^[0-9a-f]{12}-[0-9]{1,4}(" + "|".join(re.escape(s) for s in COMPRESSIONS.values()) + r")$")
SIGNATURE_HEADER = "X-Pink-Peer-Signature"
DIGEST_HEADER = "X-Pink-SHA256"
PUSH_TIMEOUT = (5.0, 120.0)  # connect, and seconds without progress
CHUNK = 1 << 20
DISK_RESERVE = 1 << 30  # bytes a fetch leaves free on the output store (at most 1/20 of it)
COPY_CURSOR = "pink:copies-after:"  # Redis, per host: the last task id a second-copy pass tried
COPY_CURSOR_TTL = 86400  # a lost cursor only means starting over from the first id


class NoRoom(Unavailable):
    """The output store is too full for an export now: the finalize waits
    (backing off, the export safe in the runner's outbox) and may run on
    another web node meanwhile. Unavailable, not a reason to give up: the
    outputs filling the disk may be another user's, and expire
    (`retention.max_output_bytes_per_user`, `output_days`); an export that can
    never fit is Refused instead."""

    code = "no_room"


class Refused(PinkError):
    """An export this store can never take (over the per-task cap, or bigger
    than the whole filesystem): retrying cannot help, so its task fails."""

    code = "output_refused"


def room_for(output_dir: str, size: int, cap: int, host: str) -> None:
    """Check that an export of `size` bytes may be fetched into `output_dir` now.

    Raises Refused when it never can, NoRoom when the store is merely too
    full now (the finalize is tried again later, and nothing was written).
    """
    if size > cap:
        raise Refused(f"the export is {size} bytes, over the limit limits.output_bytes_per_task "
                      f"({cap} bytes): write less, or export only the path you need")
    disk = shutil.disk_usage(output_dir)
    reserve = min(DISK_RESERVE, disk.total // 20)
    if size + reserve > disk.total:
        raise Refused(f"the export is {size} bytes; the output store of web node {host} holds only "
                      f"{disk.total - reserve} bytes in all")
    if size + reserve > disk.free:
        raise NoRoom(f"web node {host} has {disk.free} bytes free for outputs, and the export needs "
                     f"{size} plus a reserve of {reserve}: tried again later")


def fetch(conn, remote: str, local: str, cap: int) -> tuple[int, str]:
    """Copy the runner's export to `local`; returns (bytes, sha256).

    The bytes are counted as they arrive, whatever size the runner claimed:
    past `cap` the copy stops (Refused). The part file goes whatever happens
    (a full disk included), so one failed fetch never leaves the store full.
    Raises FileNotFoundError when the runner has no such file.
    """
    conn.stat(remote)  # a missing export raises here: stream_from would read it as empty
    part = f"{local}.{uuid.uuid4().hex[:12]}.part"
    digest, size = hashlib.sha256(), 0
    try:
        with open(part, "wb") as out:
            for block in sftp.stream_from(conn, remote):
                size += len(block)
                if size > cap:
                    raise Refused(f"the export passed the limit limits.output_bytes_per_task ({cap} bytes) "
                                  "while it was fetched: write less, or export only the path you need")
                out.write(block)
                digest.update(block)
        os.replace(part, local)
    except OSError as exc:  # the part file goes below, whatever failed
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoRoom(f"storing the export in {os.path.dirname(local)} failed: {exc}") from exc
        raise
    finally:
        if os.path.exists(part):
            os.remove(part)
    return size, digest.hexdigest()


def stored_name(task: Task) -> str:
    """The file name of this attempt's output in every output store."""
    return f"{task.id}-{task.attempt}{COMPRESSIONS[task.params.compression]}"


def holders(output: dict) -> list[str]:
    """The web nodes holding a copy (records before copies name one host)."""
    return list(output.get("copies") or [output["host"]])


def local_path(output_dir: str, task: Task) -> str:
    """This node's copy of the task's output: named after the task and its
    attempt inside this node's store, whatever path the record holds."""
    return os.path.join(output_dir, stored_name(task))


def signature(secret: str, name: str, size: int, sha256: str) -> str:
    """HMAC over what the receiver checks, with a key of its own derived from
    the web nodes' secret (the same secret also signs Flask's sessions)."""
    key = hmac.new(secret.encode(), b"pink-peer-copy-v1", hashlib.sha256).digest()
    return hmac.new(key, f"{name}\n{size}\n{sha256}".encode(), hashlib.sha256).hexdigest()


def replicate(config, store: Store, path: str, size: int, sha256: str) -> str | None:
    """Push the output at `path` to one other live web node; returns that node's name.

    None when no other web node is up (a single-node cluster keeps one copy).
    Raises Unavailable when peers are up but none took it: the finalize is
    tried again rather than leave a task final with one copy it could have
    had two of.
    """
    peers = live_peers(config, store)
    return _push_to_one(config, peers, path, size, sha256) if peers else None


def live_peers(config, store: Store) -> dict[str, str]:
    """{host: URL} of the other web nodes that are up (their presence keys: a few etcd keys)."""
    return {host: url for host, url in nodes.web_urls(store).items() if host != config.host}


def add_missing_copies(config, store: Store, conn, redis, batch: int = 10) -> int:
    """Give outputs this node holds alone a second copy, now that a peer may be up.

    An output finalized while no other web node was up kept one copy; the
    sweep calls this each pass. With no peer up it reads nothing (no row, no
    file). Otherwise it tries one page of such rows, by index and in id
    order, from where the last pass stopped: the cursor lives in Redis
    (COPY_CURSOR, per host, a day), since each sweep is a job of its own, so
    rows that keep failing never hide the rows after them. The digest pushed
    is the one recorded at finalize (the receiver checks the bytes against
    it), so no output is hashed again. Returns how many got a copy.
    """
    peers = live_peers(config, store)
    if not peers:
        return 0  # the next sweep tries again
    key = COPY_CURSOR + config.host
    page = archive.single_copies(conn, config.host, (redis.get(key) or b"").decode(), batch)
    redis.set(key, page.after, ex=COPY_CURSOR_TTL)
    return sum(_second_copy(config, conn, peers, task) for task in page.tasks)


def _second_copy(config, conn, peers: dict[str, str], task: Task) -> bool:
    """Push one single-copy output to a peer and record it; False if it could not be."""
    path = local_path(config.web.output_dir, task)
    if not os.path.exists(path):  # no copy can ever come from here: the row is not read again
        log.warning("output of %s is recorded on %s but missing here; forgotten", task.id, config.host)
        archive.forget_file(conn, task.id)
        return False
    try:
        peer = _push_to_one(config, peers, path, task.output["size"], task.output["sha256"])
    except Unavailable as exc:
        log.warning("second copy of %s: %s", task.id, exc)
        return False
    archive.record_copy(conn, task.id, peer)
    return True


def _push_to_one(config, peers: dict[str, str], path: str, size: int, sha256: str) -> str:
    """Push to the first of `peers` (in the output's order) that takes it; raises Unavailable if none does."""
    name = os.path.basename(path)
    errors = []
    for host in _order(peers, name):
        try:
            _push(config, peers[host], path, name, size, sha256)
            return host
        except (requests.RequestException, PinkError) as exc:
            errors.append(f"{host}: {exc}")
            log.warning("pushing %s to %s failed: %s", name, host, exc)
    raise Unavailable(f"no other web node took a copy of {name}: " + "; ".join(errors))


def _order(peers: dict[str, str], name: str) -> list[str]:
    """Peers in an order fixed per output: copies spread over the web nodes."""
    return sorted(peers, key=lambda host: hashlib.sha256(f"{host}/{name}".encode()).digest())


def _push(config, url: str, path: str, name: str, size: int, sha256: str) -> None:
    headers = {SIGNATURE_HEADER: signature(config.web.secret_key, name, size, sha256),
               "Content-Type": "application/octet-stream", DIGEST_HEADER: sha256,
               "Content-Length": str(size)}
    with open(path, "rb") as body:
        resp = requests.put(url.rstrip("/") + PEER_PATH + name, data=body, headers=headers,
                            timeout=PUSH_TIMEOUT, verify=config.web.ca or True)
    if resp.status_code not in (200, 201):
        raise PinkError(f"answered {resp.status_code}: {resp.text[:200]}", code="peer_refused")


def receive(config, name: str, size: int, sha256: str, signed: str, body: BinaryIO) -> bool:
    """Store a peer's copy of an output; False if one with that digest was
    there already. Raises Forbidden (not signed with the cluster's secret) or
    BadRequest (not an output's name, or bytes that do not match)."""
    expected = signature(config.web.secret_key, name, size, sha256)
    if not config.web.secret_key or not hmac.compare_digest(expected, signed or ""):
        raise Forbidden("the copy is not signed by a web node of this cluster", code="not_a_peer")
    if not NAME.match(name):
        raise BadRequest(f"{name!r} is not the name of an output", code="bad_copy")
    final = os.path.join(config.web.output_dir, name)
    if os.path.exists(final) and os.path.getsize(final) == size and sha256_of(final) == sha256:
        while body.read(CHUNK):  # a retried finalize sends it again: read it, or the sender sees EOF
            cooperative.give_way()
        return False
    os.makedirs(config.web.output_dir, exist_ok=True)
    part = f"{final}.{uuid.uuid4().hex[:12]}.part"  # two pushes of one name never share a file
    digest, received = hashlib.sha256(), 0
    try:
        with open(part, "wb") as out:
            while chunk := body.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                cooperative.give_way()
        if received != size or digest.hexdigest() != sha256:
            raise BadRequest(f"the copy of {name} arrived as {received} of {size} bytes, or with "
                             "another digest", code="bad_copy")
        os.replace(part, final)
    finally:
        if os.path.exists(part):
            os.remove(part)
    return True


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            cooperative.give_way()
    return digest.hexdigest()
