"""The blob store: image blobs as files `<root>/sha256/<hex>`, each written once and verified.

Web nodes and runners keep the blobs of `pink.recipes.Recipe`s here (layer
tars and configs, keyed by sha256), received in resumable part files under
`<root>/partial/`, and collect the least recently used ones nobody keeps
when the store outgrows its budget. The store also computes each layer's
diff_id (the sha256 of its uncompressed tar) from the bytes it holds, and
`verified_diff_ids` checks an image config's word against them. Used by the
web upload protocol, the transfer job and the runner; no Flask, no Docker.
"""

from __future__ import annotations

import bz2
import collections
import errno
import fcntl
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import threading
import time
import uuid
import zlib
from pathlib import Path

import zstandard

from pink import cooperative, image_archive
from pink.errors import ArchiveError, BadRequest, Conflict, NotFound
from pink.recipes import HEX64, MAX_BLOB_BYTES, Recipe, check_hex

log = logging.getLogger("pink.blob_store")

SWEEP_GRACE = 3600.0  # seconds a file no task references may stay (it may be being written): every sweep's grace
PART_GRACE = SWEEP_GRACE  # seconds an untouched part file is kept (its upload may resume)
COPY_CHUNK = 1 << 20  # bytes read per step when receiving or copying a blob, and from a request while spooling
MAX_HASH_STATES = 64  # running sha256 states of cut uploads a process keeps, to resume without re-reading

BLOB_DIR = "sha256"
PARTIAL_DIR = "partial"
DIFF_ID_DIR = "diff_ids"  # `<hex>`: the diff_id this store computed for compressed layer blob <hex>, or its refusal
REFUSED = "refused: "  # starts a kept diff_id of a layer that does not decompress, then why
INGEST_OWNER = ".ingest"  # part files of `ingest`; no owner name can start with a dot

_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")


class WrongOffset(Conflict):
    """A write did not start where the part file ends; `offset` is where it does."""

    code = "wrong_offset"

    def __init__(self, digest: str, held: int, offset: int):
        super().__init__(f"{held} bytes of blob sha256:{digest} are already here, so the upload "
                         f"must continue from offset {held}, not {offset}")
        self.offset = held


