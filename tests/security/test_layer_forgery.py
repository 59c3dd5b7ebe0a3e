"""Layer forgery: a user cannot run their code on another user's private layers by
naming them, whatever door the image comes in by (a whole archive, classic or
Docker 25 / OCI layout, plain or gzip layers; an upload session) or whatever
the client says about its layers' layout and sizes; nor hold more upload
sessions, or bytes in them, than the shipped per-user limits allow.

The forgery: the image config lists the victim's `diff_ids` while the layer
blobs hold the forger's own harmless bytes. Docker reuses a layer whose chain
id it holds without reading the archive's tar, so unless PINK checks that each
diff_id is the sha256 of its layer's uncompressed tar, the forger's container
runs on the victim's files."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import time
import uuid

import docker
import pytest

from gpu_runner import images as runner_images
from pink import blob_store, image_archive, possession, rebuilt_archive, recipes, upload_sessions
from pink.config import LimitsConfig
from pink.errors import NotFound, TooManyRequests
from tests import images
from tests.helpers import Api, make_user

@pytest.fixture(scope="module")
def private(docker_client, tmp_path_factory):
    """User A's image: a layer holding /secret.txt on the busybox base, its archive and config."""
    secret = f"secret-{uuid.uuid4().hex}"
    tag = f"pink/test-private:{secret[7:15]}"
    images.build_image(docker_client, tag, 'COPY secret.txt /secret.txt\nCMD ["cat", "/secret.txt"]\n',
                       files={"secret.txt": secret.encode()})
    archive = images.save_image(docker_client, tag, tmp_path_factory.mktemp("private") / "private.tar")
    config = json.loads(images.read_member(archive, image_archive.inspect(archive).config))
    return {"secret": secret, "archive": archive, "config": config, "tag": tag}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _begin(api: Api, config: bytes, layers: list[tuple[str, int]], layout: str):
    return api("POST", "/uploads", json={"config": base64.b64encode(config).decode(), "layout": layout,
                                         "layers": [{"digest": d, "size": n} for d, n in layers]})


def _refused_as_forged(r) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "diff_id_mismatch" and "layer 1 of" in r.json()["message"], r.text


def test_a_forged_config_cannot_run_on_another_users_private_layer(api, private, tmp_path):
    """A user cannot read another user's private layer by listing its diff_ids in a
    config over their own bytes: the whole-archive upload (Docker 25 layout) and
    the upload-session API (any layout the client claims) refuse it with a 400
    naming the layer, no task is made, and the owner's tasks still run."""
    owner = Api(api.config, make_user(api.config, "anna"))
    first = owner.wait(owner.submit(private["archive"]).json()["task"]["id"])
    assert first["state"] == "succeeded", first  # the runner's Docker now holds anna's layers
    assert owner("GET", f"/tasks/{first['id']}/logs").text.strip() == private["secret"]

    forger = Api(api.config, make_user(api.config, "boris"))
    config, layers = images.forgery(private["config"])
    _refused_as_forged(forger.submit(images.archive_of(tmp_path / "forged-oci.tar", config, layers, "oci")))

    for layout in ("oci", "docker"):  # the client names the layout: it must not matter
        config, layers = images.forgery(private["config"])
        begun = _begin(forger, config, [(_sha(x), len(x)) for x in layers], layout)
        assert begun.status_code == 201, begun.text
        upload = begun.json()["upload"]
        for layer in layers:
            assert forger("PUT", f"/uploads/{upload}/blobs/{_sha(layer)}", data=layer).status_code == 201
        _refused_as_forged(forger("POST", f"/uploads/{upload}/commit", json={"proofs": {}}))
        assert forger("HEAD", f"/uploads/{upload}/blobs/{_sha(layers[0])}").status_code == 404  # closed

    assert forger("GET", "/tasks").json()["tasks"] == []
    again = owner.wait(owner.submit(private["archive"]).json()["task"]["id"])
    assert again["state"] == "succeeded", again
    assert owner("GET", f"/tasks/{again['id']}/logs").text.strip() == private["secret"]


def test_a_classic_archive_cannot_forge_diff_ids(web, private, tmp_path):
    """A user cannot pass their own bytes off as another's layer in the classic
    (Docker 24) layout, where layers are named by their diff_ids: refused, no task."""
    forger = Api(web, make_user(web, "carl"))
    config, layers = images.forgery(private["config"])
    r = forger.submit(images.archive_of(tmp_path / "forged-classic.tar", config, layers, "classic"))
    assert r.status_code == 400 and r.json()["error"] == "digest_mismatch", r.text
    assert forger("GET", "/tasks").json()["tasks"] == []


