"""Exporting a finished container's filesystem (or one path) compressed.

The tar stream from Docker goes straight through the compressor into the
outbox, so memory stays flat whatever the size. The file is created through
`outbox.create` (the transfer account may have planted a link at its name)
and measured by descriptor. Called by execution.
"""

from __future__ import annotations

import gzip
import os

import zstandard

from docker.errors import NotFound

from gpu_runner import outbox

CHUNK = 1 << 20


def _compressor(raw, compression: str):
    """A writer compressing into `raw`; closing it leaves `raw` open."""
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3)
    return zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(raw, closefd=False)


def _stream(container, output: str):
    if output == "full":
        return container.export(chunk_size=CHUNK)
    try:
        stream, _stat = container.get_archive(output, chunk_size=CHUNK)
    except NotFound:
        raise ValueError(f"output path {output} does not exist in the container") from None
    return stream


def export(container, output: str, compression: str, path: str, uid_gid: tuple[int, int]) -> int:
    """Write the export to `path`, owned by `uid_gid`; returns its size.
    Raises ValueError if `output` is missing."""
    stream = _stream(container, output)
    with os.fdopen(outbox.create(path + ".part", uid_gid), "wb") as raw:
        writer = _compressor(raw, compression)
        try:
            for chunk in stream:
                writer.write(chunk)
        finally:
            writer.close()
        raw.flush()
        size = os.fstat(raw.fileno()).st_size
    # rename never follows a link at `path`: at worst the account swapped the
    # part file for one of its own, and its own file is what it fetches.
    os.replace(path + ".part", path)
    return size
