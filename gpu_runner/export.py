"""Exporting a finished container's filesystem (or one path) compressed.

The tar stream from Docker goes straight through the compressor into the
outbox, so memory stays flat whatever the size. Called by execution.
"""

from __future__ import annotations

import gzip
import os

import zstandard

from docker.errors import NotFound

CHUNK = 1 << 20


def _compressed(path: str, compression: str):
    raw = open(path, "wb")
    if compression == "gzip":
        return raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3)
    return raw, zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(raw)


def export(container, output: str, compression: str, path: str) -> int:
    """Write the export to `path`; returns its size. Raises ValueError if `output` is missing."""
    if output == "full":
        stream = container.export(chunk_size=CHUNK)
    else:
        try:
            stream, _stat = container.get_archive(output, chunk_size=CHUNK)
        except NotFound:
            raise ValueError(f"output path {output} does not exist in the container") from None
    raw, writer = _compressed(path + ".part", compression)
    try:
        for chunk in stream:
            writer.write(chunk)
    finally:
        writer.close()
        raw.close()
    os.replace(path + ".part", path)
    return os.path.getsize(path)