def test_gzip_layers_are_checked_by_their_decompressed_bytes(web, private, tmp_path):
    """A user cannot forge diff_ids behind gzip-compressed OCI layers either: PINK
    hashes the decompressed tar itself, and a true gzip archive still gets in."""
    forger = Api(web, make_user(web, "dora"))
    config, layers = images.forgery(private["config"])
    zipped = [gzip.compress(layer, mtime=0) for layer in layers]
    _refused_as_forged(forger.submit(images.archive_of(tmp_path / "forged-gzip.tar", config, zipped, "oci")))

    honest = images.to_gzip_oci_archive(private["archive"], tmp_path / "honest-gzip.tar")
    r = Api(web, make_user(web, "anna")).submit(honest)
    assert r.status_code == 201, r.text
    store = blob_store.BlobStore(web.web.blob_root, 2**40)
    recipe, _ = recipes.Recipe.from_archive(honest, image_archive.inspect(honest))
    assert blob_store.verified_diff_ids(store, recipe) == private["config"]["rootfs"]["diff_ids"]
    assert all(os.path.exists(os.path.join(store.diff_id_dir, d)) for d in recipe.layers)  # hashed once, kept


def test_a_proof_of_possession_is_over_the_size_pink_recorded(web, private):
    """A user cannot claim another user's layer by lying about its size: a claimed
    size of 0 (a challenge over no bytes) or any other wrong size is refused, and
    the challenge covers the bytes PINK holds."""
    owner = Api(web, make_user(web, "emil"))
    assert owner.submit(private["archive"]).status_code == 201  # emil's layers are in the store
    recipe, _ = recipes.Recipe.from_archive(private["archive"], image_archive.inspect(private["archive"]))
    layer = recipe.layers[-1]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer}"]}}).encode()
    thief = Api(web, make_user(web, "fritz"))
    for claimed in (0, recipe.sizes[layer] - 1, recipe.sizes[layer] + 1):
        r = _begin(thief, config, [(layer, claimed)], "oci")
        assert r.status_code == 400 and r.json()["error"] == "wrong_size", (claimed, r.text)
        assert str(recipe.sizes[layer]) in r.json()["message"]
    r = _begin(thief, config, [(layer, recipe.sizes[layer])], "oci")
    assert r.status_code == 201, r.text
    ranges = r.json()["challenges"][layer]["ranges"]
    assert sum(length for _, length in ranges) == min(recipe.sizes[layer],
                                                      possession.PROOF_RANGES * possession.PROOF_RANGE)


def test_a_challenge_over_no_bytes_proves_nothing(tmp_path):
    """A challenge whose ranges read none of a non-empty blob is never accepted as proof."""
    store = blob_store.BlobStore(tmp_path / "store", 2**30)
    data = b"a layer" * 100
    store.write("owner", _sha(data), io.BytesIO(data), len(data))
    hollow = {"nonce": "11" * 16, "ranges": [[0, 0]]}
    assert not possession.check_proof(store, _sha(data), hollow, possession.proof(lambda o, n: data[o:o + n], hollow))
    fair = possession.challenge_held(store, _sha(data), len(data))
    assert possession.check_proof(store, _sha(data), fair, possession.proof(lambda o, n: data[o:o + n], fair))


def test_the_runner_does_not_reuse_a_layer_on_a_diff_id_it_did_not_check(docker_client, private, tmp_path):
    """A runner does not trust a record's config to pick the layers Docker reuses:
    a recipe whose config names layers Docker holds over other bytes fails to
    load, saying so, and no image of it appears (a web node's check is not the only one)."""
    config, layers = images.forgery(private["config"])
    store = blob_store.BlobStore(tmp_path / "runner-store", 2**30)
    for n, data in enumerate([config, *layers]):
        store.write(f"t{n}", _sha(data), io.BytesIO(data), len(data))
    recipe = recipes.Recipe(config=_sha(config), layers=[_sha(x) for x in layers], repo_tags=[],
                            sizes={_sha(x): len(x) for x in [config, *layers]})
    images.ensure_busybox_image(docker_client)
    docker_client.images.get(private["tag"])  # Docker holds every layer the config names
    with pytest.raises(runner_images.ImageRefused, match="diff_id"):  # the task's own failure: not again
        runner_images._load_recipe(docker_client, recipe, store)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(recipe.image_id)


