"""The runner's image cache: archives arriving in the spool, loaded into Docker.

A loaded archive is tagged `pink/cache:<archive sha256>`, so the cache
survives runner restarts and the node record can tell transfer jobs which
images need no copy. Every use tags it again, so Docker's LastTagTime is the
last use, and `evict` removes the least recently used images neither in use
nor reserved until the cache fits its disk budget. Called by the agent (inventory) and
execution (load, evict).
"""

from __future__ import annotations

import os
import time

import docker
from docker.errors import APIError, ImageNotFound

from pink import defaults

CACHE_REPO = defaults.IMAGE_CACHE_REPO


def cached(client: docker.DockerClient) -> list[str]:
    """Archive digests whose images are loaded here."""
    tags = [t for image in client.images.list(name=CACHE_REPO) for t in image.tags]
    return sorted(t.split(":", 1)[1] for t in tags if t.startswith(CACHE_REPO + ":"))


def ensure_loaded(client: docker.DockerClient, spool_dir: str, image: dict) -> bool:
    """Load the task's archive unless it is cached; True when it was loaded now.

    Callers hold the image's lock (`Agent.image_lock`): tasks sharing an
    image start together, and only one of them may load it and remove the
    archive from the spool.

    The archive was validated on upload; Docker must still agree on the image
    id, or the archive is not what the web node inspected.
    """
    sha = image["sha256"]
    path = os.path.join(spool_dir, f"{sha}.tar")
    try:
        cached_image = client.images.get(f"{CACHE_REPO}:{sha}")
    except ImageNotFound:
        cached_image = None
    if cached_image is not None and cached_image.id == image["image_id"]:
        cached_image.tag(CACHE_REPO, sha)  # marks the use
        if os.path.exists(path):
            os.remove(path)  # copied again before the node record listed the image
        return False
    try:
        with open(path, "rb") as fh:
            client.images.load(fh)
    except FileNotFoundError:
        raise RuntimeError(f"image archive {sha}.tar is not in the spool") from None
    except APIError as exc:
        raise RuntimeError(f"docker load failed: {exc.explanation or exc}") from None
    try:
        loaded = client.images.get(image["image_id"])
    except ImageNotFound:
        raise RuntimeError(f"docker load did not produce image {image['image_id']}") from None
    loaded.tag(CACHE_REPO, sha)
    os.remove(path)
    return True


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
