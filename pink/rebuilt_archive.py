"""Archives rebuilt from blobs: the `docker load`-able tar of a recipe, assembled as it is read.

`open_archive` serves the tar of a `pink.recipes.Recipe` from the blobs a
`pink.blob_store.BlobStore` holds, at any byte offset, writing nothing: the
runner streams it into `docker load`. Every member's place follows from the
recipe's sizes alone, so `archive_size` (an image's size in task records and
upload limits) needs no blob. No Flask, no Docker.
"""

from __future__ import annotations

import bisect
import collections
import io
import os
import tarfile

from pink import image_archive
from pink.blob_store import BlobStore
from pink.errors import NotFound, PinkError
from pink.recipes import Recipe

MAX_OPEN_BLOBS = 32  # blob files an archive reader keeps open at once

_BLOCK = tarfile.BLOCKSIZE
_USTAR_MAX_SIZE = 8**11 - 1  # bytes: the most a ustar header's 11 octal digits can say


def _header(name: str, size: int) -> bytes:
    """One 512-byte tar header, the same bytes every time for the same member.

    ustar up to ustar's limit of 8 GiB - 1; a larger layer (a GPU image's
    can be) gets the GNU base-256 size field in the same single block, which
    Go's archive/tar (Docker, containerd) and Python's tarfile both read, so
    every member's place stays computable from the sizes alone.
    """
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    fmt = tarfile.USTAR_FORMAT if size <= _USTAR_MAX_SIZE else tarfile.GNU_FORMAT
    header = info.tobuf(format=fmt, encoding="utf-8", errors="strict")
    assert len(header) == _BLOCK, name
    return header


class _Layout:
    """Where every byte of a recipe's archive comes from.

    `manifest.json`, then each distinct blob once at `blobs/sha256/<hex>`:
    each a header, the data and zeros to a 512-byte boundary; then two zero
    blocks. Segments are (start, length, bytes or blob digest), in order.
    A layer in `placeholders` is an empty member: for a loader that holds it
    already and will not read it (gpu_runner.images.layers_docker_holds).
    """

    def __init__(self, recipe: Recipe, placeholders: frozenset[str] = frozenset()):
        self.segments: list[tuple[int, int, bytes | str]] = []
        self.size = 0
        pending = bytearray()

        def literal(data: bytes) -> None:
            pending.extend(data)

        def flush() -> None:
            if pending:
                self.segments.append((self.size, len(pending), bytes(pending)))
                self.size += len(pending)
                pending.clear()

        manifest = recipe.manifest_json()
        literal(_header("manifest.json", len(manifest)) + manifest + bytes(-len(manifest) % _BLOCK))
        for digest in recipe.blobs:
            size = 0 if digest in placeholders and digest != recipe.config else recipe.sizes[digest]
            literal(_header(image_archive.BLOBS_DIR + digest, size))
            flush()
            if size:
                self.segments.append((self.size, size, digest))
                self.size += size
            literal(bytes(-size % _BLOCK))
        literal(bytes(2 * _BLOCK))
        flush()
        self.starts = [start for start, _, _ in self.segments]


def archive_size(recipe: Recipe) -> int:
    """Bytes of the tar `open_archive` serves for `recipe`."""
    return _Layout(recipe).size


def open_archive(recipe: Recipe, store: BlobStore,
                 placeholders: frozenset[str] = frozenset()) -> "ArchiveReader":
    """A seekable, read-only file of the `docker load`-able tar rebuilt from
    `recipe`'s blobs in `store`, assembled as it is read (nothing is written);
    the layers in `placeholders` are left empty (see _Layout)."""
    return ArchiveReader(recipe, store, placeholders)


def read_archive(recipe: Recipe, store: BlobStore, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of the rebuilt archive (fewer past its end)."""
    with open_archive(recipe, store) as reader:
        return reader.pread(offset, length)


class ArchiveReader(io.RawIOBase):
    """The archive `_Layout` describes, read from the store's blob files.

    Why `docker load` accepts it, read in the loaders' sources:
    - the graph-driver store (moby image/tarexport/load.go; Docker 20.10 up
      to today) untars the whole stream, then reads `manifest.json`: `Config`
      and each of `Layers` may be any path inside the tar (safePath), and each
      layer goes through DecompressStream, so gzip-compressed layers load; the
      diff_id is checked on the decompressed bytes.
    - the containerd image store (moby daemon/containerd/image_exporter.go
      LoadImage -> containerd's images/archive/importer.go ImportIndex; the
      default for fresh installs of Docker 29+) reads a tar without
      `oci-layout` as the Docker format: every regular file is a blob keyed by
      its cleaned path, `manifest.json` names config and layers by those
      paths, and each layer's compression is detected (gzip kept as is).
    - Docker 25+'s own `docker save` writes `manifest.json` with exactly these
      `blobs/sha256/<hex>` paths (moby image/tarexport/save.go).
    So no `oci-layout` or `index.json` is written: both read `manifest.json`.
    tests/pink/test_blobs.py loads such archives, plain and gzip layers, into
    Docker 20.10 and runs them.

    A blob file is opened on its first read and kept open (the
    MAX_OPEN_BLOBS most recent) until `close`, so one collected meanwhile
    still reads whole; callers keep a live task's blobs out of `collect`
    anyway.
    Not thread-safe: give each thread or process its own reader.
    """

    def __init__(self, recipe: Recipe, store: BlobStore, placeholders: frozenset[str] = frozenset()):
        super().__init__()
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.recipe = recipe
        self.store = store
        self._layout = _Layout(recipe, placeholders)
        self._position = 0

    @property
    def size(self) -> int:
        return self._layout.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.size - self._position)
        data = self.pread(self._position, size)
        self._position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length), without moving the position."""
        if self.closed:
            raise ValueError("read from a closed archive")
        if offset < 0 or length < 0:
            raise ValueError(f"cannot read {length} bytes at offset {offset}")
        end = min(offset + length, self.size)
        out = bytearray()
        index = bisect.bisect_right(self._layout.starts, offset) - 1
        while offset < end:
            start, seg_length, source = self._layout.segments[index]
            skip, take = offset - start, min(end, start + seg_length) - offset
            if isinstance(source, bytes):
                out += source[skip:skip + take]
            else:
                out += self._read_blob(source, skip, take)
            offset += take
            index += 1
        return bytes(out)

    def _read_blob(self, digest: str, offset: int, length: int) -> bytes:
        fd = self._fd(digest)
        data = bytearray()
        while len(data) < length:  # Linux returns at most ~2 GiB per read
            chunk = os.pread(fd, length - len(data), offset + len(data))
            if not chunk:
                raise PinkError(f"blob sha256:{digest} in {self.store.root} ended early",
                                code="corrupt_blob")
            data += chunk
        return bytes(data)

    def _fd(self, digest: str) -> int:
        fd = self._fds.get(digest)
        if fd is not None:
            self._fds.move_to_end(digest)
            return fd
        try:
            fd = os.open(self.store.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"blob sha256:{digest} of image {self.recipe.image_id} is not in the store",
                           code="missing_blob") from None
        if os.fstat(fd).st_size != self.recipe.sizes[digest]:
            os.close(fd)
            raise PinkError(f"blob sha256:{digest} in {self.store.root} is not "
                            f"{self.recipe.sizes[digest]} bytes", code="corrupt_blob")
        self._fds[digest] = fd
        while len(self._fds) > MAX_OPEN_BLOBS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
        super().close()
