"""zstd on the wire from web node to runner, for the blobs it pays for.

A layer of CUDA libraries or Python packages shrinks to about half at zstd's
fastest level, which compresses at several hundred MB/s per core, faster
than most lab links carry it; random data or a gzip layer does not shrink
at all, and compressing it would only cost CPU. So a sample decides: a blob
whose sample does not shrink by a quarter goes as it is (in parallel
streams, `pink.sftp.put_parallel`), any other goes compressed as
`<digest>.zst`, which the runner unpacks into its store, checking the sha256
of what comes out (gpu_runner.images.RunnerBlobs). zstd's own threads
compress while Python sends.
"""

from __future__ import annotations

import functools
import os

import zstandard

SUFFIX = ".zst"  # a blob sent compressed: incoming/<digest>.zst
LEVEL = 1
SAMPLE_BYTES = 1 << 20  # read from the middle of the blob to decide
WORTH = 0.75  # compressed sample / sample at most this, or the blob goes as it is
MIN_BYTES = 1 << 20  # smaller blobs go as they are: too few bytes to matter


def worth_compressing(path: str) -> bool:
    """Does a sample from the middle of the file at `path` shrink by a quarter?"""
    size = os.path.getsize(path)
    if size < MIN_BYTES:
        return False
    with open(path, "rb") as fh:
        fh.seek(max(0, size // 2 - SAMPLE_BYTES // 2))
        sample = fh.read(SAMPLE_BYTES)
    return len(zstandard.ZstdCompressor(level=LEVEL).compress(sample)) <= WORTH * len(sample)


def compressed(path: str):
    """A Source (pink.sftp) opening the zstd stream of the file at `path`."""
    return functools.partial(_compressing_reader, path)


def _compressing_reader(path: str):
    return zstandard.ZstdCompressor(level=LEVEL, threads=-1).stream_reader(open(path, "rb"), closefd=True)


def unpacking_reader(fd: int):
    """The decompressed stream of the open file `fd` (the descriptor stays the caller's)."""
    return zstandard.ZstdDecompressor().stream_reader(os.fdopen(os.dup(fd), "rb"), closefd=True)
