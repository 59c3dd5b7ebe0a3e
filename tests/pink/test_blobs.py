"""Tests for pink.recipes, pink.blob_store and pink.rebuilt_archive: recipes of real
archives, the blob store, rebuilt archives.

Each image is built by the local Docker daemon with a nonce in its own
layers and removed from Docker once saved, so `docker load` of an archive
rebuilt from blobs really loads each of them; the loaded image is removed
again by the test that loaded it.
"""

import concurrent.futures
import fcntl
import gzip
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import tarfile
import threading
import time
import uuid

import docker
import pytest

from pink import blob_store
from pink.blob_store import PART_GRACE, BlobStore, WrongOffset
from pink.errors import BadRequest, Conflict, NotFound
from pink.rebuilt_archive import archive_size, open_archive, read_archive
from pink.recipes import MAX_BLOB_BYTES, MAX_LAYERS, Recipe
from pink.image_archive import inspect
from tests import images

LAYOUTS = ["classic", "oci", "pure_oci", "gzip_oci"]
ODD_READS = [1, 7, 511, 512, 513, 4099, 65537, 1_048_583]  # bytes per read, in turn


@pytest.fixture(scope="module")
def saved(docker_client, tmp_path_factory):
    """A two-layer image in every archive layout; the image itself is removed
    from Docker once saved, so each test's `docker load` creates it anew."""
    nonce = uuid.uuid4().hex
    tag = f"pink/test-blobs:{nonce[:8]}"
    with open(images.BUSYBOX, "rb") as f:
        shell = f.read()
    images.build_image(docker_client, tag, (  # ADD unpacks a tar, keeping /bin/sh executable
        'FROM scratch\nADD nonce.tar /\nADD sh.tar /\n'
        'CMD ["/bin/sh", "-c", "read -r x < /nonce; echo \\"$x\\""]\n'),
        base="scratch", files={"nonce.tar": _tar("nonce", nonce.encode() + b"\n", 0o644),
                               "sh.tar": _tar("bin/sh", shell, 0o755)})
    image_id = docker_client.images.get(tag).id
    folder = tmp_path_factory.mktemp("blobs")
    classic = images.save_image(docker_client, tag, folder / "classic.tar")
    archives = {
        "classic": classic,
        "oci": images.to_oci_archive(classic, folder / "oci.tar"),
        "pure_oci": images.to_pure_oci_archive(classic, folder / "pure.tar"),
        "gzip_oci": images.to_gzip_oci_archive(classic, folder / "gzip.tar"),
    }
    docker_client.images.remove(image_id, force=True)
    yield {"tag": tag, "image_id": image_id, "nonce": nonce, "archives": archives}
    _remove_image(docker_client, image_id)


def _tar(name: str, data: bytes, mode: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), mode
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _remove_image(client, image_id: str) -> None:
    try:
        client.images.remove(image_id, force=True)
    except docker.errors.ImageNotFound:
        pass


def _recipe(path):
    return Recipe.from_archive(path, inspect(path))


def _stored(store: BlobStore, path):
    recipe, where = _recipe(path)
    for digest, (offset, size) in where.items():
        assert store.ingest(digest, path, offset, size) == size
    return recipe


def _blob(size: int, seed: int = 0) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(size)
    return data, hashlib.sha256(data).hexdigest()


def _parts(store: BlobStore) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(store.partial_dir) for f in files]


# ---------------------------------------------------------------- recipes of real archives


@pytest.mark.parametrize("layout", LAYOUTS)
def test_recipe_names_the_members_bytes(saved, layout):
    path = saved["archives"][layout]
    recipe, where = _recipe(path)
    assert recipe.image_id == saved["image_id"]
    assert recipe.repo_tags == (saved["tag"],)
    assert len(recipe.layers) == 2 and set(where) == set(recipe.blobs) == set(recipe.sizes)
    with open(path, "rb") as f:
        contents = {}
        for digest, (offset, size) in where.items():
            f.seek(offset)
            contents[digest] = f.read(size)
            assert hashlib.sha256(contents[digest]).hexdigest() == digest
            assert recipe.sizes[digest] == size
    diff_ids = json.loads(contents[recipe.config])["rootfs"]["diff_ids"]
    if layout == "gzip_oci":
        assert [f"sha256:{hashlib.sha256(gzip.decompress(contents[d])).hexdigest()}"
                for d in recipe.layers] == diff_ids
    else:
        assert [f"sha256:{d}" for d in recipe.layers] == diff_ids


