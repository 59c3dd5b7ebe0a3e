"""The runner's image cache: blobs arriving in the spool, verified, loaded into Docker.

A loaded archive is tagged `pink/cache:<archive sha256>`, so the cache
survives runner restarts and the node record can tell transfer jobs which
images need no copy. Every use tags it again, so Docker's LastTagTime is the
last use, and `evict` removes the least recently used images neither in use
nor reserved until the cache fits its disk budget. Called by the agent (inventory) and
execution (load, evict).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import time
import uuid
from pathlib import Path

import docker
import zstandard
from docker.errors import APIError, DockerException, ImageLoadError, ImageNotFound

from pink import blob_store, image_archive, rebuilt_archive, recipes, wire
from pink.errors import BadRequest, PinkError

CACHE_REPO = image_archive.RESERVED_REPO
log = logging.getLogger("pink.runner")


class ImageRefused(RuntimeError):
    """The image itself cannot run, here or on any runner: its task fails as
    its own (`pink.failures`), not tried again elsewhere."""


def cached(client: docker.DockerClient) -> list[str]:
    """Archive digests whose images are loaded here."""
    tags = [t for image in client.images.list(name=CACHE_REPO) for t in image.tags]
    return sorted(t.split(":", 1)[1] for t in tags if t.startswith(CACHE_REPO + ":"))


def ensure_loaded(client: docker.DockerClient, image: dict, held: "RunnerBlobs") -> bool:
    """Load the task's image unless Docker holds it; True when it was loaded now.

    Callers hold the image's lock (`Agent.image_lock`): tasks sharing an
    image start together, and only one of them may load it.

    The image is loaded from the archive rebuilt from its verified blobs
    (`RunnerBlobs`). Docker must agree on the image id, or the bytes are not
    what the web node inspected.
    """
    sha = image["sha256"]
    try:
        cached_image = client.images.get(image["image_id"])
    except ImageNotFound:
        cached_image = None
    if cached_image is not None:
        cached_image.tag(CACHE_REPO, sha)  # marks the use (and names an image Docker had anyway)
        return False
    names = [t for t in image.get("repo_tags") or [] if not _has(client, t)]
    if "recipe" not in image:
        raise ImageRefused("the task was recorded by an earlier PINK without its image's layers: submit it again")
    try:
        recipe = recipes.Recipe.from_dict(image["recipe"])
        held.adopt(recipe)
        _load_recipe(client, recipe, held.store)
    except APIError as exc:
        raise RuntimeError(f"docker load failed: {exc.explanation or exc}") from None
    try:
        loaded = client.images.get(image["image_id"])
    except ImageNotFound:
        raise ImageRefused(f"docker load did not produce image {image['image_id']}") from None
    loaded.tag(CACHE_REPO, sha)
    for name in names:  # the load named it: only the cache's tag stays, so eviction frees its disk
        try:
            client.images.remove(name)
        except (APIError, ImageNotFound):
            pass
    return True


def _load_recipe(client: docker.DockerClient, recipe: recipes.Recipe, store: blob_store.BlobStore) -> None:
    """Load the archive rebuilt from `recipe`, its layers Docker holds left empty.

    Should Docker drop such a layer meanwhile (another image evicted), the
    load fails and the whole archive goes in instead.
    """
    skip = layers_docker_holds(client, recipe, verified_diff_ids(store, recipe))
    if skip:
        try:
            with rebuilt_archive.open_archive(recipe, store, skip) as archive:
                client.images.load(archive)
            return
        except (APIError, ImageLoadError) as exc:
            log.warning("image %s: load without the %d layers Docker held failed (%s); loading it whole",
                        recipe.image_id, len(skip), exc)
    with rebuilt_archive.open_archive(recipe, store) as archive:
        client.images.load(archive)


def verified_diff_ids(store: blob_store.BlobStore, recipe: recipes.Recipe) -> list[str]:
    """The config's diff_ids once each is shown to be its layer's, from the blobs this runner checked.

    The record comes from a web node, which checked them too, but its
    contents came from a user, and `docker load` reads no layer whose chain
    id Docker holds: a config naming another user's diff_ids over harmless
    layers would run on that user's files. A plain layer costs nothing here
    (its digest, checked on arrival, is its diff_id); a compressed one is
    hashed once per store. ImageRefused fails the task, saying why.
    """
    try:
        return blob_store.verified_diff_ids(store, recipe)
    except PinkError as exc:
        raise ImageRefused(f"image {recipe.image_id} refused: {exc.message}") from None


def layers_docker_holds(client: docker.DockerClient, recipe: recipes.Recipe,
                        diff_ids: list[str]) -> frozenset[str]:
    """The layer blobs of `recipe` that `docker load` would not read, given
    its config's `diff_ids` as `verified_diff_ids` returned them.

    Docker's graph-driver store (moby image/tarexport/load.go, Docker 20.10
    to today) untars the whole archive, then reads a layer's tar only when no
    layer stack with its chain id exists: a new image on a 10 GB base
    otherwise costs a 10 GB untar to load 10 kB. The containerd image store
    reads every blob, so it is given the whole archive (empty set).
    """
    try:  # an image evicted while it is listed: load the whole archive
        if _containerd_store(client):
            return frozenset()
        present = {chain for image in client.images.list()
                   for chain in _chain_ids((image.attrs.get("RootFS") or {}).get("Layers") or [])}
    except DockerException:
        return frozenset()
    chains = _chain_ids(diff_ids)
    needed = {layer for layer, chain in zip(recipe.layers, chains) if chain not in present}
    return frozenset(recipe.layers) - needed


def _chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain id of each layer stack, base first (OCI image spec, config.md)."""
    chains: list[str] = []
    for diff_id in diff_ids:
        chains.append(diff_id if not chains else
                      "sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest())
    return chains


def _containerd_store(client: docker.DockerClient) -> bool:
    status = client.info().get("DriverStatus") or []
    return any(pair[0] == "driver-type" and "containerd" in str(pair[1]) for pair in status if len(pair) == 2)


def _has(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
        return True
    except (ImageNotFound, APIError):
        return False


def evict(client: docker.DockerClient, budget: int, spared: set[str]) -> list[str]:
    """Untag least recently used cached images (not in `spared`, archive
    digests of the tasks started or reserved here) until the cache's size is
    within `budget` bytes; an image left with no tag is deleted. Returns the
    digests evicted."""
    entries = []
    for image in client.images.list(name=CACHE_REPO):
        for tag in image.tags:
            if tag.startswith(CACHE_REPO + ":"):
                last = image.attrs.get("Metadata", {}).get("LastTagTime") or ""
                entries.append((last, tag.split(":", 1)[1], image))
    total = sum(image.attrs.get("Size", 0) for _, _, image in entries)
    evicted = []
    for _, sha, image in sorted(entries, key=lambda e: e[0]):
        if total <= budget:
            break
        if sha in spared:
            continue
        client.images.remove(f"{CACHE_REPO}:{sha}")
        total -= image.attrs.get("Size", 0)
        evicted.append(sha)
        if len(image.tags) == 1:
            try:
                client.images.remove(image.id)
            except APIError:
                pass  # a stopped container still refers to it: Docker keeps it
    return evicted


def sweep_spool(spool_dir: str, keep: set[str], grace: float) -> list[str]:
    """Remove archives (and interrupted part files) older than `grace` seconds
    that no reservation here needs (`keep`: archive digests). Archives copied
    for tasks that were then cancelled or moved elsewhere are never loaded,
    and would otherwise fill the spool and its `max_spool_images`."""
    removed = []
    now = time.time()
    for name in os.listdir(spool_dir):
        path = os.path.join(spool_dir, name)
        sha = name.split(".", 1)[0]
        if sha in keep or not (name.endswith(".tar") or name.endswith(".part")):
            continue
        try:
            if now - os.stat(path).st_mtime > grace:
                os.remove(path)
                removed.append(name)
        except FileNotFoundError:
            pass  # loaded (and removed) meanwhile
    return removed


# ---------------------------------------------------------------- blobs

INCOMING = wire.SPOOL_INCOMING  # blobs as the transfer account wrote them, not trusted yet
HELD = wire.SPOOL_HELD  # an empty marker per verified blob, which transfer jobs look for


class BlobMissing(RuntimeError):
    """A blob the transfer counted on (held here when it looked) is gone: the
    store collected it in between. Another attempt copies it again."""


class RunnerBlobs:
    """The runner's image blobs: verified copies outside the SFTP chroot, where
    the transfer account cannot touch them, and markers inside it.

    A transfer job sends only the blobs without a marker in `held/`, into
    `incoming/`; the runner copies each one it needs into its store with its
    sha256 checked (a copy, not a rename: the account could still write to a
    file it sent, or unpacks a `<digest>.zst` into it) and marks it held. A
    marker the account fakes only makes a transfer skip a blob; the runner
    finds it missing, drops the marker and re-queues the task (a loss, so
    bounded by max_attempts): it can never make the runner use bytes it did
    not check. The store is collected by
    LRU under its budget, sparing the blobs of tasks reserved here.
    """

    def __init__(self, spool_dir: str, root: str, budget: int):
        self.store = blob_store.BlobStore(root, budget)
        self.incoming = os.path.join(spool_dir, INCOMING)
        self.held = os.path.join(spool_dir, HELD)
        owner = os.stat(spool_dir)
        os.makedirs(self.incoming, exist_ok=True)
        os.chown(self.incoming, owner.st_uid, owner.st_gid)  # the transfer account writes here
        os.makedirs(self.held, mode=0o755, exist_ok=True)
        os.chown(self.held, 0, 0)
        os.chmod(self.held, 0o755)

    def sync_markers(self) -> None:
        """Markers exactly for the blobs the store holds (at start: either may have changed)."""
        present = {e.name for e in os.scandir(self.store.blob_dir) if not e.name.startswith(".")}
        for entry in os.scandir(self.held):
            if entry.name not in present:
                Path(entry.path).unlink(missing_ok=True)
        for digest in present:
            self._mark(digest)

    def _mark(self, digest: str) -> None:
        path = os.path.join(self.held, digest)
        if not os.path.exists(path):
            with open(path, "w"):
                pass

    def adopt(self, recipe: recipes.Recipe) -> None:
        """Have every blob of `recipe` verified in the store: BlobMissing for one
        not here, RuntimeError for one that arrived damaged."""
        for digest in recipe.blobs:
            if not self.store.touch(digest):
                self._take(digest, recipe)
            self._mark(digest)

    def _take(self, digest: str, recipe: recipes.Recipe) -> None:
        """Copy a sent blob (as it is, or zstd-compressed: pink.wire) into the store, its sha256 checked.

        Whatever else sits under its names (a link, a directory, a plain
        file of the wrong size beside a compressed one) is removed, so the
        next transfer sends the blob again.
        """
        size = recipe.sizes[digest]
        paths = [os.path.join(self.incoming, digest + suffix) for suffix in ("", wire.SUFFIX)]
        try:
            for path in paths:
                fd = _open_sent(path)
                if fd is None:
                    continue
                try:  # read through the descriptor: the account cannot swap the file under us
                    if path == paths[0] and os.fstat(fd).st_size == size:
                        self.store.ingest(digest, f"/proc/self/fd/{fd}", 0, size)
                        return
                    if path == paths[1]:
                        self._unpack(digest, fd, size)
                        return
                except (PinkError, zstandard.ZstdError) as exc:
                    raise RuntimeError(f"layer sha256:{digest} arrived damaged: "
                                       f"{getattr(exc, 'message', exc)}") from None
                finally:
                    os.close(fd)
        finally:
            for path in paths:
                _remove_entry(path)
        if self.store.touch(digest):
            return  # a task sharing the layer took it meanwhile
        Path(self.held, digest).unlink(missing_ok=True)  # so the next transfer sends it
        raise BlobMissing(f"layer sha256:{digest} of image {recipe.image_id} is not on this runner "
                          "(collected after the transfer looked, or not sent as a plain file)")

    def _unpack(self, digest: str, fd: int, size: int) -> None:
        if os.fstat(fd).st_size > wire.bound(size):
            raise BadRequest(f"its compressed copy is larger than {size} bytes can compress to")
        owner = f"unpack-{uuid.uuid4().hex}"  # a part of its own: never resumed
        try:
            with wire.unpacking_reader(fd) as stream:
                if self.store.write(owner, digest, stream, size) < size:
                    raise BadRequest(f"it unpacks to fewer than its {size} bytes")
        finally:
            self.store.discard(owner, digest)

    def collect(self, keep: set[str], grace: float) -> list[str]:
        """Collect the store (sparing `keep`) and incoming blobs older than `grace` no reservation needs."""
        gone = self.store.collect(keep, grace=grace)
        for digest in gone:
            Path(self.held, digest).unlink(missing_ok=True)
        now = time.time()
        for entry in os.scandir(self.incoming):
            try:
                if entry.name.split(".", 1)[0] not in keep and \
                        now - entry.stat(follow_symlinks=False).st_mtime > grace:
                    _remove_entry(entry.path)
            except FileNotFoundError:
                pass
        return gone


def _open_sent(path: str) -> int | None:
    """A descriptor of the regular file at `path`, never following a link the
    transfer account planted (to a device, or a secret of this host); None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _remove_entry(path: str) -> None:
    """Remove whatever the transfer account left at `path`, a directory too."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass
