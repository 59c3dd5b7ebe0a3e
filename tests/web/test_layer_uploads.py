"""Layer uploads: `pink submit` sends only the layers the web node lacks, a cut
layer upload resumes, and nobody can claim a layer they do not hold."""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import tarfile
import time
import uuid
from urllib.parse import urlparse

import pytest
import zstandard

from pink import blob_store, image_archive, possession, recipes, wire
from tests import images
from tests.helpers import Api, begin_upload, make_user

BASE_BYTES = 4 * 2**20
NEW_BYTES = 2**20


@pytest.fixture(scope="module")
def layered(docker_client, tmp_path_factory):
    """Archives of image A (busybox + a 4 MiB layer + a small one) and B (A + a new 1 MiB layer)."""
    where = tmp_path_factory.mktemp("layers")
    run = uuid.uuid4().hex[:8]
    tag_a, tag_b = f"pink/test-layers-a:{run}", f"pink/test-layers-b:{run}"
    images.build_image(docker_client, tag_a, 'COPY base.bin /base.bin\nCOPY small.txt /small.txt\n'
                       'CMD ["sh", "-c", "sleep 2; ls -l /base.bin"]\n',
                       files={"base.bin": os.urandom(BASE_BYTES), "small.txt": run.encode()})
    images.build_image(docker_client, tag_b, f'FROM {tag_a}\nCOPY new.bin /new.bin\n'
                       'CMD ["sh", "-c", "sleep 2; ls -l /new.bin"]\n', files={"new.bin": os.urandom(NEW_BYTES)})
    return images.save_image(docker_client, tag_a, where / "a.tar"), images.save_image(docker_client, tag_b,
                                                                                        where / "b.tar")


def _recipe(archive) -> tuple[recipes.Recipe, dict, image_archive.ImageInfo]:
    info = image_archive.inspect(archive)
    recipe, where = recipes.Recipe.from_archive(archive, info)
    return recipe, where, info


def _bytes(archive, where: tuple[int, int]) -> bytes:
    with open(archive, "rb") as fh:
        fh.seek(where[0])
        return fh.read(where[1])


def test_the_second_image_sends_only_its_new_layer(api, layered):
    archive_a, archive_b = layered
    first = json.loads(api.cli("submit", str(archive_a), "--json").stdout)
    second = api.cli("submit", str(archive_b), "--json")
    task_b = json.loads(second.stdout)
    assert "layers are already on the server" in second.stderr
    a, b = api.wait(first["id"]), api.wait(task_b["id"])
    assert a["state"] == b["state"] == "succeeded", (a, b)
    recipe_b, _, _ = _recipe(archive_b)
    new_layer = recipe_b.sizes[recipe_b.layers[-1]]
    assert a["timings"]["upload_bytes"] >= BASE_BYTES
    # B's new layer and its config, nothing of A's: at most 1.05x the new layer, on both hops
    assert new_layer <= b["timings"]["upload_bytes"] <= 1.05 * new_layer, b["timings"]
    assert a["node"] == b["node"] and a["timings"]["transfer_bytes"] >= BASE_BYTES
    assert new_layer <= b["timings"]["transfer_bytes"] <= 1.05 * new_layer, b["timings"]
    assert b"new.bin" in api("GET", f"/tasks/{b['id']}/logs").content


def test_images_sharing_layers_run_on_one_runner_at_once(api, layered):
    archive_a, archive_b = layered
    ids = [api.submit(archive).json()["task"]["id"] for archive in (archive_a, archive_b)]
    done = [api.wait(task_id) for task_id in ids]
    assert [t["state"] for t in done] == ["succeeded", "succeeded"] and {t["node"] for t in done} == {"run1"}
    spans = [(_at(t, "running"), _at(t, "exported")) for t in done]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans  # they overlapped


def _at(task: dict, state: str) -> str:
    return next(h["at"] for h in task["history"] if h["state"] == state)