def test_one_image_has_one_recipe_in_every_uncompressed_layout(saved):
    recipes = [_recipe(saved["archives"][layout])[0] for layout in ("classic", "oci", "pure_oci")]
    assert recipes[0] == recipes[1] == recipes[2]
    assert len({r.key for r in recipes}) == 1
    gzipped = _recipe(saved["archives"]["gzip_oci"])[0]
    assert gzipped.config == recipes[0].config and gzipped.key != recipes[0].key


def test_recipe_round_trips_through_json(saved):
    recipe = _recipe(saved["archives"]["classic"])[0]
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe and again.key == recipe.key and hash(again) == hash(recipe)
    assert recipe.to_dict()["image_id"] == saved["image_id"]


# ---------------------------------------------------------------- the rebuilt archive


@pytest.mark.parametrize("layout", ["classic", "gzip_oci"])
def test_rebuilt_archive_loads_into_docker(docker_client, saved, layout, tmp_path):
    store = BlobStore(tmp_path / "store", budget_bytes=2**30)
    recipe = _stored(store, saved["archives"][layout])
    with open_archive(recipe, store) as reader:
        whole = reader.read()
        assert len(whole) == reader.size == archive_size(recipe)
        reader.seek(0)
        pieces, turn = [], 0
        while piece := reader.read(ODD_READS[turn % len(ODD_READS)]):
            pieces.append(piece)
            turn += 1
        assert b"".join(pieces) == whole
    rng = random.Random(7)
    for _ in range(40):
        offset, length = rng.randrange(len(whole) + 10), rng.choice(ODD_READS)
        assert read_archive(recipe, store, offset, length) == whole[offset:offset + length]
    with open_archive(recipe, store) as again:
        assert again.read() == whole  # deterministic

    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["manifest.json"] + [f"blobs/sha256/{d}" for d in recipe.blobs]
        assert all((m.mtime, m.mode, m.uid, m.gid) == (0, 0o644, 0, 0) for m in members)
        for m in members[1:]:
            assert hashlib.sha256(tar.extractfile(m).read()).hexdigest() == m.name[-64:]
    rebuilt = tmp_path / "rebuilt.tar"
    rebuilt.write_bytes(whole)
    info = inspect(rebuilt)
    assert (info.image_id, info.repo_tags) == (saved["image_id"], [saved["tag"]])

    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(saved["image_id"])  # every layer below is loaded, none reused
    try:
        loaded = docker_client.images.load(whole)
        assert [image.id for image in loaded] == [saved["image_id"]]
        assert docker_client.images.get(saved["tag"]).id == saved["image_id"]
        out = docker_client.containers.run(saved["image_id"], remove=True, network_disabled=True)
        assert out.decode().strip() == saved["nonce"]
    finally:
        _remove_image(docker_client, saved["image_id"])


def test_repeated_layer_saved_as_a_symlink_is_one_blob(docker_client, tmp_path):
    """Docker 20.10 saves a repeated layer as a symlink to the first copy."""
    nonce = uuid.uuid4().hex
    tag = f"pink/test-blobs-repeat:{nonce[:8]}"
    images.build_image(docker_client, tag, "COPY f /f\nCOPY f /f\n", files={"f": nonce.encode()})
    image_id = docker_client.images.get(tag).id
    path = images.save_image(docker_client, tag, tmp_path / "x.tar")
    with tarfile.open(path) as tar:
        assert any(m.issym() for m in tar)
    recipe, where = _recipe(path)
    assert recipe.layers[1] == recipe.layers[2] and len(recipe.blobs) == len(where) == 3
    store = BlobStore(tmp_path / "store", budget_bytes=2**30)
    recipe = _stored(store, path)
    whole = read_archive(recipe, store, 0, archive_size(recipe))
    (tmp_path / "rebuilt.tar").write_bytes(whole)
    assert inspect(tmp_path / "rebuilt.tar").image_id == image_id
    docker_client.images.remove(image_id, force=True)  # its own layers go; the busybox base stays
    try:
        assert [image.id for image in docker_client.images.load(whole)] == [image_id]
    finally:
        _remove_image(docker_client, image_id)


