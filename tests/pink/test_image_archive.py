"""Tests for pink.image_archive: real `docker save` archives, both layouts, hostile tars.

The Docker daemon on this machine builds the images; archives in the OCI
layout Docker 25+ writes are made from them by tests/images.py and loaded
back into Docker to prove the conversion is faithful.
"""

import json
import tarfile

import pytest

from pink.errors import ArchiveError
from pink.image_archive import ImageInfo, inspect
from tests import images

TAG = "pink/archive-test:1"
DOCKERFILE = 'RUN echo hi > /hello.txt\nCMD ["sh", "-c", "echo hello > /out.txt"]\n'


@pytest.fixture(scope="session")
def classic(docker_client, tmp_path_factory):
    """A real `docker save` of a two-layer image, and the ID Docker gives it."""
    image_id = docker_client.images.get(images.build_image(docker_client, TAG, DOCKERFILE)).id
    path = tmp_path_factory.mktemp("saved") / "classic.tar"
    images.save_image(docker_client, TAG, path)
    return path, image_id


@pytest.fixture(scope="session")
def oci(classic, tmp_path_factory):
    return images.to_oci_archive(classic[0], tmp_path_factory.mktemp("oci") / "oci.tar")


def expect(code, path, *words):
    with pytest.raises(ArchiveError) as caught:
        inspect(path)
    assert caught.value.code == code, caught.value.message
    assert caught.value.status == 400
    for word in words:
        assert word in caught.value.message
    return caught.value


# ---------------------------------------------------------------- good archives


def test_classic_archive_matches_docker(docker_client, classic):
    path, image_id = classic
    info = inspect(path)
    assert info.layout == "docker"
    assert info.image_id == image_id == docker_client.images.get(TAG).id
    assert info.repo_tags == [TAG]
    assert len(info.layers) == 2 and all(x.endswith("/layer.tar") for x in info.layers)
    assert info.config == image_id[len("sha256:"):] + ".json"
    assert json.loads(json.dumps(info.to_dict()))["image_id"] == image_id


def test_untagged_save_has_no_repo_tags(docker_client, classic, tmp_path):
    path = images.save_image(docker_client, classic[1], tmp_path / "by-id.tar")
    info = inspect(path)
    assert info.repo_tags == [] and info.image_id == classic[1]


def test_docker25_layout(classic, oci):
    info = inspect(oci)
    assert info.layout == "oci"
    assert info.image_id == classic[1]
    assert info.repo_tags == [TAG]
    assert info.config == "blobs/sha256/" + classic[1][len("sha256:"):]
    assert all(x.startswith("blobs/sha256/") for x in info.layers)
    assert len(info.layers) == 2


def test_docker_20_10_loads_docker25_layout(docker_client, classic, oci):
    """The converted archive is what Docker 25+ writes, and older Docker still loads it."""
    docker_client.images.remove(TAG, force=True)
    with open(oci, "rb") as f:
        loaded = docker_client.images.load(f)
    assert [image.id for image in loaded] == [classic[1]]
    assert docker_client.images.get(TAG).id == classic[1]


def test_pure_oci_layout_follows_index(classic, tmp_path):
    path = images.to_pure_oci_archive(classic[0], tmp_path / "pure.tar")
    info = inspect(path)
    assert (info.layout, info.image_id, info.repo_tags) == ("oci", classic[1], [TAG])
    assert len(info.layers) == 2


def test_pure_oci_nested_index(classic, tmp_path):
    """An index whose one entry is itself an index (as containerd saves) is followed."""
    pure = images.to_pure_oci_archive(classic[0], tmp_path / "pure.tar")
    outer = json.loads(images.read_member(pure, "index.json"))
    inner = json.dumps({"schemaVersion": 2, "mediaType": images.MEDIA_INDEX,
                        "manifests": [outer["manifests"][0]]}).encode()
    inner_d = images._descriptor(images.MEDIA_INDEX, inner)
    outer["manifests"] = [inner_d]
    path = images.copy_tar(pure, tmp_path / "nested.tar",
                           replace={"index.json": json.dumps(outer).encode()},
                           add=[(f"blobs/sha256/{inner_d['digest'][7:]}", inner)])
    info = inspect(path)
    assert info.image_id == classic[1] and info.repo_tags == []


def test_tar_with_dot_prefixed_names(classic, tmp_path):
    """`tar -C dir -cf x.tar .` writes `./manifest.json`; docker load accepts it."""
    dst = tmp_path / "dotted.tar"
    with tarfile.open(classic[0]) as src, tarfile.open(dst, "w") as out:
        for info in src:
            data = src.extractfile(info) if info.isreg() else None
            info.name = "./" + info.name
            out.addfile(info, data)
    assert inspect(dst).image_id == classic[1]


