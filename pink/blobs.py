"""Image blobs by content: recipes, the store that holds blobs, and archives rebuilt from them.

A GPU image is 5-15 GB and a person changes a few kB between runs, so PINK
moves blobs (layer tars and configs, keyed by sha256 as the archive stores
them), not archives: a `Recipe` says which blobs make an image, a `BlobStore`
(files under `<root>/sha256/<hex>`, part files under `<root>/partial/`) holds
them on web nodes and runners, and `open_archive` serves a `docker load`-able
tar assembled from them on the fly, at any byte offset. Used by the web upload
protocol, the transfer job and the runner; no Flask, no Docker.
"""

from __future__ import annotations

import bisect
import bz2
import collections
import dataclasses
import errno
import fcntl
import functools
import gzip
import hashlib
import hmac
import io
import json
import logging
import lzma
import os
import re
import secrets
import tarfile
import threading
import time
import types
import uuid
import zlib

import zstandard

from pink import cooperative, defaults, image_archive
from pink.errors import ArchiveError, BadRequest, Conflict, NotFound, PinkError

log = logging.getLogger("pink.blobs")

MAX_LAYERS = 128  # layers a recipe may list: overlay2 mounts no more; each task record in etcd lists them
MAX_TAGS = 100  # repo tags a recipe may carry
MAX_TAG_CHARS = 512  # characters in one repo tag (Docker: 255 for the name, 128 for the tag)
MAX_BLOB_BYTES = defaults.MAX_UPLOAD_BYTES  # bytes: largest blob, and largest sum of a recipe's blobs
PART_GRACE = defaults.SWEEP_GRACE  # seconds an untouched part file is kept (its upload may resume)
COPY_CHUNK = defaults.UPLOAD_CHUNK  # bytes read per step when receiving or copying a blob
MAX_OPEN_BLOBS = 32  # blob files an archive reader keeps open at once
MAX_HASH_STATES = 64  # running sha256 states of cut uploads a process keeps, to resume without re-reading

BLOB_DIR = "sha256"
PARTIAL_DIR = "partial"
DIFF_ID_DIR = "diff_ids"  # `<hex>`: the diff_id this store computed for compressed layer blob <hex>, or its refusal
REFUSED = "refused: "  # starts a kept diff_id of a layer that does not decompress, then why
INGEST_OWNER = ".ingest"  # part files of `ingest`; no owner name can start with a dot

_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")
_TAG = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space: what a Docker reference may hold
_BLOCK = tarfile.BLOCKSIZE
_USTAR_MAX_SIZE = 8**11 - 1  # bytes: the most a ustar header's 11 octal digits can say
_ARCHIVE_BLOBS = "blobs/sha256/"


def _bad(message: str) -> BadRequest:
    return BadRequest(message, code="bad_manifest")


def _check_hex(digest, what: str = "digest", code: str = "bad_manifest") -> str:
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise BadRequest(f"{what} {str(digest)[:80]!r} is not 64 lowercase hex digits (a sha256)",
                         code=code)
    return digest