def test_a_layer_named_through_a_hard_link(saved, tmp_path):
    classic = saved["archives"]["classic"]
    entry = json.loads(images.read_member(classic, "manifest.json"))[0]
    first, entry["Layers"][0] = entry["Layers"][0], "hard.tar"
    path = images.copy_tar(classic, tmp_path / "x.tar", add=[images.hardlink("hard.tar", first)],
                           replace={"manifest.json": json.dumps([entry]).encode()})
    recipe, where = _recipe(path)
    assert recipe == _recipe(classic)[0]
    with open(path, "rb") as f:
        offset, size = where[recipe.layers[0]]
        f.seek(offset)
        assert hashlib.sha256(f.read(size)).hexdigest() == recipe.layers[0]


def test_headers_of_huge_layers_fit_one_block(tmp_path):
    """A layer over ustar's 8 GiB gets a base-256 size; the layout stays computable."""
    config, huge, small = "c" * 64, "a" * 64, "b" * 64
    sizes = {config: 100, huge: 9 * 2**30 + 5, small: 10}
    recipe = Recipe(config=config, layers=[huge, small], repo_tags=[], sizes=sizes)
    manifest = len(recipe.manifest_json())
    padded = [512 + n + (-n % 512) for n in (manifest, 100, sizes[huge], 10)]
    assert archive_size(recipe) == sum(padded) + 1024
    store = BlobStore(tmp_path, budget_bytes=0)
    at = padded[0] + padded[1]  # the huge layer's header: readable without any blob present
    header = tarfile.TarInfo.frombuf(read_archive(recipe, store, at, 512), "utf-8", "strict")
    assert (header.name, header.size) == (f"blobs/sha256/{huge}", sizes[huge])
    tail = read_archive(recipe, store, archive_size(recipe) - 1024, 5000)
    assert tail == bytes(1024)


def test_a_missing_blob_is_named(tmp_path, saved):
    recipe = _recipe(saved["archives"]["classic"])[0]
    store = BlobStore(tmp_path, budget_bytes=2**30)
    with pytest.raises(NotFound) as caught:
        read_archive(recipe, store, 0, archive_size(recipe))
    assert caught.value.code == "missing_blob" and recipe.config in caught.value.message


# ---------------------------------------------------------------- writing blobs


class CutStream:
    """A request body that breaks after `data`, as a dropped connection does."""

    def __init__(self, data: bytes):
        self.source = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        chunk = self.source.read(min(n, 4096))
        if not chunk:
            raise ConnectionResetError("client went away")
        return chunk


class Untouchable:
    def read(self, n: int) -> bytes:
        raise AssertionError("the stream was read")


def _elsewhere(resumed_elsewhere: bool) -> None:
    """A resume that reaches another process finds no running hash to continue."""
    if resumed_elsewhere:
        blob_store._hash_states.clear()


@pytest.mark.parametrize("resumed_elsewhere", [False, True])
def test_write_resumes_from_where_it_was_cut(tmp_path, resumed_elsewhere):
    store = BlobStore(tmp_path, budget_bytes=2**30)
    data, digest = _blob(3 * 2**20 + 123)
    cut = 2**20 + 17
    with pytest.raises(ConnectionResetError):
        store.write("alice", digest, CutStream(data[:cut]), len(data))
    assert store.offset("alice", digest) == cut and not store.has(digest)
    assert store.offset("bob", digest) == 0
    assert store._part("alice", digest) in blob_store._hash_states  # its running hash, kept
    more = 5000
    _elsewhere(resumed_elsewhere)
    assert store.write("alice", digest, io.BytesIO(data[cut:]), len(data), offset=cut, limit=more) \
        == cut + more
    _elsewhere(resumed_elsewhere)
    assert store.write("alice", digest, io.BytesIO(data[cut + more:] + b"trailing"), len(data),
                       offset=cut + more) == len(data)
    with open(store.path(digest), "rb") as f:
        assert f.read() == data
    assert store.size(digest) == len(data) and store.offset("alice", digest) == 0
    assert _parts(store) == []
    assert store.write("bob", digest, Untouchable(), len(data)) == len(data)  # here already