# ---------------------------------------------------------------- not an image


def test_not_a_tar(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"this is plainly not a tar archive\n" * 100)
    expect("not_tar", path, "not a tar")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tar"
    path.write_bytes(b"")
    expect("not_tar", path, "empty")


def test_gzipped_archive_is_refused_with_a_reason(classic, tmp_path):
    import gzip
    path = tmp_path / "x.tar.gz"
    path.write_bytes(gzip.compress(b"x" * 1000))
    expect("not_tar", path, "gzip", "docker save")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_tar(classic, tmp_path, keep):
    data = classic[0].read_bytes()
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:int(len(data) * keep)])
    expect("not_tar", path, "truncated")


def test_truncated_at_member_boundary(tmp_path):
    """Cut exactly after a member: tarfile sees a clean end, the missing marker tells."""
    full = images.write_tar(tmp_path / "full.tar", [("a", b"x" * 512), ("manifest.json", b"[]")])
    path = tmp_path / "cut.tar"
    path.write_bytes(open(full, "rb").read()[:1024])
    expect("not_tar", path, "truncated")


def test_tar_without_manifest(tmp_path):
    path = images.write_tar(tmp_path / "x.tar", [("hello.txt", b"hi")])
    expect("no_manifest", path, "docker save IMAGE -o FILE.tar")


def test_empty_tar(tmp_path):
    path = images.write_tar(tmp_path / "x.tar", [])
    expect("no_manifest", path)


# ---------------------------------------------------------------- bad manifests


def test_manifest_naming_missing_layer(classic, tmp_path):
    layer = inspect(classic[0]).layers[1]
    path = images.copy_tar(classic[0], tmp_path / "x.tar", drop={layer})
    expect("missing_layer", path, layer)


def test_manifest_naming_missing_config(oci, tmp_path):
    config = inspect(oci).config
    path = images.copy_tar(oci, tmp_path / "x.tar", drop={config})
    expect("missing_layer", path, config)


def test_pure_oci_missing_layer_blob(classic, tmp_path):
    pure = images.to_pure_oci_archive(classic[0], tmp_path / "pure.tar")
    layer = inspect(pure).layers[0]
    path = images.copy_tar(pure, tmp_path / "x.tar", drop={layer})
    expect("missing_layer", path, layer)


def test_multiple_images_refused(classic, tmp_path):
    entry = json.loads(images.read_member(classic[0], "manifest.json"))[0]
    two = json.dumps([entry, dict(entry, RepoTags=["other:1"])]).encode()
    path = images.copy_tar(classic[0], tmp_path / "x.tar", replace={"manifest.json": two})
    expect("bad_manifest", path, "exactly one image")


def test_pure_oci_index_with_two_images_refused(classic, tmp_path):
    pure = images.to_pure_oci_archive(classic[0], tmp_path / "pure.tar")
    index = json.loads(images.read_member(pure, "index.json"))
    other = dict(index["manifests"][0], digest="sha256:" + "ab" * 32)
    index["manifests"].append(other)
    path = images.copy_tar(pure, tmp_path / "x.tar",
                           replace={"index.json": json.dumps(index).encode()})
    expect("bad_manifest", path, "exactly one image")


@pytest.mark.parametrize("manifest", [
    b"{not json", b'{"Config": "x"}', b"[]", b"[1]", b'[{"Layers": []}]',
    b'[{"Config": "x.json", "Layers": "a/layer.tar"}]',
    b'[{"Config": "x.json", "Layers": [], "RepoTags": "a:b"}]',
    b'[{"Config": "../x.json", "Layers": []}]',
    b"[" * 100_000,
])
def test_malformed_manifest(tmp_path, manifest):
    path = images.write_tar(tmp_path / "x.tar", [("x.json", b"{}"), ("manifest.json", manifest)])
    expect("bad_manifest", path)


def test_malformed_digest_in_index(tmp_path):
    index = {"schemaVersion": 2, "manifests": [{"mediaType": images.MEDIA_MANIFEST,
                                                "digest": "sha256:XYZ", "size": 1}]}
    path = images.write_tar(tmp_path / "x.tar", [
        ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        ("index.json", json.dumps(index).encode())])
    expect("bad_manifest", path, "sha256:XYZ")


def test_blob_not_named_by_digest(oci, tmp_path):
    path = images.copy_tar(oci, tmp_path / "x.tar", add=[("blobs/sha256/nothex", b"x")])
    expect("bad_manifest", path, "nothex")


