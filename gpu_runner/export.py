"""Exporting a finished container's filesystem, one path of it, or only what
the task changed, compressed.

The tar stream from Docker goes straight through the compressor into the
outbox, so memory stays flat whatever the size. The file is created through
`outbox.create` (the transfer account may have planted a link at its name)
and measured by descriptor. Called by execution.

`changes` keeps what `docker diff` says the task added or modified, and adds
CHANGES_MANIFEST: the deleted paths and each kept file's size and sha256.
The diff is the container's own layer, so it is the same whatever the end
(succeeded, failed, timed out or cancelled): a 10 GB CUDA base is read once
through, but neither compressed, stored nor sent.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import zstandard

from docker.errors import NotFound

from gpu_runner import outbox

CHUNK = 1 << 20
CHANGES_MANIFEST = ".pink-changes.json"  # in a `changes` output, after the files
DIFF_KINDS = {0: "modified", 1: "added", 2: "deleted"}  # docker diff's Kind


class TooBig(ValueError):
    """The export passed `limits.output_bytes_per_task`: its task fails."""


class _Capped:
    """Counts the compressed bytes on their way to `raw` and refuses past
    `limit`: a task writing without end must not fill the runner's disk
    (nor, later, a web node's)."""

    def __init__(self, raw, limit: int):
        self.raw, self.limit, self.written = raw, limit, 0

    def write(self, data) -> int:
        self.written += len(data)
        if self.written > self.limit:
            raise TooBig(f"the export passed the limit limits.output_bytes_per_task ({self.limit} bytes) "
                         f"at {self.written} bytes and was stopped: write less, or export only the path "
                         "you need")
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _compressor(raw, compression: str):
    """A writer compressing into `raw`; closing it leaves `raw` open.

    zstd level 1: level 3 compressed a container's files at half the speed
    (63 against 138 MB/s a core on the bench machine) for 9% fewer bytes,
    and every task's export pays it on the runner's cores.
    """
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3)
    return zstandard.ZstdCompressor(level=1, threads=-1).stream_writer(raw, closefd=False)


class _ChunkReader(io.RawIOBase):
    """A file over Docker's iterator of chunks, for tarfile's stream mode."""

    def __init__(self, chunks):
        self._chunks, self._rest = iter(chunks), memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._rest:
            try:
                self._rest = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._rest))
        buffer[:n], self._rest = self._rest[:n], self._rest[n:]  # views: no copy of the rest
        return n


def _container_path(name: str) -> str:
    """`/etc/x` for a member named `etc/x`, `./etc/x` or `etc/x/`."""
    return "/" + (name[2:] if name.startswith("./") else name).strip("/")


class _Hashing:
    """Reads through to `src`, hashing what passes (tarfile copies a member's data with it)."""

    def __init__(self, src):
        self.src, self.digest = src, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        block = self.src.read(size)
        self.digest.update(block)
        return block


def write_changes(container, writer) -> None:
    """Write, as a tar into `writer`, what the task changed and CHANGES_MANIFEST.

    Both tars are streams, and their member lists are emptied as they go, so
    memory stays flat over a base image of a million files. A task that
    changed nothing skips Docker's export (a read of the whole base) altogether.
    """
    diff = container.diff() or []
    kept = {d["Path"]: DIFF_KINDS.get(d["Kind"], "modified") for d in diff if d["Kind"] in (0, 1)}
    manifest = {"changed": [], "deleted": sorted(d["Path"] for d in diff if d["Kind"] == 2)}
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as out:
        if kept:
            _copy_kept(container, kept, out, manifest["changed"])
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        info = tarfile.TarInfo(CHANGES_MANIFEST)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        out.addfile(info, io.BytesIO(data))


def _copy_kept(container, kept: dict[str, str], out: tarfile.TarFile, changed: list[dict]) -> None:
    """Copy the members of the container's export named in `kept` into `out`,
    with an entry for each in `changed`."""
    with tarfile.open(fileobj=_ChunkReader(container.export(chunk_size=CHUNK)), mode="r|") as source:
        while (member := source.next()) is not None:
            source.members.clear()
            path = _container_path(member.name)
            if path not in kept:
                continue
            entry = {"path": path, "change": kept[path], "type": _kind(member)}
            if member.isfile():
                data = _Hashing(source.extractfile(member))
                out.addfile(member, data)
                entry.update(size=member.size, sha256=data.digest.hexdigest())
            else:
                out.addfile(member)
                if member.issym() or member.islnk():
                    entry["target"] = member.linkname
            out.members.clear()
            changed.append(entry)


def _kind(member: tarfile.TarInfo) -> str:
    return ("file" if member.isfile() else "dir" if member.isdir() else "symlink" if member.issym()
            else "hardlink" if member.islnk() else "other")


def _stream(container, output: str):
    if output == "full":
        return container.export(chunk_size=CHUNK)
    try:
        stream, _stat = container.get_archive(output, chunk_size=CHUNK)
    except NotFound:
        raise ValueError(f"output path {output} does not exist in the container") from None
    return stream


def export(container, output: str, compression: str, path: str, uid_gid: tuple[int, int],
           limit: int) -> int:
    """Write the export to `path`, owned by `uid_gid`; returns its size.
    Raises ValueError if `output` is missing, TooBig past `limit` bytes
    (removing what it wrote)."""
    stream = None if output == "changes" else _stream(container, output)
    try:
        with os.fdopen(outbox.create(path + ".part", uid_gid), "wb") as raw:
            _write(container, stream, _compressor(_Capped(raw, limit), compression))
            raw.flush()
            size = os.fstat(raw.fileno()).st_size
    except BaseException:
        Path(path + ".part").unlink(missing_ok=True)
        raise
    # rename never follows a link at `path`: at worst the account swapped the
    # part file for one of its own, and its own file is what it fetches.
    os.replace(path + ".part", path)
    return size


def _write(container, stream, writer) -> None:
    """The export (Docker's `stream`, or the changes when None) through `writer`, then closed."""
    try:
        if stream is None:
            write_changes(container, writer)
        else:
            for chunk in stream:
                writer.write(chunk)
    finally:
        writer.close()
