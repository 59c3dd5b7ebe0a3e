"""SFTP to a runner's transfer account: copy images in, pull exports and logs out.

The account is key-only and chrooted to the runner's spool and outbox. Host
keys come from the configured known_hosts file and are never auto-accepted
(paramiko's RejectPolicy). Used by the transfer and finalize jobs and by the
web node when it tails a running task's log.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import multiprocessing
import os
import socket
import stat
import threading
import uuid
from typing import BinaryIO, Callable, Iterator

import paramiko

from pink.batched_channel import BatchedChannel
from pink.errors import Unavailable

_WINDOW = 64 * 2**20  # bytes: a large window keeps pipelined writes flowing
PARALLEL_MIN = 64 * 2**20  # bytes: smaller files are not worth a second process and login
CHUNK = 1 << 20  # bytes read from a file at a time when sending it over SFTP, and per log read
PREFETCH_REQUESTS = 128  # SFTP reads asked for at once while fetching (x 32 KiB: a 4 MiB window)
_SFTP_PACKETS_PER_WRITE = 8  # SSH packets per SFTP write request (8 x 32 KiB < OpenSSH's 256 KiB limit)


def connect(ssh_config, node: dict, timeout: float = 10.0) -> paramiko.SSHClient:
    """An SSH client to `node`'s transfer account, host key pinned."""
    client = paramiko.SSHClient()
    if ssh_config.known_hosts:
        client.load_host_keys(ssh_config.known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    where = f"{node['ssh_user']}@{node['ssh_host']}:{node['ssh_port']}"
    try:
        client.connect(node["ssh_host"], port=node["ssh_port"], username=node["ssh_user"],
                       key_filename=ssh_config.key or None, look_for_keys=False, allow_agent=False,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       disabled_algorithms=_prefer_cipher(ssh_config.cipher))
    except paramiko.SSHException as exc:
        client.close()
        raise Unavailable(f"cannot open SFTP to runner {node['name']} ({where}): {exc}") from exc
    except (OSError, socket.timeout) as exc:
        client.close()
        raise Unavailable(f"runner {node['name']} ({where}) is unreachable: {exc}") from exc
    client.get_transport().default_window_size = _WINDOW
    return client


def open_sftp(client: paramiko.SSHClient) -> paramiko.SFTPClient:
    """An SFTP session whose channel sends big writes in batches (pink.batched_channel)."""
    channel = client.get_transport().open_session()
    channel.invoke_subsystem("sftp")
    return paramiko.SFTPClient(BatchedChannel(channel))


def _prefer_cipher(cipher: str) -> dict:
    """Leave only the preferred cipher when paramiko knows it."""
    known = paramiko.Transport._preferred_ciphers
    if cipher and cipher in known:
        return {"ciphers": [c for c in known if c != cipher]}
    return {}


@contextlib.contextmanager
def _translated(node: dict) -> Iterator[None]:
    """Transport failures become Unavailable; a missing file stays FileNotFoundError."""
    try:
        yield
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise Unavailable(f"SFTP to runner {node['name']} failed: {exc}") from exc


@contextlib.contextmanager
def session(ssh_config, node: dict) -> Iterator[paramiko.SFTPClient]:
    """A new connection for one use, closed afterwards."""
    client = connect(ssh_config, node)
    try:
        with _translated(node):
            yield open_sftp(client)
    finally:
        client.close()


class Pool:
    """SSH connections to runners kept open between uses by one process.

    A login costs about 0.1 s here (key exchange), and a trivial task needs
    two or three of them; queue workers reuse connections instead. Each
    connection is lent to one user at a time; one that fails is closed and the
    next use logs in again.
    """

    def __init__(self, ssh_config):
        self._ssh = ssh_config
        self._idle: dict[tuple, tuple[paramiko.SSHClient, paramiko.SFTPClient]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def session(self, node: dict) -> Iterator[paramiko.SFTPClient]:
        key = (node["ssh_host"], node["ssh_port"], node["ssh_user"])
        with self._lock:
            entry = self._idle.pop(key, None)
        if entry is not None and not entry[0].get_transport().is_active():
            entry[0].close()
            entry = None
        if entry is None:
            client = connect(self._ssh, node)
            with _translated(node):
                entry = (client, open_sftp(client))
        try:
            with _translated(node):
                yield entry[1]
        except BaseException:
            entry[0].close()
            raise
        with self._lock:
            if self._idle.setdefault(key, entry) is not entry:
                entry[0].close()

    def close(self) -> None:
        with self._lock:
            for client, _ in self._idle.values():
                client.close()
            self._idle.clear()


def remote_size(sftp: paramiko.SFTPClient, path: str) -> int | None:
    """Bytes of the regular file at `path`; None when there is none (a link counts as none)."""
    try:
        attrs = sftp.lstat(path)
    except FileNotFoundError:
        return None
    return attrs.st_size if stat.S_ISREG(attrs.st_mode or 0) else None


Source = Callable[[], BinaryIO]  # opens what to send: a file, or an archive rebuilt from blobs


def local_file(path: str) -> Source:
    """A Source for a file on disk (picklable, for put_parallel's other processes)."""
    return functools.partial(open, path, "rb")


def source_size(source: Source) -> int:
    with source() as fh:
        return fh.seek(0, os.SEEK_END)


def put(sftp: paramiko.SFTPClient, source: Source, remote: str,
        progress: Callable[[int], None] | None = None) -> int:
    """Copy `source` to `remote` atomically: write a part file of its own, then rename."""
    part = _part_name(remote)
    with sftp.open(part, "wb") as dst:
        sent = _write_range(sftp, dst, source, 0, source_size(source), progress)
    sftp.posix_rename(part, remote)
    return sent


def put_stream(sftp: paramiko.SFTPClient, source: Source, remote: str) -> int:
    """`put` of a stream whose length is known only at its end (a compressed blob)."""
    part = _part_name(remote)
    with sftp.open(part, "wb") as dst:
        sent = _write_range(sftp, dst, source, 0, None)
    if sftp.stat(part).st_size != sent:  # a pipelined write refused (a full disk) is reported by no one else
        remove(sftp, part)
        raise Unavailable(f"SFTP copy to {remote} arrived short")
    sftp.posix_rename(part, remote)
    return sent


def _part_name(remote: str) -> str:
    """A part file no other copy of the same image writes to (two transfer
    jobs may send one image to one runner at once; each renames a whole file)."""
    return f"{remote}.{uuid.uuid4().hex[:12]}.part"


def put_parallel(conn: paramiko.SFTPClient, ssh_config, node: dict, source: Source, remote: str,
                 streams: int = 2) -> int:
    """`put` over `streams` connections: `conn` sends the first share, each
    other share goes from its own process and connection, writing at its
    offsets into one part file; then the same rename.

    One paramiko connection is bound by one Python thread (the GIL), so a
    second process is what lets a transfer use a second core. Files under
    PARALLEL_MIN, or streams < 2, go over `conn` alone.
    """
    size = source_size(source)
    if streams < 2 or size < PARALLEL_MIN:
        return put(conn, source, remote)
    part = _part_name(remote)
    bounds = [size * i // streams for i in range(streams + 1)]
    conn.open(part, "wb").close()  # created and emptied once, before any stream writes
    ctx = multiprocessing.get_context("spawn")  # no fork: the caller may hold threads (gRPC)
    with concurrent.futures.ProcessPoolExecutor(streams - 1, mp_context=ctx) as pool:
        others = [pool.submit(_put_range, ssh_config, node, source, part, bounds[i], bounds[i + 1])
                  for i in range(1, streams)]
        sent = _put_range_on(conn, source, part, bounds[0], bounds[1])
        sent += sum(f.result() for f in others)
    if sent != size or conn.stat(part).st_size != size:
        raise Unavailable(f"parallel SFTP to runner {node['name']} wrote {sent} of {size} bytes")
    conn.posix_rename(part, remote)
    return sent


def _put_range(ssh_config, node: dict, source: Source, part: str, start: int, end: int) -> int:
    """One stream of put_parallel, in its own process and connection."""
    with session(ssh_config, node) as conn:
        return _put_range_on(conn, source, part, start, end)


def _put_range_on(conn: paramiko.SFTPClient, source: Source, part: str, start: int, end: int) -> int:
    with conn.open(part, "r+") as dst:  # r+: neither creates nor truncates
        dst.seek(start)
        return _write_range(conn, dst, source, start, end)


def _write_range(sftp: paramiko.SFTPClient, dst: paramiko.SFTPFile, source: Source, start: int,
                 end: int | None, progress: Callable[[int], None] | None = None) -> int:
    """Write bytes [start, end) of `source` into the open `dst` at the same offsets
    (end None: to the end of the stream, which then starts at 0).

    paramiko's 32 KiB write requests, framed as SFTP messages, each overflow
    one SSH packet (the server's 32 KiB maximum less paramiko's 64-byte
    reserve) and go out as a full packet plus a ~100-byte one. Sizing each
    request so that its message fills whole packets halves the packet count
    and is most of what makes this as fast as OpenSSH here.
    """
    dst.set_pipelined(True)
    payload = sftp.get_channel().out_max_packet_size - 64  # what paramiko puts in one packet
    header = 4 + 1 + 4 + (4 + len(dst.handle)) + 8 + 4  # length, type, id, handle, offset, data length
    request = max(4096, _SFTP_PACKETS_PER_WRITE * payload - header)
    dst.MAX_REQUEST_SIZE = request  # the instance's own limit, read by SFTPFile._write
    read = request * max(1, CHUNK // request)
    sent = 0
    with source() as src:
        if start:
            src.seek(start)
        while end is None or sent < end - start:
            chunk = src.read(read if end is None else min(read, end - start - sent))
            if not chunk and end is None:
                break
            if not chunk:
                raise Unavailable("the image being copied shrank (a blob vanished?)")
            dst.write(chunk)
            sent += len(chunk)
            if progress:
                progress(sent)
    return sent


def get(sftp: paramiko.SFTPClient, remote: str, local: str) -> tuple[int, str]:
    """Copy `remote` to `local` via a part file of its own; returns (bytes, sha256)."""
    part = f"{local}.{uuid.uuid4().hex[:12]}.part"
    digest = hashlib.sha256()
    size = 0
    with sftp.open(remote, "rb") as src, open(part, "wb") as dst:
        for block in _blocks(src, src.stat().st_size):
            dst.write(block)
            digest.update(block)
            size += len(block)
    os.replace(part, local)
    return size, digest.hexdigest()


def _blocks(fh: paramiko.SFTPFile, end: int) -> Iterator[bytes]:
    """`fh` from its position to its end, read ahead PREFETCH_REQUESTS
    requests at a time, handed over one SFTP read at a time.

    paramiko's `read(n)` for n above one request's size joins the replies by
    repeated concatenation (a 1 MiB read copied about 16 MiB; a 512 MiB
    export took minutes to fetch); a read of one request's size is one reply,
    without a copy. Its read-ahead for a whole file asks for all of it at once
    and holds what arrives (memory = the file); capped with
    `max_concurrent_requests`, it counts itself done whenever the replies in
    flight are all in, and the rest of the file then arrives unread into
    memory while reads go one round trip at a time. So each window of
    requests is asked for at once and read to its end before the next.
    Bytes appended after `end` (a log still written) are read after it.
    """
    step = fh.MAX_REQUEST_SIZE
    position = fh.tell()
    while position < end:
        window_end = min(end, position + PREFETCH_REQUESTS * step)
        fh.prefetch(window_end)
        while position < window_end:
            block = fh.read(min(step, window_end - position))
            if not block:
                return
            position += len(block)
            yield block
    while block := fh.read(step):
        yield block


def read_from(sftp: paramiko.SFTPClient, remote: str, offset: int,
              limit: int = CHUNK) -> bytes:
    """Up to `limit` bytes `remote` holds past `offset` (b"" when it is gone or unchanged)."""
    try:
        with sftp.open(remote, "rb") as fh:
            fh.seek(offset)
            return fh.read(limit)
    except FileNotFoundError:
        return b""


def stream_from(sftp: paramiko.SFTPClient, remote: str, offset: int = 0) -> Iterator[bytes]:
    """`remote` past `offset` in chunks, as far as it reaches now: memory stays flat."""
    try:
        fh = sftp.open(remote, "rb")
    except FileNotFoundError:
        return
    with fh:
        fh.seek(offset)
        yield from _blocks(fh, fh.stat().st_size)


def read_tail(sftp: paramiko.SFTPClient, remote: str, limit: int) -> tuple[bytes, int]:
    """The last `limit` bytes of `remote` and how many bytes before them were left out.

    Raises FileNotFoundError when it is gone. Reads in chunks: a log of any
    size costs at most `limit` bytes of memory.
    """
    size = sftp.stat(remote).st_size
    start = max(0, size - limit)
    parts, kept = [], 0
    with sftp.open(remote, "rb") as fh:
        fh.seek(start)
        for block in _blocks(fh, size):  # to the end: a log that grew meanwhile is cut to `limit`
            parts.append(block[:limit - kept])
            kept += len(parts[-1])
    return b"".join(parts), start


def remove(sftp: paramiko.SFTPClient, *paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            sftp.remove(path)