@pytest.mark.parametrize("offset", [0, 100, 10_000])
def test_write_from_a_wrong_offset_names_the_right_one(tmp_path, offset):
    store = BlobStore(tmp_path, budget_bytes=2**30)
    data, digest = _blob(20_000)
    assert store.write("alice", digest, io.BytesIO(data[:4321]), len(data), limit=4321) == 4321
    with pytest.raises(WrongOffset) as caught:
        store.write("alice", digest, io.BytesIO(data[offset:]), len(data), offset=offset)
    assert caught.value.offset == 4321 and "offset 4321" in caught.value.message
    assert (caught.value.status, caught.value.code) == (409, "wrong_offset")
    assert isinstance(caught.value, Conflict)
    assert store.offset("alice", digest) == 4321
    with pytest.raises(WrongOffset) as caught:
        store.write("bob", digest, io.BytesIO(data[100:]), len(data), offset=100)
    assert caught.value.offset == 0 and _parts(store) == [store._part("alice", digest)]


@pytest.mark.parametrize("cut, resumed_elsewhere", [(None, False), (7000, False), (7000, True)])
def test_wrong_digest_leaves_nothing(tmp_path, cut, resumed_elsewhere):
    store = BlobStore(tmp_path, budget_bytes=2**30)
    data, actual = _blob(20_000)
    claimed = hashlib.sha256(b"something else").hexdigest()
    if cut:
        store.write("alice", claimed, io.BytesIO(data), len(data), limit=cut)
        _elsewhere(resumed_elsewhere)
    with pytest.raises(BadRequest) as caught:
        store.write("alice", claimed, io.BytesIO(data[cut or 0:]), len(data), offset=cut or 0)
    assert caught.value.code == "digest_mismatch"
    assert caught.value.message == (f"blob sha256:{claimed} arrived as sha256:{actual}; "
                                    f"upload it again")
    assert not store.has(claimed) and not store.has(actual) and _parts(store) == []
    assert store.offset("alice", claimed) == 0


def test_ingest_copies_and_checks_a_range(tmp_path):
    store = BlobStore(tmp_path / "store", budget_bytes=2**30)
    data, digest = _blob(100_000)
    source = tmp_path / "upload.tar"
    source.write_bytes(b"x" * 1000 + data + b"y" * 1000)
    with pytest.raises(BadRequest) as caught:
        store.ingest(digest, source, 999, len(data))
    assert caught.value.code == "digest_mismatch"
    with pytest.raises(BadRequest) as caught:
        store.ingest(digest, source, 1001 + 1000, len(data))  # runs past the file's end by one byte
    assert caught.value.code == "not_tar"
    assert _parts(store) == [] and not store.has(digest)
    assert store.ingest(digest, source, 1000, len(data)) == len(data)
    with open(store.path(digest), "rb") as f:
        assert f.read() == data


@pytest.mark.parametrize("owner, digest", [
    ("../etc", "a" * 64), ("", "a" * 64), (".ingest", "a" * 64), ("alice", "A" * 64),
    ("alice", "../" + "a" * 61), ("alice", "a" * 63),
])
def test_store_refuses_odd_names(tmp_path, owner, digest):
    store = BlobStore(tmp_path, budget_bytes=2**30)
    with pytest.raises(BadRequest):
        store.write(owner, digest, io.BytesIO(b"x"), 1)
    assert _parts(store) == []


# ---------------------------------------------------------------- concurrent writers


class GatedStream:
    """Gives `data` in small steps, waiting at `gate` (an Event) once `pause_at` bytes are out."""

    def __init__(self, data: bytes, gate: threading.Event | None = None, pause_at: int = 0,
                 reached: threading.Event | None = None):
        self.source, self.gate, self.pause_at = io.BytesIO(data), gate, pause_at
        self.reached = reached or threading.Event()

    def read(self, n: int) -> bytes:
        if self.gate is not None and self.source.tell() >= self.pause_at:
            self.reached.set()
            assert self.gate.wait(30)
        return self.source.read(min(n, 1000))


def test_two_writers_of_one_blob_end_with_one_correct_blob(tmp_path):
    store = BlobStore(tmp_path, budget_bytes=2**30)
    data, digest = _blob(300_000)
    barrier = threading.Barrier(2)

    class Interleaved(GatedStream):
        def read(self, n):
            barrier.wait(30)  # each step of one writer alternates with the other's
            return super().read(n)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda owner: store.write(owner, digest, Interleaved(data), len(data)),
                                ["alice", "bob"]))
    assert results == [len(data), len(data)]
    with open(store.path(digest), "rb") as f:
        assert f.read() == data
    assert _parts(store) == []