# ---------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The blobs that rebuild one loadable image, and the names it is loaded under.

    Digests are bare hex: `config` is the image id's hex, each layer the
    sha256 of the layer blob exactly as the archive stored it (a gzip layer of
    an OCI archive is keyed by its compressed bytes). Construction validates
    everything, so a Recipe from a client is as safe as one from an archive.
    """

    config: str
    layers: tuple[str, ...]  # base layer first; a layer may repeat
    repo_tags: tuple[str, ...]
    sizes: types.MappingProxyType  # digest -> bytes, for the config and every layer, nothing else

    def __post_init__(self):
        _check_hex(self.config, "config digest")
        if not isinstance(self.layers, (list, tuple)):
            raise _bad("layers is not a list of digests")
        if len(self.layers) > MAX_LAYERS:
            raise _bad(f"the image has {len(self.layers)} layers; at most {MAX_LAYERS} accepted")
        for layer in self.layers:
            _check_hex(layer, "layer digest")
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "repo_tags", _checked_tags(self.repo_tags))
        object.__setattr__(self, "sizes", types.MappingProxyType(_checked_sizes(self)))

    def __hash__(self):
        return hash(self.key)

    @property
    def image_id(self) -> str:
        """What `docker load` reports for the image: the config's digest."""
        return f"sha256:{self.config}"

    @property
    def blobs(self) -> list[str]:
        """Each distinct blob once: the config, then the layers base first."""
        return list(dict.fromkeys((self.config, *self.layers)))

    @property
    def total_bytes(self) -> int:
        """Bytes of the distinct blobs: what a store without any of them must receive."""
        return sum(self.sizes[d] for d in self.blobs)

    @property
    def key(self) -> str:
        """The image's name in stores and spools: sha256 of a canonical JSON of
        config, layers and tags, which fix the rebuilt archive byte for byte."""
        canonical = json.dumps({"config": self.config, "layers": list(self.layers),
                                "repo_tags": list(self.repo_tags)},
                               sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def manifest_json(self) -> bytes:
        """The `manifest.json` of the rebuilt archive (the layout Docker 25+ writes)."""
        return json.dumps([{
            "Config": _ARCHIVE_BLOBS + self.config,
            "RepoTags": list(self.repo_tags),
            "Layers": [_ARCHIVE_BLOBS + layer for layer in self.layers],
        }], separators=(",", ":")).encode()

    def to_dict(self) -> dict:
        return {"config": self.config, "layers": list(self.layers),
                "repo_tags": list(self.repo_tags), "sizes": dict(self.sizes),
                "image_id": self.image_id, "key": self.key}

    @classmethod
    def from_dict(cls, data) -> "Recipe":
        """A recipe sent by a client; BadRequest (bad_manifest) for anything odd.

        `image_id` and `key`, when given, must agree with the rest.
        """
        if not isinstance(data, dict):
            raise _bad("the recipe is not an object")
        unknown = set(data) - {"config", "layers", "repo_tags", "sizes", "image_id", "key"}
        if unknown:
            raise _bad(f"the recipe has unknown fields: {', '.join(sorted(unknown)[:5])}")
        sizes = data.get("sizes")
        if not isinstance(sizes, dict):
            raise _bad("the recipe's sizes is not an object of digest -> bytes")
        recipe = cls(config=data.get("config"), layers=data.get("layers"),
                     repo_tags=data.get("repo_tags", []), sizes=sizes)
        for field in ("image_id", "key"):
            if field in data and data[field] != getattr(recipe, field):
                raise _bad(f"the recipe's {field} {str(data[field])[:80]!r} does not match its "
                           f"blobs ({getattr(recipe, field)})")
        return recipe

    @classmethod
    def from_archive(cls, path, info: image_archive.ImageInfo) -> tuple["Recipe", dict[str, tuple[int, int]]]:
        """The recipe of an archive `image_archive.inspect` described as `info`,
        and where each blob's bytes lie in the file: digest -> (offset, size).

        The tar's headers are read again (no layer data): members are checked
        and links followed exactly as inspection did. A layer stored under
        `blobs/sha256/<hex>` is keyed by that name; a classic `<id>/layer.tar`
        by its diff_id in the config, which is the sha256 of the uncompressed
        tar that `docker save` writes there. Neither is hashed here:
        `BlobStore.ingest` checks every digest as it copies the bytes, and
        `verified_diff_ids` the config's diff_ids against the stored layers.
        """
        with open(path, "rb") as raw:
            try:
                tar = tarfile.open(fileobj=raw, mode="r:", tarinfo=image_archive._BoundedTarInfo)
            except tarfile.ReadError as e:
                raise ArchiveError(f"the file is not a tar archive ({e})", code="not_tar") from None
            with tar:
                members = image_archive._read_members(tar, raw, image_archive.MAX_MEMBERS)
                return cls._from_members(image_archive._Archive(tar, members), info)

    @classmethod
    def _from_members(cls, archive, info: image_archive.ImageInfo):
        parsed, data = archive.json(info.config, "config")
        config = hashlib.sha256(data).hexdigest()
        if info.image_id != f"sha256:{config}":
            raise ArchiveError(f"the archive's config is {config}, not {info.image_id}: the file "
                               f"changed after inspection", code="bad_manifest")
        diff_ids = (parsed.get("rootfs") or {}).get("diff_ids") if isinstance(parsed, dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(info.layers):
            raise ArchiveError("the config's diff_ids do not match the manifest's layers",
                               code="bad_manifest")
        locations = {config: _data_range(archive, info.config, "config")}
        layers = []
        for name, diff_id in zip(info.layers, diff_ids):
            offset, size = _data_range(archive, name, "layer")
            landed = image_archive._clean_path(archive.regular(name).name) or ""
            if landed.startswith(_ARCHIVE_BLOBS) and _HEX64.fullmatch(landed[len(_ARCHIVE_BLOBS):]):
                digest = landed[len(_ARCHIVE_BLOBS):]
            else:
                match = _DIGEST.fullmatch(diff_id) if isinstance(diff_id, str) else None
                if match is None:
                    raise ArchiveError(f"the config lists a malformed diff_id {str(diff_id)[:80]!r}",
                                       code="bad_manifest")
                digest = match.group(1)
            if locations.setdefault(digest, (offset, size))[1] != size:
                raise ArchiveError(f"two members of different sizes claim digest {digest}",
                                   code="bad_manifest")
            layers.append(digest)
        recipe = cls(config=config, layers=layers, repo_tags=info.repo_tags,
                     sizes={d: n for d, (_, n) in locations.items()})
        return recipe, locations


def image_blobs(image: dict) -> set[str]:
    """The blobs to keep for a task's image record or an upload session (each
    holds a recipe): its config and layers; none for an archive recorded
    before the blob stores."""
    recipe = image.get("recipe")
    return {recipe["config"], *recipe["layers"]} if recipe else set()


def _data_range(archive, name: str, what: str) -> tuple[int, int]:
    """(offset, size) of the bytes of the regular file `name` resolves to."""
    member = archive.regular(name)
    if member is None:
        raise ArchiveError(f"the archive does not hold {what} {name!r}", code="missing_layer")
    if member.issparse():
        raise ArchiveError(f"{what} {name!r} is a sparse tar member; {image_archive.SAVE_HINT}",
                           code="unsafe_member")
    return member.offset_data, member.size


def _checked_tags(tags) -> tuple[str, ...]:
    if tags is None:
        return ()
    if not isinstance(tags, (list, tuple)):
        raise _bad("repo_tags is not a list of names")
    if len(tags) > MAX_TAGS:
        raise _bad(f"the image has {len(tags)} repo tags; at most {MAX_TAGS} accepted")
    for tag in tags:
        if not isinstance(tag, str) or len(tag) > MAX_TAG_CHARS or not _TAG.fullmatch(tag):
            raise _bad(f"repo tag {str(tag)[:80]!r} is not an image name")
        if tag.split(":", 1)[0].endswith(image_archive.RESERVED_REPO):
            raise _bad(f"the image is tagged {tag}: {image_archive.RESERVED_REPO} is PINK's own "
                       f"cache; retag it (docker tag) and save it again")
    return tuple(tags)


def _checked_sizes(recipe: Recipe) -> dict[str, int]:
    sizes = recipe.sizes
    if not isinstance(sizes, (dict, types.MappingProxyType)):
        raise _bad("sizes is not an object of digest -> bytes")
    needed = set(recipe.blobs)
    if set(sizes) != needed:
        missing = sorted(needed - set(sizes))
        what = (f"lacks {missing[0]}" if missing else
                f"names {str(next(iter(set(sizes) - needed)))[:80]!r}, not a blob of the image")
        raise _bad(f"sizes must give the bytes of the config and of every layer; it {what}")
    for digest, size in sizes.items():
        if type(size) is not int or not 0 <= size <= MAX_BLOB_BYTES:
            raise _bad(f"blob {digest} has size {str(size)[:40]!r}; expected 0 to {MAX_BLOB_BYTES} bytes")
    if not 0 < sizes[recipe.config] <= image_archive.MAX_JSON_BYTES:
        raise _bad(f"the config is {sizes[recipe.config]} bytes; expected 1 to "
                   f"{image_archive.MAX_JSON_BYTES}")
    if sum(sizes.values()) > MAX_BLOB_BYTES:
        raise _bad(f"the image's blobs add up to {sum(sizes.values())} bytes; at most "
                   f"{MAX_BLOB_BYTES} accepted")
    return dict(sizes)


# ---------------------------------------------------------------- the store


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
        return os.path.join(self.blob_dir, _check_hex(digest, "blob", code="bad_digest"))

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
        return _read_text(os.path.join(self.diff_id_dir, _check_hex(digest, "blob", code="bad_digest")))

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
        _check_hex(digest, "blob", code="bad_digest")
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
        _check_hex(digest, "blob", code="bad_digest")
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
            _unlink_quietly(part)
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
        digest = _check_hex(digest, "blob", code="bad_digest")
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
            _unlink_quietly(os.path.join(self.diff_id_dir, digest))
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
                if _HEX64.fullmatch(entry.name):
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
        raise _bad(f"the image config sha256:{recipe.config} is not JSON") from None
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(recipe.layers):
        raise _bad(f"the image config lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'} layer "
                   f"diff_ids for {len(recipe.layers)} layers")
    for number, (layer, claimed) in enumerate(zip(recipe.layers, diff_ids), 1):
        actual = store.diff_id(layer)
        if claimed != actual:
            raise BadRequest(
                f"layer {number} of {len(recipe.layers)} (blob sha256:{layer}) holds a tar whose sha256 is "
                f"{actual}, but the image config lists diff_id {str(claimed)[:80]}: the config does not "
                "describe these layers. Submit the archive `docker save` wrote, unchanged",
                code="diff_id_mismatch")
    return diff_ids


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


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- archives rebuilt from blobs


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
            literal(_header(_ARCHIVE_BLOBS + digest, size))
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


def archive_opener(recipe: Recipe, store: BlobStore):
    """A picklable callable opening the rebuilt archive: for senders in other processes."""
    return functools.partial(_open_in_process, recipe.to_dict(), store.root, store.budget)


def _open_in_process(recipe: dict, root: str, budget: int) -> "ArchiveReader":
    return open_archive(Recipe.from_dict(recipe), BlobStore(root, budget))


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


# ---------------------------------------------------------------- proof of possession

PROOF_RANGES = 8  # ranges of a blob a client must hash to show it holds the blob
PROOF_RANGE = 64 * 2**10  # bytes per range; a blob up to PROOF_RANGES ranges is hashed whole


def challenge(size: int) -> dict:
    """A fresh challenge for a blob of `size` bytes: a nonce and the ranges to hash.

    A server holding a blob does not take a client's word that it has the
    same one: knowing a digest (they are in every manifest) is not holding
    the bytes, and skipping the upload on the digest alone would let anyone
    run an image whose layers belong to another user's private image. The
    client answers with `proof()` over random ranges it can only read if it
    holds the blob, at the cost of reading PROOF_RANGES * PROOF_RANGE bytes
    instead of uploading them all.
    """
    if size <= PROOF_RANGES * PROOF_RANGE:
        ranges = [[0, size]]
    else:
        rng = secrets.SystemRandom()
        ranges = sorted([offset, PROOF_RANGE] for offset in
                        (rng.randrange(0, size - PROOF_RANGE + 1) for _ in range(PROOF_RANGES)))
    return {"nonce": secrets.token_hex(16), "ranges": ranges}


def challenge_held(store: BlobStore, digest: str, claimed) -> dict:
    """A challenge for blob `digest` over the size `store` holds, never the client's claim.

    A claimed size that differs is refused: the digest names these very bytes,
    so another size is a mistake or a lie, and ranges drawn from it (none at
    all for a claimed 0) could prove nothing.
    """
    held = store.size(digest)
    if claimed != held:
        raise BadRequest(f"layer sha256:{digest} is {held} bytes, not the {str(claimed)[:40]} your manifest "
                         "says: send each layer's size as `docker save` wrote it", code="wrong_size")
    return challenge(held)


def proof(read, challenge: dict) -> str:
    """HMAC-SHA256 keyed by the nonce over the challenged ranges; `read(offset, length)` reads the blob."""
    mac = hmac.new(bytes.fromhex(challenge["nonce"]), digestmod=hashlib.sha256)
    for offset, length in challenge["ranges"]:
        data = read(offset, length)
        if len(data) != length:
            raise PinkError(f"the blob is shorter than the challenge's range at {offset}", code="bad_blob")
        mac.update(data)
    return mac.hexdigest()


def check_proof(store: BlobStore, digest: str, challenge: dict, answer) -> bool:
    """Whether `answer` proves possession of blob `digest` (in `store`) for `challenge`.

    Ranges that read none of a non-empty blob prove nothing, whoever drew them.
    """
    if not isinstance(answer, str):
        return False
    try:
        if store.size(digest) and not any(length for _, length in challenge["ranges"]):
            return False
    except (NotFound, KeyError, TypeError, ValueError):
        return False

    def read(offset: int, length: int) -> bytes:
        with open(store.path(digest), "rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    try:
        return hmac.compare_digest(proof(read, challenge), answer)
    except (OSError, PinkError):
        return False
