"""zstd on the wire from web node to runner, for the blobs it pays for.

A layer of shared libraries (what CUDA and PyTorch images are made of)
shrinks to about 40% at zstd's fastest level; random data or a gzip layer
does not shrink at all. Whether compressing pays depends on the link: on a
1 Gb/s link the compressor outruns the wire and a layer arrives about twice
as fast; on a fast link the compressor is the bottleneck (the bench's veth
link, `docs/benchmarks.md` 2b: 164 MB/s compressed against 203 for scp).
So a sample of the blob is compressed and timed, and the blob goes
compressed only when it shrinks by a quarter and the compressor (its
threads together) would feed the wire faster than the bytes as they are
would cross it, at the rate this process last saw an uncompressed copy to
that runner reach (`LinkRates`; none yet: as it is). Compressed blobs go as
`<digest>.zst` over one connection while zstd's threads compress; the runner
unpacks them into its store, checking the sha256 of what comes out
(gpu_runner.images.RunnerBlobs).
"""

from __future__ import annotations

import functools
import os
import threading
import time

import zstandard

from pink import sftp

SPOOL_INCOMING = "incoming"  # in a runner's spool: blobs the transfer account wrote, not trusted yet
SPOOL_HELD = "held"  # in a runner's spool: an empty marker per blob the runner verified and keeps
SUFFIX = ".zst"  # a blob sent compressed: incoming/<digest>.zst
LEVEL = 1
SAMPLE_BYTES = 1 << 20  # read from the middle of the blob to decide
WORTH = 0.75  # compressed sample / sample at most this, or the blob goes as it is
MIN_BYTES = 1 << 20  # smaller blobs go as they are: too few bytes to matter
MEASURED_MIN = 8 << 20  # an uncompressed copy at least this big sets a runner's link rate


class LinkRates:
    """Bytes per second of the last big uncompressed copy to each runner, in this process."""

    def __init__(self):
        self._rates: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, runner: str) -> float | None:
        with self._lock:
            return self._rates.get(runner)

    def saw(self, runner: str, size: int, seconds: float) -> None:
        if size >= MEASURED_MIN and seconds > 0:
            with self._lock:
                self._rates[runner] = size / seconds


def send(conn, ssh_config, node: dict, path: str, remote: str, rates: LinkRates) -> int:
    """Copy the blob at `path` to `remote` on `node` (as `remote` + SUFFIX when
    compressing pays, else as it is, timed into `rates`); returns the bytes sent."""
    if worth_compressing(path, rates.get(node["name"])):
        return sftp.put_stream(conn, compressed(path), remote + SUFFIX)
    started = time.monotonic()
    size = sftp.put_parallel(conn, ssh_config, node, sftp.local_file(path), remote)
    rates.saw(node["name"], size, time.monotonic() - started)
    return size


def worth_compressing(path: str, link_rate: float | None) -> bool:
    """Would the file at `path` reach a runner sooner compressed, over a link
    carrying `link_rate` bytes/s (None: not known, so no)?"""
    size = os.path.getsize(path)
    if size < MIN_BYTES or not link_rate:
        return False
    with open(path, "rb") as fh:
        fh.seek(max(0, size // 2 - SAMPLE_BYTES // 2))
        sample = fh.read(SAMPLE_BYTES)
    started = time.perf_counter()
    packed = len(zstandard.ZstdCompressor(level=LEVEL).compress(sample))
    compress_rate = len(sample) / max(time.perf_counter() - started, 1e-6) * len(os.sched_getaffinity(0))
    return packed <= WORTH * len(sample) and compress_rate > link_rate


def bound(size: int) -> int:
    """The most bytes zstd can make of `size` bytes (ZSTD_COMPRESSBOUND, with room for frame headers)."""
    return size + size // 128 + (1 << 17)


def compressed(path: str):
    """A Source (pink.sftp) opening the zstd stream of the file at `path`."""
    return functools.partial(_compressing_reader, path)


def _compressing_reader(path: str):
    return zstandard.ZstdCompressor(level=LEVEL, threads=-1).stream_reader(open(path, "rb"), closefd=True)


def unpacking_reader(fd: int):
    """The decompressed stream of the open file `fd` (the descriptor stays the caller's)."""
    return zstandard.ZstdDecompressor().stream_reader(os.fdopen(os.dup(fd), "rb"), closefd=True)