class BlobStore:
    """Blobs as files `<root>/sha256/<hex>`, each written once and verified.

    A blob arrives in a part file of its own writer (`<root>/partial/<owner>/
    <hex>.part`, owner a user name or task id), locked (flock) while written,
    and appears under its name only by an atomic rename once its sha256 is
    checked: a reader sees a whole, correct blob or none. Two writers of one
    blob rename identical bytes over each other, and a reader keeps reading
    the file it opened. Use is the file's mtime (`touch`); `collect` removes the
    least recently used blobs nobody keeps until the store fits its budget.
    """

    def __init__(self, root, budget_bytes: int):
        self.root = os.fspath(root)
        self.budget = budget_bytes
        self.blob_dir = os.path.join(self.root, BLOB_DIR)
        self.partial_dir = os.path.join(self.root, PARTIAL_DIR)
        self.diff_id_dir = os.path.join(self.root, DIFF_ID_DIR)
        for folder in (self.blob_dir, self.partial_dir, self.diff_id_dir):
            os.makedirs(folder, exist_ok=True)

    # -------------------------------------------------------- reading

    def path(self, digest: str) -> str:
        return os.path.join(self.blob_dir, check_hex(digest, "blob", code="bad_digest"))

    def has(self, digest: str) -> bool:
        return os.path.isfile(self.path(digest))

    def size(self, digest: str) -> int:
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            raise NotFound(f"blob sha256:{digest} is not in the store", code="missing_blob") from None

    def diff_id(self, digest: str) -> str:
        """`sha256:<hex>` of the uncompressed tar of layer blob `digest`, as this store hashed it.

        A config's diff_ids are the client's word, and Docker picks the layers
        it reuses by them (it skips reading a layer whose chain id it holds):
        they count only once they equal what PINK computed from bytes it holds.
        A plain tar, what `docker save` writes, is its own diff_id (its digest
        was checked when it was stored). A compressed one is decompressed and
        hashed once, by the request that stored it (`web.blob_uploads.put_blob`,
        `web.uploads.receive`: bounded by the upload itself), never by a commit,
        which the client times out and retries. The result is kept in
        `diff_ids/<hex>`, where no client writes, and so is a refusal (a blob
        that does not decompress, or past MAX_BLOB_BYTES): a replay through a
        new session is answered from the file. The hashing holds a flock on the
        blob file, so requests in any gunicorn process asking at once wait for
        one hash instead of starting their own. BadRequest `bad_layer` for a
        refused blob.
        """
        try:
            fh = open(self.path(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob sha256:{digest} is not in the store", code="missing_blob") from None
        with fh:
            kind = _compression(fh.read(8))
            if kind is None:
                return f"sha256:{digest}"
            kept = self.kept_diff_id(digest)
            if kept is None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released when fh closes
                kept = self.kept_diff_id(digest) or self._hash_layer(fh, kind, digest)
        if kept.startswith(REFUSED):
            raise BadRequest(kept[len(REFUSED):], code="bad_layer")
        return kept

    def prepare_diff_id(self, digest: str) -> None:
        """Compute and keep blob `digest`'s diff_id now: for the request that
        stored the blob, whose own bytes bound the work. A refusal is kept too,
        and raised when a commit asks `diff_id`."""
        try:
            self.diff_id(digest)
        except BadRequest:
            pass

    def kept_diff_id(self, digest: str) -> str | None:
        """What `diff_id` kept for compressed blob `digest`: `sha256:<hex>`, or
        REFUSED and why; None when nothing is kept (not hashed yet, or a plain tar)."""
        return _read_text(os.path.join(self.diff_id_dir, check_hex(digest, "blob", code="bad_digest")))

    def _hash_layer(self, fh, kind: str, digest: str) -> str:
        """Hash the decompressed blob (the caller holds its lock) and keep the answer, a refusal too."""
        fh.seek(0)
        try:
            kept = f"sha256:{_hash_decompressed(fh, kind, digest)}"
        except BadRequest as exc:
            kept = REFUSED + exc.message
        _write_text(os.path.join(self.diff_id_dir, digest), kept)
        return kept

    def missing(self, digests) -> list[str]:
        """The digests (each once, in order) this store does not hold."""
        return [d for d in dict.fromkeys(digests) if not self.has(d)]

    def touch(self, digest: str, now: float | None = None) -> bool:
        """Mark a use, for `collect`'s LRU order; False when the blob is not here."""
        try:
            os.utime(self.path(digest), None if now is None else (now, now))
            return True
        except FileNotFoundError:
            return False

    def total_bytes(self) -> int:
        """Bytes of the whole blobs held (part files not counted)."""
        return sum(size for _, _, size in self._scan())

    # -------------------------------------------------------- writing

    def offset(self, owner: str, digest: str) -> int:
        """Bytes of `owner`'s part file of the blob: where its upload resumes (0: none)."""
        try:
            return os.stat(self._part(owner, digest)).st_size
        except FileNotFoundError:
            return 0

    def write(self, owner: str, digest: str, stream, size: int, offset: int = 0,
              limit: int | None = None, present_ok: bool = True) -> int:
        """Receive bytes of blob `digest` (`size` bytes in all) from `stream`, at `offset`.

        Appends to `owner`'s part file, which must hold exactly `offset` bytes
        (else WrongOffset, a Conflict, naming the right offset). Reads at most
        `limit` bytes (None: until the stream ends) and never past `size`.
        When the part is complete its sha256 is checked and it is renamed into
        place; a mismatch deletes it (BadRequest `digest_mismatch`). Returns
        the bytes now held: `size` once the blob is in the store. A blob
        already here is not written again and the stream is left unread
        (with `present_ok` False, that raises Conflict `present`: a caller
        that counts the write as proof the sender holds the blob must know).

        Hashing: bytes are hashed as they are received. When a write ends
        short of `size`, this process keeps the running sha256 (at most
        MAX_HASH_STATES of them), and a resume that reaches the same process
        continues it. A resume elsewhere (another gunicorn worker, a restart)
        cannot: hashlib states do not leave a process. It then hashes the part
        whole once it is complete: one extra sequential read and hash of
        `size` bytes, 0.5 s to 6 s per GB depending on the CPU's SHA
        extensions, paid only by the write that completes the blob, never by
        one that is cut again (re-hashing the prefix on every resume would cost
        that on every chunk of a chunked upload).
        """
        check_hex(digest, "blob", code="bad_digest")
        _check_owner(owner)
        _check_blob_size(size)
        if self.has(digest):
            _remove_unless_locked(self._part(owner, digest))  # left by an upload another finished
            if not present_ok:
                raise Conflict(f"blob sha256:{digest} is already here", code="present")
            return self.size(digest)
        if type(offset) is not int or not 0 <= offset <= size:
            raise BadRequest(f"offset {offset!r} is outside blob sha256:{digest} of {size} bytes",
                             code="bad_param")
        part = self._part(owner, digest)
        fd = _open_locked(part, create=offset == 0)
        if fd is None:
            raise WrongOffset(digest, self.offset(owner, digest), offset)
        try:
            held = os.fstat(fd).st_size
            if held != offset:
                raise WrongOffset(digest, held, offset)
            os.lseek(fd, offset, os.SEEK_SET)
            running = _Running() if offset == 0 else _resumed(part, fd)
            want = size - offset if limit is None else max(0, min(size - offset, limit))
            try:
                held = offset + _copy(stream, fd, want, running)
            finally:
                if running is not None and running.count < size:
                    _suspend(part, fd, running)
            if held < size:
                return held
            self._finish(fd, part, digest, running and running.hasher)
            return size
        finally:
            os.close(fd)

    def discard(self, owner: str, digest: str) -> None:
        """Drop `owner`'s part file of the blob: a write that will not be resumed."""
        _remove_unless_locked(self._part(owner, digest))

    def ingest(self, digest: str, path, offset: int, size: int) -> int:
        """Copy bytes [offset, offset + size) of local file `path` (a member of
        an uploaded archive) into the store as blob `digest`, verified as
        `write` verifies (hashed while copied). Returns `size`; a blob already
        here is left as it is, once the range is shown to hold the same bytes:
        a digest an archive names is a claim, not a proof (it could be another
        user's layer)."""
        check_hex(digest, "blob", code="bad_digest")
        _check_blob_size(size)
        if self.has(digest):
            _check_range(path, offset, size, digest)
            self.touch(digest)
            return self.size(digest)
        part = os.path.join(self.partial_dir, INGEST_OWNER, f"{digest}.{uuid.uuid4().hex[:12]}.part")
        fd = _open_locked(part, create=True)
        try:
            running = _Running()
            with open(path, "rb") as src:
                src.seek(offset)
                copied = _copy(src, fd, size, running)
            if copied != size:
                raise ArchiveError(f"{os.path.basename(os.fspath(path))} ends {size - copied} bytes "
                                   f"before the end of blob sha256:{digest}; upload it again",
                                   code="not_tar")
            self._finish(fd, part, digest, running.hasher)
            return size
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def _finish(self, fd: int, part: str, digest: str, hasher) -> None:
        """Check a complete part and rename it into place, durably."""
        os.fsync(fd)
        if hasher is None:
            hasher = _hash_fd(fd)
        actual = hasher.hexdigest()
        if actual != digest:
            os.unlink(part)
            raise BadRequest(f"blob sha256:{digest} arrived as sha256:{actual}; upload it again",
                             code="digest_mismatch")
        try:
            os.replace(part, os.path.join(self.blob_dir, digest))
        except FileNotFoundError:
            if not self.has(digest):  # else: its part was swept once another writer finished it
                raise
        _fsync_dir(self.blob_dir)

    def _part(self, owner: str, digest: str) -> str:
        digest = check_hex(digest, "blob", code="bad_digest")
        return os.path.join(self.partial_dir, _check_owner(owner), f"{digest}.part")

    # -------------------------------------------------------- collecting

    def collect(self, keep: set[str], now: float | None = None, grace: float = 0.0) -> list[str]:
        """Delete least recently used blobs not in `keep` until the store fits
        its budget, and part files untouched for PART_GRACE seconds that no
        writer holds. A blob in `keep` stays even when that leaves the store
        over budget (logged as a warning). Returns the digests deleted.

        Costs one scan of the blobs present, however many came and went.
        Callers put in `keep` every blob of a live task and of an upload in
        progress: a blob renamed into place during this pass may be measured
        before it was used, and only `keep` protects it for certain. Blobs
        used within `grace` seconds stay too (an upload stored them and is
        about to record its task).
        """
        now = time.time() if now is None else now
        entries = sorted(self._scan())
        total = sum(size for _, _, size in entries)
        deleted = []
        for mtime, digest, size in entries:
            if total <= self.budget:
                break
            if digest in keep or mtime > (now - grace) * 1e9:
                continue
            path = os.path.join(self.blob_dir, digest)
            try:
                if os.stat(path).st_mtime_ns != mtime:
                    continue  # used since the scan: no longer the least recently used
                os.unlink(path)
            except FileNotFoundError:
                pass  # another process collected it
            Path(self.diff_id_dir, digest).unlink(missing_ok=True)
            total -= size
            deleted.append(digest)
        if total > self.budget:
            log.warning("blob store %s holds %d bytes of blobs in use, over its budget of %d bytes",
                        self.root, total, self.budget)
        self._sweep_partials(now)
        return deleted

    def _scan(self):
        """(mtime_ns, digest, size) of each blob present."""
        found = []
        with os.scandir(self.blob_dir) as entries:
            for entry in entries:
                if HEX64.fullmatch(entry.name):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    found.append((st.st_mtime_ns, entry.name, st.st_size))
        return found

    def _sweep_partials(self, now: float) -> None:
        stale = now - PART_GRACE
        with os.scandir(self.partial_dir) as owners:
            for owner in owners:
                if not owner.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(owner.path) as parts:
                    for part in parts:
                        try:
                            if part.stat(follow_symlinks=False).st_mtime < stale:
                                _remove_unless_locked(part.path)
                        except FileNotFoundError:
                            pass
                try:
                    if os.stat(owner.path).st_mtime < stale:
                        os.rmdir(owner.path)  # fails, as it should, unless empty
                except OSError:
                    pass


def _compression(head: bytes) -> str | None:
    """The compression Docker would detect from a blob's first bytes (None: a plain tar)."""
    return next((kind for magic, kind in image_archive.COMPRESSED.items() if head.startswith(magic)), None)


def _decompressing(fh, kind: str):
    """A reader of the decompressed bytes of file `fh`, compressed with `kind`."""
    if kind == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=fh, mode="rb")
    return {"bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}[kind](fh)


def _hash_decompressed(fh, kind: str, digest: str) -> str:
    """sha256 of the decompressed bytes, stopping at MAX_BLOB_BYTES: a few
    megabytes of gzip can claim terabytes, and each is hashed by the request that stored it."""
    hasher, total = hashlib.sha256(), 0
    try:
        with _decompressing(fh, kind) as stream:
            while chunk := stream.read(COPY_CHUNK):
                total += len(chunk)
                if total > MAX_BLOB_BYTES:
                    raise BadRequest(f"layer blob sha256:{digest} decompresses to more than {MAX_BLOB_BYTES} "
                                     "bytes, the most a layer may hold", code="bad_layer")
                hasher.update(chunk)
                cooperative.give_way()
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as exc:
        raise BadRequest(f"layer blob sha256:{digest} is {kind}-compressed but does not decompress ({exc}); "
                         "save the image again with `docker save`", code="bad_layer") from None
    return hasher.hexdigest()


def verified_diff_ids(store: BlobStore, recipe: Recipe) -> list[str]:
    """The diff_ids of `recipe`'s config, each shown to be its layer's as `store` holds it.

    Every door an image comes in by (a whole archive, an upload session) and
    the runner before `docker load` call this: Docker reuses a layer it
    already holds by the diff_id alone, so a config naming another user's
    diff_ids over a user's own harmless layers would run on the other user's
    files. BadRequest `diff_id_mismatch` names the first layer that differs.
    """
    try:
        with open(store.path(recipe.config), "rb") as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise NotFound(f"the image config sha256:{recipe.config} is not in the store",
                       code="missing_blob") from None
    except (ValueError, RecursionError):
        raise BadRequest(f"the image config sha256:{recipe.config} is not JSON", code="bad_manifest") from None
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(recipe.layers):
        raise BadRequest(f"the image config lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'} "
                         f"layer diff_ids for {len(recipe.layers)} layers", code="bad_manifest")
    for number, (layer, claimed) in enumerate(zip(recipe.layers, diff_ids), 1):
        actual = store.diff_id(layer)
        if claimed != actual:
            raise BadRequest(
                f"layer {number} of {len(recipe.layers)} (blob sha256:{layer}) holds a tar whose sha256 is "
                f"{actual}, but the image config lists diff_id {str(claimed)[:80]}: the config does not "
                "describe these layers. Submit the archive `docker save` wrote, unchanged",
                code="diff_id_mismatch")
    return diff_ids


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except FileNotFoundError:
        return None


def _write_text(path: str, text: str) -> None:
    """Write `path` whole or not at all (a reader never sees half of it)."""
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _check_range(path, offset: int, size: int, digest: str) -> None:
    """BadRequest (digest_mismatch) unless bytes [offset, offset + size) of `path` hash to `digest`."""
    hasher = hashlib.sha256()
    with open(path, "rb") as src:
        src.seek(offset)
        left = size
        while left:
            block = src.read(min(COPY_CHUNK, left))
            if not block:
                break
            hasher.update(block)
            left -= len(block)
            cooperative.give_way()
    if left or hasher.hexdigest() != digest:
        raise BadRequest(f"the archive's blob sha256:{digest} does not hold those bytes; the archive is "
                         "corrupt or forged", code="digest_mismatch")


def _check_owner(owner) -> str:
    if not isinstance(owner, str) or not _OWNER.fullmatch(owner):
        raise BadRequest(f"{str(owner)[:80]!r} cannot own an upload: expected a user name or "
                         f"task id", code="bad_param")
    return owner


def _check_blob_size(size) -> None:
    if type(size) is not int or not 0 <= size <= MAX_BLOB_BYTES:
        raise BadRequest(f"a blob's size must be 0 to {MAX_BLOB_BYTES} bytes, not {str(size)[:40]}",
                         code="bad_param")


def _open_locked(path: str, create: bool) -> int | None:
    """An fd of the part file `path`, flocked; None when `create` is false and
    it is absent. Conflict when another writer holds it.

    Retries when the file it locked was unlinked meanwhile (collected, or
    completed by a writer before), or its directory removed by `collect`.
    """
    for _ in range(5):
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            if not create:
                return None
            os.makedirs(os.path.dirname(path), exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Conflict(f"another upload of {os.path.basename(path)[:64]} by the same "
                               f"owner is in progress; retry when it ends", code="upload_busy") from None
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise Conflict(f"the part file {os.path.basename(path)[:64]} keeps changing; retry",
                   code="upload_busy")


def _remove_unless_locked(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # a writer holds it: not stale, only slow
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


class _Running:
    """The sha256 of a part file's first `count` bytes."""

    __slots__ = ("hasher", "count")

    def __init__(self):
        self.hasher, self.count = hashlib.sha256(), 0


_hash_states: collections.OrderedDict[str, tuple[tuple[int, int, int], _Running]] = \
    collections.OrderedDict()  # part path -> (the file as it was left, its running hash)
_hash_states_lock = threading.Lock()


def _file_state(fd: int) -> tuple[int, int, int]:
    st = os.fstat(fd)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _suspend(part: str, fd: int, running: _Running) -> None:
    """Keep the running hash of a cut write, if it covers the whole part."""
    state = _file_state(fd)
    if state[1] != running.count:
        return  # a write failed within a chunk: resume by re-reading
    with _hash_states_lock:
        _hash_states[part] = (state, running)
        _hash_states.move_to_end(part)
        while len(_hash_states) > MAX_HASH_STATES:
            _hash_states.popitem(last=False)


def _resumed(part: str, fd: int) -> _Running | None:
    """The running hash a cut write left for this very file; None if there is none."""
    with _hash_states_lock:
        kept = _hash_states.pop(part, None)
    if kept is not None and kept[0] == _file_state(fd):
        return kept[1]
    return None


def _copy(src, fd: int, want: int, running: _Running | None) -> int:
    """Up to `want` bytes from file-like `src` to `fd` (hashed into `running`); bytes copied.

    Stops early when `src` ends. Every chunk is written, then hashed, before
    the next is read, so a failing `src` leaves all it gave in the file and
    `running` covering exactly that.
    """
    done = 0
    while done < want:
        chunk = src.read(min(COPY_CHUNK, want - done))
        if not chunk:
            break
        view = memoryview(chunk)[:want - done]
        rest = view
        while rest:
            rest = rest[os.write(fd, rest):]
        if running is not None:
            running.hasher.update(view)
            running.count += len(view)
        done += len(view)
        cooperative.give_way()
    return done


def _hash_fd(fd: int):
    hasher = hashlib.sha256()
    position = 0
    while chunk := os.pread(fd, COPY_CHUNK, position):
        hasher.update(chunk)
        position += len(chunk)
        cooperative.give_way()
    return hasher


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