def test_a_reader_keeps_its_blob_while_another_writer_renames_over_it(tmp_path):
    store = BlobStore(tmp_path, budget_bytes=2**30)
    data, digest = _blob(200_000)
    gate, reached = threading.Event(), threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        late = pool.submit(store.write, "bob", digest, GatedStream(data, gate, len(data) - 1000, reached),
                           len(data))
        assert reached.wait(30)  # bob checked that the blob is absent and is nearly done
        assert store.write("alice", digest, io.BytesIO(data), len(data)) == len(data)
        with open(store.path(digest), "rb") as reader:
            first = reader.read(1000)
            gate.set()
            assert late.result(30) == len(data)
            assert os.stat(store.path(digest)).st_ino != os.fstat(reader.fileno()).st_ino  # replaced
            assert first + reader.read() == data
    with open(store.path(digest), "rb") as f:
        assert f.read() == data
    assert _parts(store) == []


def test_one_owner_writes_one_part_at_a_time(tmp_path):
    store = BlobStore(tmp_path, budget_bytes=2**30)
    data, digest = _blob(50_000)
    gate, reached = threading.Event(), threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(store.write, "alice", digest, GatedStream(data, gate, 10_000, reached), len(data))
        assert reached.wait(30)
        with pytest.raises(Conflict) as caught:
            store.write("alice", digest, io.BytesIO(data[10_000:]), len(data), offset=10_000)
        assert caught.value.code == "upload_busy"
        gate.set()
        assert first.result(30) == len(data)
    assert store.has(digest) and _parts(store) == []


