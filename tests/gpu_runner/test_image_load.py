"""Loading an image rebuilt from blobs: layers Docker holds are not sent into `docker load` again."""

from __future__ import annotations

import uuid

import docker
import pytest

from gpu_runner import images as runner_images
from pink.blob_store import BlobStore
from pink.rebuilt_archive import archive_size, open_archive
from pink.recipes import Recipe
from pink.image_archive import inspect
from tests import images

BASE_BYTES = 4 << 20


@pytest.fixture
def on_a_held_base(docker_client, tmp_path):
    """Image B = a base Docker holds (busybox + 4 MiB) + a small new layer; B
    itself saved, stored as blobs and removed from Docker."""
    nonce = uuid.uuid4().hex
    base = images.build_image(docker_client, f"pink/test-base:{nonce[:8]}",
                              f"RUN head -c {BASE_BYTES} /dev/urandom > /base; echo {nonce} > /base-nonce\n")
    tag = f"pink/test-top:{nonce[:8]}"
    images.build_image(docker_client, tag, f'RUN echo {nonce} > /top\nCMD ["sh", "-c", "cat /top; wc -c < /base"]\n',
                       base=base)
    archive = images.save_image(docker_client, tag, tmp_path / "b.tar")
    image_id = docker_client.images.get(tag).id
    docker_client.images.remove(tag)
    store = BlobStore(tmp_path / "store", budget_bytes=2**30)
    recipe, where = Recipe.from_archive(archive, inspect(archive))
    for digest, (offset, size) in where.items():
        store.ingest(digest, archive, offset, size)
    yield {"recipe": recipe, "store": store, "base": base, "image_id": image_id, "nonce": nonce}
    try:
        docker_client.images.remove(image_id, force=True)
    except docker.errors.ImageNotFound:
        pass


def _held(client, recipe: Recipe, store: BlobStore) -> frozenset[str]:
    return runner_images.layers_docker_holds(client, recipe, runner_images.verified_diff_ids(store, recipe))


def _runs(client, image_id: str) -> list[str]:
    return client.containers.run(image_id, remove=True, network_disabled=True).decode().split()


def test_layers_docker_holds_are_left_empty(docker_client, on_a_held_base):
    recipe, store = on_a_held_base["recipe"], on_a_held_base["store"]
    skip = _held(docker_client, recipe, store)
    assert skip == set(recipe.layers[:-1])  # every layer but the new one
    with open_archive(recipe, store, skip) as archive:
        assert archive.size < archive_size(recipe) - BASE_BYTES
    runner_images._load_recipe(docker_client, recipe, store)
    assert _runs(docker_client, on_a_held_base["image_id"]) == [on_a_held_base["nonce"], str(BASE_BYTES)]


def test_a_base_dropped_meanwhile_loads_whole(docker_client, on_a_held_base, monkeypatch):
    """Docker lost the base between the look and the load: the empty layers fail, the whole archive loads."""
    recipe, store = on_a_held_base["recipe"], on_a_held_base["store"]
    stale = _held(docker_client, recipe, store)
    docker_client.images.remove(on_a_held_base["base"], force=True)
    assert _held(docker_client, recipe, store) < stale
    monkeypatch.setattr(runner_images, "layers_docker_holds", lambda *_: stale)
    runner_images._load_recipe(docker_client, recipe, store)
    assert _runs(docker_client, on_a_held_base["image_id"]) == [on_a_held_base["nonce"], str(BASE_BYTES)]