def test_upload_sessions_stop_at_the_shipped_limit(web):
    """A user cannot hold more than `upload_sessions_per_user` (16 by default)
    upload sessions open: the next is refused with 429 naming the limit, other
    users are not affected, and abandoning one makes room."""
    limit = web.limits.upload_sessions_per_user
    assert limit == LimitsConfig.upload_sessions_per_user == 16
    hoarder = Api(web, make_user(web, "gina"))
    opened = []
    for n in range(limit + 1):
        layer = images.layer_of("x", f"{n}".encode())
        config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [f"sha256:{_sha(layer)}"]}}).encode()
        r = _begin(hoarder, config, [(_sha(layer), len(layer))], "docker")
        if n < limit:
            assert r.status_code == 201, (n, r.text)
            opened.append(r.json()["upload"])
    assert r.status_code == 429 and r.json()["error"] == "uploads_open", r.text
    assert f"upload_sessions_per_user = {limit}" in r.json()["message"], r.text
    other = Api(web, make_user(web, "hugo"))
    assert _begin(other, config, [(_sha(layer), len(layer))], "docker").status_code == 201
    assert hoarder("DELETE", f"/uploads/{opened[0]}").status_code == 200
    assert _begin(hoarder, config, [(_sha(layer), len(layer))], "docker").status_code == 201


def test_open_upload_sessions_count_against_the_upload_bytes_limit(web):
    """A user cannot book more image bytes than `upload_bytes_per_user` (shipped
    default) by opening sessions that have not sent them yet: what open sessions
    will hold counts with the image being begun."""
    assert web.limits.upload_bytes_per_user == LimitsConfig.upload_bytes_per_user
    per_image = recipes.MAX_BLOB_BYTES - 2**20  # the largest image one session may announce
    fits = web.limits.upload_bytes_per_user // per_image
    assert fits < web.limits.upload_sessions_per_user  # the bytes limit, not the count, must stop it
    booker = Api(web, make_user(web, "ida"))
    for n in range(fits + 1):
        digest = _sha(f"layer {n}".encode())
        config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [f"sha256:{digest}"]}}).encode()
        r = _begin(booker, config, [(digest, per_image)], "docker")
        if n < fits:
            assert r.status_code == 201, (n, r.text)
    assert r.status_code == 429, r.text


def test_sessions_are_counted_per_user_and_swept_in_either_layout(tmp_path):
    """A user's open sessions are counted from their own folder (not every user's),
    with the bytes their images will hold; the sweep keeps every open session's
    blobs and removes expired ones, those laid out before per-user folders too."""
    root = str(tmp_path)
    layer = images.layer_of("x", b"x")
    recipe = recipes.Recipe(config="c" * 64, layers=[_sha(layer)], repo_tags=[],
                            sizes={"c" * 64: 10, _sha(layer): len(layer)})
    mine = upload_sessions.create(root, "web1", "jo", recipe, "oci", {})
    upload_sessions.create(root, "web1", "kim", recipe, "oci", {})
    assert os.path.dirname(mine.root) == os.path.join(root, upload_sessions.SESSIONS, "jo")
    assert upload_sessions.check_room(root, "jo", 2) == rebuilt_archive.archive_size(recipe)
    with pytest.raises(TooManyRequests, match="upload_sessions_per_user = 1"):
        upload_sessions.check_room(root, "jo", 1)
    legacy = os.path.join(root, upload_sessions.SESSIONS, "web1." + "0" * 32)
    os.makedirs(legacy)
    with open(os.path.join(legacy, "session.json"), "w") as fh:
        json.dump({"user": "jo", "recipe": recipe.to_dict(), "layout": "oci", "challenges": {},
                   "created": time.time() - 2 * upload_sessions.SESSION_LIFE}, fh)
    assert upload_sessions.in_use(root) == {"c" * 64, _sha(layer)}
    assert upload_sessions.expire(root) == 1 and not os.path.exists(legacy)
    assert upload_sessions.load(root, mine.id, "jo").recipe == recipe
    with pytest.raises(NotFound):
        upload_sessions.load(root, mine.id, "kim")  # another user's id reads as a missing one