def test_two_processes_ingest_one_blob(tmp_path):
    store = BlobStore(tmp_path / "store", budget_bytes=2**30)
    data, digest = _blob(16 * 2**20)
    source = tmp_path / "upload.tar"
    source.write_bytes(data)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        futures = [pool.submit(store.ingest, digest, str(source), 0, len(data)) for _ in range(4)]
        assert [f.result(60) for f in futures] == [len(data)] * 4
    with open(store.path(digest), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest
    assert _parts(store) == []


# ---------------------------------------------------------------- collect


def _filled(tmp_path, budget: int, count: int = 5, size: int = 1000):
    store = BlobStore(tmp_path, budget_bytes=budget)
    digests = []
    for i in range(count):
        data, digest = _blob(size, seed=i)
        store.write("alice", digest, io.BytesIO(data), size)
        digests.append(digest)
    return store, digests


def _used_in_order(store, digests, order):
    for when, i in enumerate(order):
        store.touch(digests[i], now=1_000_000 + when)


def test_collect_removes_least_recently_used_until_within_budget(tmp_path):
    store, d = _filled(tmp_path, budget=2500)
    _used_in_order(store, d, [3, 1, 4, 0, 2])
    assert store.total_bytes() == 5000
    assert store.collect(set()) == [d[3], d[1], d[4]]
    assert store.total_bytes() == 2000 and [store.has(x) for x in d] == [True, False, True, False, False]
    assert store.collect(set()) == []


def test_collect_never_removes_kept_blobs(tmp_path, caplog):
    store, d = _filled(tmp_path, budget=2500)
    _used_in_order(store, d, [3, 1, 4, 0, 2])
    assert store.collect({d[3], d[1]}) == [d[4], d[0], d[2]]
    assert store.has(d[3]) and store.has(d[1])

    store, d = _filled(tmp_path / "over", budget=1500)
    _used_in_order(store, d, [0, 1, 2, 3, 4])
    with caplog.at_level(logging.WARNING, logger="pink.blob_store"):
        assert store.collect({d[0], d[1], d[2]}) == [d[3], d[4]]
    assert all(store.has(x) for x in d[:3]) and store.total_bytes() == 3000
    assert "over its budget" in caplog.text


def test_collect_removes_stale_part_files(tmp_path):
    store = BlobStore(tmp_path, budget_bytes=2**30)
    data, digest = _blob(10_000)
    for owner in ("alice", "0123456789ab", "carol"):
        store.write(owner, digest, io.BytesIO(data), len(data), limit=500)
    old = time.time() - PART_GRACE - 60
    os.utime(store._part("alice", digest), (old, old))
    os.utime(store._part("carol", digest), (old, old))
    with open(store._part("carol", digest), "rb") as held:  # a writer still holds carol's part
        fcntl.flock(held, fcntl.LOCK_EX)
        store.collect(set())
    assert sorted(_parts(store)) == sorted([store._part("0123456789ab", digest),
                                            store._part("carol", digest)])
    assert store.offset("alice", digest) == 0
    later = time.time() + 2 * PART_GRACE
    store.collect(set(), now=later)
    assert _parts(store) == [] and os.listdir(store.partial_dir) == []


# ---------------------------------------------------------------- hostile recipes


def _valid() -> dict:
    return {"config": "c" * 64, "layers": ["a" * 64, "b" * 64, "a" * 64], "repo_tags": ["lab/x:1"],
            "sizes": {"c" * 64: 1000, "a" * 64: 5000, "b" * 64: 0}}


def _with(**changes) -> dict:
    recipe = _valid()
    recipe.update(changes)
    return recipe


def _sizes(**changes) -> dict:
    sizes = _valid()["sizes"]
    sizes.update({k * 64 if len(k) == 1 else k: v for k, v in changes.items()})
    return _with(sizes=sizes)


MANY = [f"{i:064x}" for i in range(MAX_LAYERS + 1)]


@pytest.mark.parametrize("data, words", [
    ([], "not an object"),
    (_with(config="abc"), "64 lowercase hex"),
    (_with(config="C" * 64), "64 lowercase hex"),
    (_with(config="sha256:" + "c" * 64), "64 lowercase hex"),
    (_with(config=None), "64 lowercase hex"),
    (_with(layers="a" * 64), "not a list"),
    (_with(layers=["a" * 64, "../" + "b" * 61]), "64 lowercase hex"),
    (_with(layers=["a" * 64, 7]), "64 lowercase hex"),
    (_with(layers=MANY, sizes={**{d: 1 for d in MANY}, "c" * 64: 1}), "at most 128"),
    (_sizes(a=-1), "expected 0 to"),
    (_sizes(a=True), "expected 0 to"),
    (_sizes(a=1.5), "expected 0 to"),
    (_sizes(a="5"), "expected 0 to"),
    (_sizes(a=MAX_BLOB_BYTES + 1), "expected 0 to"),
    (_sizes(a=MAX_BLOB_BYTES, b=MAX_BLOB_BYTES), "add up to"),
    (_sizes(c=0), "the config is 0 bytes"),
    (_sizes(c=10**9), "the config is"),
    (_sizes(d=1), "not a blob of the image"),
    (_with(sizes={"c" * 64: 1000, "a" * 64: 5000}), "lacks " + "b" * 64),
    (_with(sizes=[1, 2]), "sizes"),
    (_with(repo_tags="lab/x:1"), "not a list"),
    (_with(repo_tags=[1]), "not an image name"),
    (_with(repo_tags=["has space:1"]), "not an image name"),
    (_with(repo_tags=["x" * 600]), "not an image name"),
    (_with(repo_tags=[f"lab/x:{i}" for i in range(101)]), "at most 100"),
    (_with(repo_tags=["pink/cache:abc"]), "PINK's own cache"),
    (_with(image_id="sha256:" + "d" * 64), "image_id"),
    (_with(key="0" * 64), "key"),
    (_with(extra=1), "unknown fields"),
])
def test_hostile_recipes_are_refused(data, words):
    with pytest.raises(BadRequest) as caught:
        Recipe.from_dict(data)
    assert (caught.value.code, caught.value.status) == ("bad_manifest", 400)
    assert words in caught.value.message


def test_a_valid_recipe_describes_its_archive():
    recipe = Recipe.from_dict(_valid())
    assert recipe.blobs == ["c" * 64, "a" * 64, "b" * 64] and recipe.total_bytes == 6000
    assert recipe.image_id == "sha256:" + "c" * 64
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict(_with(repo_tags=["lab/x:2"])).key != recipe.key
    manifest = json.loads(recipe.manifest_json())
    assert manifest == [{"Config": "blobs/sha256/" + "c" * 64, "RepoTags": ["lab/x:1"],
                         "Layers": ["blobs/sha256/" + d for d in ("a" * 64, "b" * 64, "a" * 64)]}]