def test_a_cut_layer_upload_resumes_where_it_stopped(web, layered):
    api = Api(web, make_user(web, "rosa"))
    archive_a, _ = layered
    recipe, where, _ = _recipe(archive_a)
    plan = begin_upload(api, archive_a)
    big = max(plan["missing"], key=lambda d: recipe.sizes[d])
    data = _bytes(archive_a, where[big])
    url = urlparse(api.url)
    conn = http.client.HTTPSConnection(url.hostname, url.port,
                                       context=ssl.create_default_context(cafile=api.ca))
    conn.putrequest("PUT", f"/api/v1/uploads/{plan['upload']}/blobs/{big}")
    for name, value in (("Authorization", f"Bearer {api.token}"), ("Content-Length", str(len(data))),
                        ("Upload-Offset", "0")):
        conn.putheader(name, value)
    conn.endheaders()
    conn.send(data[:len(data) // 2])
    conn.close()  # the connection is cut half way
    path = f"/uploads/{plan['upload']}/blobs/{big}"
    deadline = time.monotonic() + 20
    while not 0 < (held := int(api("HEAD", path).headers["Upload-Offset"])):
        assert time.monotonic() < deadline, "the server kept nothing of the cut upload"
        time.sleep(0.2)
    assert held <= len(data) // 2
    for _ in range(50):  # the server may still be finishing the cut request
        r = api("PUT", path, data=data[held:], headers={"Upload-Offset": str(held)})
        if r.status_code != 409:
            break
        time.sleep(0.2)
    assert r.status_code == 201, r.text
    wrong = api("PUT", f"/uploads/{plan['upload']}/blobs/{big}", data=b"x", headers={"Upload-Offset": "1"})
    assert wrong.status_code == 201  # done: later retries are answered, not written
    for digest in plan["missing"]:
        if digest != big:
            assert api("PUT", f"/uploads/{plan['upload']}/blobs/{digest}",
                       data=_bytes(archive_a, where[digest])).status_code == 201
    r = api("POST", f"/uploads/{plan['upload']}/commit", json={"proofs": {}})
    assert r.status_code == 201, r.text
    task = r.json()["task"]
    assert task["image"]["image_id"] == recipe.image_id
    store = blob_store.BlobStore(web.web.blob_root, 2**40)
    assert store.missing(recipe.blobs) == []


def test_a_layer_is_claimed_only_by_someone_holding_it(web, layered):
    archive_a, _ = layered
    owner = Api(web, make_user(web, "sara"))
    assert owner.cli("submit", str(archive_a), "--json").returncode == 0  # A's layers are now on the server
    recipe, where, _ = _recipe(archive_a)
    thief = Api(web, make_user(web, "tim"))
    plan = begin_upload(thief, archive_a)  # a manifest naming sara's layers, read from somewhere
    assert plan["missing"] == [] and set(plan["challenges"]) == set(recipe.layers)
    commit = f"/uploads/{plan['upload']}/commit"
    refused = thief("POST", commit, json={"proofs": {}})
    assert refused.status_code == 409 and refused.json()["error"] == "blobs_missing"
    guesses = {d: "0" * 64 for d in recipe.layers}
    assert thief("POST", commit, json={"proofs": guesses}).status_code == 409
    junk = thief("PUT", f"/uploads/{plan['upload']}/blobs/{recipe.layers[-1]}", data=b"not the layer")
    assert junk.status_code == 200 and "challenge" in junk.json()  # sending bytes is no proof either
    assert thief("POST", commit, json={"proofs": guesses}).status_code == 409

    # Whoever holds the layers proves it without sending them: ranges hashed with the nonce
    holder = Api(web, make_user(web, "uli"))
    plan = begin_upload(holder, archive_a)
    proofs = {d: possession.proof(lambda o, n, d=d: _bytes(archive_a, (where[d][0] + o, n)), c)
              for d, c in plan["challenges"].items()}
    r = holder("POST", f"/uploads/{plan['upload']}/commit", json={"proofs": proofs})
    assert r.status_code == 201, r.text
    assert r.json()["task"]["timings"]["upload_bytes"] == recipe.sizes[recipe.config]


def test_bad_manifests_are_refused(web, layered):
    api = Api(web, make_user(web, "vik"))
    archive_a, _ = layered
    recipe, where, info = _recipe(archive_a)
    config = base64.b64encode(_bytes(archive_a, where[recipe.config])).decode()
    layers = [{"digest": d, "size": recipe.sizes[d]} for d in recipe.layers]
    for body, word in (({"config": "%%%", "layers": layers}, "base64"),
                       ({"config": config, "layers": layers[:-1]}, "diff_ids"),
                       ({"config": config, "layers": layers, "repo_tags": ["pink/cache:x"]}, "pink/cache"),
                       ({"config": config, "layers": layers, "layout": "zip"}, "layout")):
        r = api("POST", "/uploads", json=body)
        assert r.status_code == 400 and word in r.json()["message"], (body.keys(), r.text)
    assert api("POST", "/uploads/0123/commit").status_code == 404


def test_the_runner_loads_only_blobs_it_checked(api, docker_client, tmp_path):
    """Bytes in the spool under a layer's name are not trusted: the runner hashes
    what it adopts, and an attempt whose layer arrived damaged fails saying so;
    damage on the way is the infrastructure's failure, so the next attempt has
    the layer copied again, checked and run."""
    archive = images.fresh_archive(docker_client, "planted", tmp_path / "planted.tar", images.WRITER)
    recipe, _, _ = _recipe(archive)
    layer = recipe.layers[-1]
    planted = os.path.join(api.config.runner.spool_dir, "incoming", layer)
    with open(planted, "wb") as fh:  # what a transfer account gone bad could leave there
        fh.write(b"\0" * recipe.sizes[layer])
    task = api.wait(api.submit(archive).json()["task"]["id"])
    assert (task["state"], task["attempt"]) == ("succeeded", 2), task
    assert any("arrived damaged" in (h["detail"] or "") for h in task["history"]), task["history"]
    assert not os.path.exists(planted)
    assert task["timings"]["transfer_bytes"] > 0  # sent again (compressed: pink.wire)


def test_a_whole_archive_cannot_claim_a_layer_it_does_not_hold(web, layered, tmp_path):
    """`curl --data-binary @image.tar` names its layers too: a forged archive naming
    another user's layer with other bytes is refused, not matched by name."""
    archive_a, _ = layered
    owner = Api(web, make_user(web, "wendy"))
    assert owner.submit(archive_a).status_code == 201  # A's layers are in the store
    with tarfile.open(archive_a) as tar:
        layer = max((m for m in tar.getmembers() if m.name.endswith("layer.tar")), key=lambda m: m.size)
    forged = images.copy_tar(archive_a, tmp_path / "forged.tar", replace={layer.name: b"\0" * layer.size})
    r = Api(web, make_user(web, "xavi")).submit(forged)
    assert r.status_code == 400 and r.json()["error"] == "digest_mismatch", r.text


def test_a_task_runs_again_with_its_image_while_the_layers_are_kept(api, writer_archive):
    first = api.wait(api.submit(writer_archive, name="once").json()["task"]["id"])
    again = api("POST", f"/tasks/{first['id']}/rerun", params={"name": "twice", "cmd": "echo again"})
    assert again.status_code == 201, again.text
    task = api.wait(again.json()["task"]["id"])
    assert task["state"] == "succeeded" and task["name"] == "twice" and task["timings"]["upload_bytes"] == 0
    assert task["image"]["image_id"] == first["image"]["image_id"]
    assert api("GET", f"/tasks/{task['id']}/logs").content == b"again\n"
    same = api.wait(api("POST", f"/tasks/{first['id']}/rerun").json()["task"]["id"])
    assert same["params"]["name"] == "once" and same["state"] == "succeeded"  # the task's own parameters
    assert Api(api.config, make_user(api.config, "zed"))("POST", f"/tasks/{first['id']}/rerun").status_code == 404
    store = blob_store.BlobStore(api.config.web.blob_root, 2**40)
    recipe = recipes.Recipe.from_archive(writer_archive, image_archive.inspect(writer_archive))[0]
    os.remove(store.path(recipe.config))  # collected: the layers are no longer kept
    gone = api("POST", f"/tasks/{first['id']}/rerun")
    assert gone.status_code == 410 and "submit its archive again" in gone.json()["message"]


def test_a_layer_that_shrinks_crosses_compressed(api, docker_client, tmp_path):
    """Once a big copy has shown the link's rate (random bytes: sent as they are), a
    16 MiB layer of text goes to the runner zstd-compressed, a fraction of its bytes,
    and is unpacked and checked there; a damaged compressed copy fails the task."""
    noise = images.fresh_archive(docker_client, "noise", tmp_path / "noise.tar",
                                 "RUN head -c 12582912 /dev/urandom > /noise\n")
    task = api.wait(api.submit(noise).json()["task"]["id"])
    assert task["state"] == "succeeded" and task["timings"]["transfer_bytes"] > 12 << 20, task
    archive = images.fresh_archive(docker_client, "text", tmp_path / "text.tar",
                                   "RUN yes 'lorem ipsum dolor sit amet' | head -c 16777216 > /text\n"
                                   'CMD ["sh", "-c", "wc -c < /text"]\n')
    recipe, _, _ = _recipe(archive)
    layer = recipe.layers[-1]
    task = api.wait(api.submit(archive).json()["task"]["id"])
    assert task["state"] == "succeeded", task
    assert task["timings"]["transfer_bytes"] < recipe.sizes[layer] / 4, task["timings"]
    assert api("GET", f"/tasks/{task['id']}/logs").text.split() == ["16777216"]

    damaged = images.fresh_archive(docker_client, "text-damaged", tmp_path / "damaged.tar",
                                   "RUN yes 'consectetur adipiscing' | head -c 8388608 > /text\n")
    recipe, _, _ = _recipe(damaged)
    planted = os.path.join(api.config.runner.spool_dir, "incoming", recipe.layers[-1] + wire.SUFFIX)
    with open(planted, "wb") as fh:  # a truncated frame where the copy goes: the transfer takes it as sent
        fh.write(zstandard.ZstdCompressor().compress(b"consectetur " * 100_000)[:5000])
    task = api.wait(api.submit(damaged).json()["task"]["id"])
    assert (task["state"], task["attempt"]) == ("succeeded", 2), task  # copied again after the damage
    assert any("arrived damaged" in (h["detail"] or "") for h in task["history"]), task["history"]
    assert not os.path.exists(planted)


def test_a_link_planted_under_a_compressed_name_is_not_taken_for_a_copy(api, docker_client, tmp_path):
    """A link at incoming/<digest>.zst neither makes the transfer skip the blob nor feeds the runner."""
    archive = images.fresh_archive(docker_client, "linked", tmp_path / "linked.tar",
                                   "RUN echo linked > /linked\n" + images.WRITER)
    recipe, _, _ = _recipe(archive)
    planted = os.path.join(api.config.runner.spool_dir, "incoming", recipe.layers[-1] + wire.SUFFIX)
    os.symlink("/etc/shadow", planted)
    task = api.wait(api.submit(archive).json()["task"]["id"])
    assert task["state"] == "succeeded" and task["timings"]["transfer_bytes"] > 0, task
    assert not os.path.lexists(planted)