def _session_of(api: Api, layer: bytes, diff_id: str) -> str:
    """An upload session of a one-layer image whose config lists `diff_id`; its id."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["true"]},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    r = _begin(api, config, [(_sha(layer), len(layer))], "oci")
    assert r.status_code == 201, r.text
    return r.json()["upload"]


def _upload_and_commit(api: Api, layer: bytes, diff_id: str, before_commit=None):
    """Send `layer` through a new session (proving it when the store holds it) and commit."""
    upload = _session_of(api, layer, diff_id)
    r = api("PUT", f"/uploads/{upload}/blobs/{_sha(layer)}", data=layer)
    proofs = {}
    if r.status_code == 200:  # held already: prove it, as the CLI does
        proofs[_sha(layer)] = possession.proof(lambda o, n: layer[o:o + n], r.json()["challenge"])
    else:
        assert r.status_code == 201, r.text
    if before_commit:
        before_commit(upload)
    return api("POST", f"/uploads/{upload}/commit", json={"proofs": proofs})


def test_a_compressed_layers_diff_id_is_computed_when_its_upload_completes(web):
    """A commit never decompresses a layer: the request that completes a gzip
    layer's upload hashes it (bounded by that upload) and the store keeps the
    diff_id before any commit, which then only reads it and succeeds."""
    api = Api(web, make_user(web, "lena"))
    tar = images.layer_of("hello.txt", f"hello {uuid.uuid4().hex}\n".encode())
    layer = gzip.compress(tar, mtime=0)
    store = blob_store.BlobStore(web.web.blob_root, 2**40)

    def kept_before_commit(_upload):
        assert store.kept_diff_id(_sha(layer)) == f"sha256:{_sha(tar)}"

    r = _upload_and_commit(api, layer, f"sha256:{_sha(tar)}", kept_before_commit)
    assert r.status_code == 201, r.text


def test_a_refused_layer_is_not_hashed_again_on_replay(web):
    """A user cannot make the server decompress a bad layer over and over by
    replaying its commit through new sessions: the verdict on a layer that does
    not decompress (as a gzip bomb past the bound) or whose diff_id the config
    misstates is kept when its upload completes, and every later commit is
    refused from it, the kept file untouched."""
    api = Api(web, make_user(web, "mia"))
    store = blob_store.BlobStore(web.web.blob_root, 2**40)
    tar = images.layer_of("x.txt", uuid.uuid4().bytes)
    broken = b"\x1f\x8b\x08\x00" + uuid.uuid4().bytes * 64  # gzip magic, then no gzip stream
    cases = [(broken, f"sha256:{_sha(tar)}", "bad_layer"),
             (gzip.compress(tar, mtime=0), f"sha256:{'0' * 64}", "diff_id_mismatch")]
    for layer, claimed, error in cases:
        kept = os.path.join(store.diff_id_dir, _sha(layer))
        seen = []

        def verdict_kept(_upload):
            seen.append(os.stat(kept))

        for _ in range(2):  # the first session uploads the layer, the replay proves it held
            r = _upload_and_commit(api, layer, claimed, verdict_kept)
            assert r.status_code == 400 and r.json()["error"] == error, r.text
        if error == "bad_layer":
            assert store.kept_diff_id(_sha(layer)).startswith(blob_store.REFUSED)
            assert "does not decompress" in r.json()["message"], r.text
        else:
            assert store.kept_diff_id(_sha(layer)) == f"sha256:{_sha(tar)}"
        after = os.stat(kept)
        assert all((s.st_ino, s.st_mtime_ns) == (after.st_ino, after.st_mtime_ns) for s in seen)


def test_a_session_opened_before_per_user_folders_still_commits(web):
    """An upgrade does not drop an upload in progress: a session in the old flat
    layout (`uploads/<id>`) is found, for its own user only, and commits."""
    api = Api(web, make_user(web, "nils"))
    tar = images.layer_of("old.txt", uuid.uuid4().bytes)
    sessions = os.path.join(web.web.blob_root, upload_sessions.SESSIONS)

    def to_legacy_layout(upload):
        os.rename(os.path.join(sessions, "nils", upload), os.path.join(sessions, upload))
        other = Api(web, make_user(web, "olga"))
        assert other("HEAD", f"/uploads/{upload}/blobs/{_sha(tar)}").status_code == 404

    r = _upload_and_commit(api, tar, f"sha256:{_sha(tar)}", to_legacy_layout)
    assert r.status_code == 201, r.text