def test_config_contents_must_match_its_name(classic, tmp_path):
    config = inspect(classic[0]).config
    path = images.copy_tar(classic[0], tmp_path / "x.tar", replace={config: b"{}"})
    expect("bad_manifest", path, "does not match")


def test_oversized_manifest(tmp_path, monkeypatch):
    import pink.image_archive as ia
    monkeypatch.setattr(ia, "MAX_JSON_BYTES", 100)
    path = images.write_tar(tmp_path / "x.tar", [("manifest.json", b" " * 200 + b"[]")])
    expect("bad_manifest", path, "at most 100")


# ---------------------------------------------------------------- unsafe members


def _with_manifest(*members):
    return [*members, ("manifest.json", b"[]")]


@pytest.mark.parametrize("member", [
    ("../x", b"evil"),
    ("a/../../x", b"evil"),
    ("/etc/x", b"evil"),
    images.symlink("link", "../../etc/passwd"),
    images.symlink("a/link", "../../x"),
    images.symlink("link", "/etc/passwd"),
    images.hardlink("link", "../../etc/passwd"),
    images.hardlink("link", "/etc/passwd"),
    images.fifo("pipe"),
    images.char_device("null"),
], ids=lambda m: m[0] if isinstance(m, tuple) else f"{m.type!r}:{m.name}->{m.linkname}")
def test_unsafe_member(tmp_path, member):
    path = images.write_tar(tmp_path / "x.tar", _with_manifest(member))
    expect("unsafe_member", path)


def test_symlink_chain_escaping(tmp_path):
    """`b -> a/..` looks harmless by itself, but `a -> .` makes it the parent of the root."""
    path = images.write_tar(tmp_path / "x.tar", _with_manifest(
        images.symlink("a", "."), images.symlink("b", "a/..")))
    expect("unsafe_member", path, "'b'")


def test_symlink_loop(tmp_path):
    path = images.write_tar(tmp_path / "x.tar", _with_manifest(
        images.symlink("a", "b"), images.symlink("b", "a")))
    expect("unsafe_member", path)


def test_member_written_through_symlink(tmp_path):
    path = images.write_tar(tmp_path / "x.tar", _with_manifest(
        images.directory("d"), images.symlink("s", "d"), ("s/f", b"x")))
    expect("unsafe_member", path, "through a symlink")


def test_duplicate_member(tmp_path):
    path = images.write_tar(tmp_path / "x.tar", _with_manifest(("a", b"1"), ("a", b"2")))
    expect("unsafe_member", path, "twice")


def test_too_many_members(tmp_path):
    path = images.write_tar(tmp_path / "x.tar", [(f"f{i}", b"") for i in range(20)])
    with pytest.raises(ArchiveError) as caught:
        inspect(path, max_members=10)
    assert caught.value.code == "unsafe_member" and "10" in caught.value.message


def test_huge_pax_header_is_not_read(tmp_path):
    """A pax header declaring gigabytes is refused before tarfile reads it into memory."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 2**32
    path = tmp_path / "x.tar"
    path.write_bytes(header.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * 4096)
    expect("unsafe_member", path, "extended tar header")


def test_repeated_layers_saved_as_symlinks(docker_client, tmp_path):
    """Docker 20.10 saves a repeated layer as `<id>/layer.tar -> ../<first>/layer.tar`."""
    tag = "pink/archive-test:repeated"
    images.build_image(docker_client, tag, "COPY f /f\nCOPY f /f\n", files={"f": b"same"})
    image_id = docker_client.images.get(tag).id
    path = images.save_image(docker_client, tag, tmp_path / "x.tar")
    with tarfile.open(path) as tar:
        assert any(m.issym() for m in tar)
    info = inspect(path)
    assert info.image_id == image_id and len(info.layers) == 3
    oci = inspect(images.to_oci_archive(path, tmp_path / "oci.tar"))
    assert oci.image_id == image_id and oci.layers[1] == oci.layers[2]


def test_layer_named_through_a_hard_link(classic, tmp_path):
    entry = json.loads(images.read_member(classic[0], "manifest.json"))[0]
    first, entry["Layers"][0] = entry["Layers"][0], "hard.tar"
    path = images.copy_tar(classic[0], tmp_path / "x.tar", add=[images.hardlink("hard.tar", first)],
                           replace={"manifest.json": json.dumps([entry]).encode()})
    assert inspect(path).layers[0] == "hard.tar"


def test_image_info_is_frozen():
    info = ImageInfo("docker", "sha256:" + "0" * 64, [], [], "c.json")
    with pytest.raises(AttributeError):
        info.layout = "oci"
    assert info.to_dict()["layers"] == []
