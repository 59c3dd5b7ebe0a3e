"""Test images: build small real images offline and write archives from them.

No registry is reachable, so every image starts from a busybox rootfs
imported into the local Docker daemon. Tests and the benchmark call these
helpers; the tar writers make the Docker 25+ OCI layout and hostile archives.
Every image made here is remembered, and `remove_built` (the test session's
end, the benchmark's teardown) removes it with the tags runners put on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import uuid
import posixpath
import shutil
import subprocess
import tarfile
import tempfile

import docker.errors

BUSYBOX = "/bin/busybox"  # from Debian's busybox-static: no shared libraries needed
BUSYBOX_REPOSITORY = "pink/busybox"  # tagged with a digest of its content: busybox_tag()
IMPORT_CHANGES = ('CMD ["sh"]', "ENV PATH=/bin")
LOCK_PATH = os.path.join(tempfile.gettempdir(), "pink-test-images.lock")
COPY_CHUNK = 1 << 20  # bytes per read when streaming layers and saves

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"

# The task most tests run: writes a file into its filesystem and a line to its log.
WRITER = 'CMD ["sh", "-c", "echo hello from pink > /result.txt; echo done"]\n'

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


# ---------------------------------------------------------------- images in Docker


def busybox_rootfs(root) -> str:
    """A minimal rootfs in `root`: static busybox, its applets as symlinks, /tmp, /etc."""
    root = os.fspath(root)
    for d in ("bin", "etc", "tmp", "root", "proc", "sys", "dev"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
    for applet in _applets():
        link = os.path.join(root, "bin", applet)
        if applet != "busybox" and not os.path.lexists(link):
            os.symlink("busybox", link)
    _write(os.path.join(root, "etc", "passwd"), PASSWD)
    _write(os.path.join(root, "etc", "group"), GROUP)
    return root


def _applets() -> list[str]:
    out = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True)
    return [a for a in out.stdout.split() if "/" not in a]


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def _images_lock():
    """Tests in parallel processes must not import or tag the same image twice."""
    with open(LOCK_PATH, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=1)
def busybox_tag() -> str:
    """The busybox image's name, derived from everything that goes into it
    (busybox's bytes, its applets, /etc's files, the import's changes): an
    image of that name found in the engine is this very image, whoever left
    it there, and an older or foreign `pink/busybox` never stands in for it."""
    with open(BUSYBOX, "rb") as fh:
        digest = hashlib.sha256(fh.read())
    for part in (*_applets(), PASSWD, GROUP, *IMPORT_CHANGES):
        digest.update(b"\0" + part.encode())
    return f"{BUSYBOX_REPOSITORY}:{digest.hexdigest()[:16]}"


def ensure_busybox_image(client, tag: str | None = None) -> str:
    """Import the busybox rootfs as `tag` (busybox_tag() by default) unless
    Docker already has it; returns the tag."""
    tag = tag or busybox_tag()
    with _images_lock():
        if _has_image(client, tag):
            return tag
        repository, _, version = tag.rpartition(":")
        with tempfile.TemporaryDirectory(prefix="pink-rootfs-") as tmp, tracked(client, tag):
            rootfs = busybox_rootfs(os.path.join(tmp, "rootfs"))
            archive = os.path.join(tmp, "rootfs.tar")
            with tarfile.open(archive, "w") as tar:
                tar.add(rootfs, arcname=".")
            client.api.import_image_from_file(
                archive, repository=repository, tag=version,
                changes=list(IMPORT_CHANGES))
        client.images.get(tag)  # fail here, not later, if the import did not tag it
        return tag


def _has_image(client, ref: str) -> bool:
    try:
        client.images.get(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def build_image(client, tag: str, dockerfile_text: str, base: str | None = None,
                files: dict[str, bytes] | None = None) -> str:
    """`docker build` a Dockerfile string as `tag`; returns `tag`, as ensure_busybox_image does.

    A Dockerfile without FROM gets `FROM base` (the busybox image by
    default, imported first if it is missing). `files` go into the build
    context for COPY.
    """
    if base is None:
        base = ensure_busybox_image(client)
    if not any(line.strip().upper().startswith("FROM ") for line in dockerfile_text.splitlines()):
        dockerfile_text = f"FROM {base}\n{dockerfile_text}"
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        _add_bytes(tar, "Dockerfile", dockerfile_text.encode())
        for name, data in (files or {}).items():
            _add_bytes(tar, name, data)
    context.seek(0)
    try:
        with tracked(client, tag):
            client.images.build(fileobj=context, custom_context=True, tag=tag,
                                rm=True, forcerm=True, pull=False)
    except docker.errors.BuildError as e:
        log = "".join(str(chunk.get("stream", chunk)) for chunk in e.build_log)
        raise RuntimeError(f"docker build of {tag} failed: {e}\n{log}") from None
    return tag


def save_image(client, tag: str, path) -> str:
    """Stream `docker save tag` to `path` (classic layout on Docker 20.10)."""
    path = os.fspath(path)
    partial = path + ".part"
    with open(partial, "wb") as out:
        for chunk in client.api.get_image(tag, chunk_size=COPY_CHUNK):
            out.write(chunk)
    os.replace(partial, path)
    return path


def build_archive(client, tag: str, dockerfile_text: str, path) -> str:
    """Build `tag` from `dockerfile_text` (FROM the busybox image unless it
    names another) and save it to `path`: the upload file most tests need."""
    build_image(client, tag, dockerfile_text)
    return save_image(client, tag, path)


def fresh_archive(client, name: str, path, dockerfile_text: str = "") -> str:
    """Like build_archive, with a label no other image has: its digest is new,
    and the image is removed from Docker once saved, so no runner holds it yet
    (runners here share this machine's Docker, and skip loading an image it has)."""
    tag = f"pink/test-{name}:{uuid.uuid4().hex[:8]}"
    archive = build_archive(client, tag, dockerfile_text + f"LABEL pink.test.nonce={tag}\n", path)
    client.images.remove(tag)
    return archive


def retarget_archive(src, dest, architecture: str) -> str:
    """A copy of the `docker save` archive `src` whose config says another
    architecture (renamed by its new digest, as Docker names configs): an
    image "built for" a platform this machine cannot build for."""
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    files = {m.name: data for m, data in members}
    manifest = json.loads(files["manifest.json"])
    old = manifest[0]["Config"]
    config = json.loads(files[old])
    config["architecture"] = architecture
    data = json.dumps(config).encode()
    manifest[0]["Config"] = new = hashlib.sha256(data).hexdigest() + ".json"
    replaced = {old: (new, data), "manifest.json": ("manifest.json", json.dumps(manifest).encode())}
    with tarfile.open(dest, "w") as out:
        for member, body in members:
            if member.name in replaced:
                member.name, body = replaced[member.name]
                member.size = len(body)
            out.addfile(member, io.BytesIO(body) if body is not None else None)
    return str(dest)


# ---------------------------------------------------------------- what was made here, and its removal

# What Docker held before this process first made an image: {tag: image id}
# and every image id. None until the first image is made. Never removed,
# whoever made them; a tag a build moved is moved back.
_before: tuple[dict[str, str], set[str]] | None = None
_built: dict[str, None] = {}  # ids of the images built here (new or found again), oldest first
_moved: dict[str, str] = {}  # tags a build here took from the image they named before: that image's id


@contextlib.contextmanager
def tracked(client, tag: str):
    """Around code that makes image `tag` (build, import): remember the image
    it ends up naming, for `remove_built`."""
    global _before
    if _before is None:
        listed = client.images.list(all=True)
        _before = ({t: image.id for image in listed for t in image.tags}, {image.id for image in listed})
    try:
        yield
    finally:
        try:
            image_id = client.images.get(tag).id
        except docker.errors.ImageNotFound:
            image_id = None  # the build failed before tagging anything
        if image_id:
            _built[image_id] = None
            if _before[0].get(tag, image_id) != image_id:
                _moved.setdefault(tag, _before[0][tag])


def built() -> list[str]:
    """Ids of the images built by this process so far, oldest first."""
    return list(_built)


def remove_built(client) -> tuple[list[str], list[str]]:
    """Put Docker back as this process found it, newest image first: tags a
    build moved go back to their old images; every tag added to a built image
    (the runners' `pink/cache:<sha>` tags, names restored by `docker load`)
    goes; then an image that did not exist before goes too, with the
    intermediate images of its build. An image a container still uses stays.
    Returns (removed, kept): ids of images made here.
    """
    if _before is None:
        return [], []
    tags_before, ids_before = _before
    for tag, old_id in list(_moved.items()):
        try:
            repository, _, version = tag.rpartition(":")
            client.images.get(old_id).tag(repository, version)
            _moved.pop(tag)
        except docker.errors.DockerException:
            pass  # the old image is gone: the tag stays where the build put it
    removed, kept = [], []
    for image_id in reversed(list(_built)):
        try:
            image = client.images.get(image_id)
        except docker.errors.ImageNotFound:
            _built.pop(image_id)
            continue
        existed = image_id in ids_before
        try:
            added = [t for t in image.tags if tags_before.get(t) != image_id]
            for tag in added:
                if existed and len(client.images.get(image_id).tags) == 1:
                    break  # its last tag: removing it would delete an image that was here before
                client.images.remove(tag)  # the last tag going deletes the image
            if not existed and _has_image(client, image_id) and not client.images.get(image_id).tags:
                client.images.remove(image_id)  # dangling: its tag moved to a newer build
        except docker.errors.APIError:
            pass  # in use by a container: Docker refuses, and so do we
        if not existed and _has_image(client, image_id):
            kept.append(image_id)
            continue
        if not existed:
            removed.append(image_id)
        _built.pop(image_id)
    return removed, kept


# ---------------------------------------------------------------- OCI layout


def to_oci_archive(classic_path, out_path) -> str:
    """Rewrite a classic `docker save` archive the way Docker 25+ writes it.

    `oci-layout`, `index.json` and `blobs/sha256/` (config, uncompressed
    layers, OCI manifest), plus a `manifest.json` pointing at the blobs.
    """
    return _write_oci(classic_path, out_path, with_manifest_json=True)


def to_pure_oci_archive(classic_path, out_path) -> str:
    """The same OCI layout without `manifest.json`: only index.json leads to the image."""
    return _write_oci(classic_path, out_path, with_manifest_json=False)


def _write_oci(classic_path, out_path, with_manifest_json: bool) -> str:
    with tarfile.open(classic_path, "r:") as src:
        entry = json.load(src.extractfile(_member(src, "manifest.json")))[0]
        config = src.extractfile(_member(src, entry["Config"])).read()
        layers = [_digest_member(src, name) for name in entry["Layers"]]
        tags = entry.get("RepoTags") or []
        config_d = _descriptor(MEDIA_CONFIG, config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config_d,
            "layers": [{"mediaType": MEDIA_LAYER, "digest": f"sha256:{h}", "size": n}
                       for h, n, _ in layers],
        }, separators=(",", ":")).encode()
        index = _oci_index(_descriptor(MEDIA_MANIFEST, manifest), tags)
        blobs = {config_d["digest"][7:]: config, _sha(manifest): manifest}
        with tarfile.open(out_path, "w", format=tarfile.PAX_FORMAT) as out:
            _add_dir(out, "blobs")
            _add_dir(out, "blobs/sha256")
            layer_infos = {h: info for h, _, info in layers}
            for hexdigest in sorted(set(blobs) | set(layer_infos)):
                if hexdigest in blobs:
                    _add_bytes(out, f"blobs/sha256/{hexdigest}", blobs[hexdigest])
                else:
                    info = layer_infos[hexdigest]
                    meta = tarfile.TarInfo(f"blobs/sha256/{hexdigest}")
                    meta.size, meta.mode, meta.mtime = info.size, 0o644, 0
                    out.addfile(meta, src.extractfile(info))
            _add_bytes(out, "index.json", index)
            if with_manifest_json:
                _add_bytes(out, "manifest.json", json.dumps([{
                    "Config": f"blobs/sha256/{config_d['digest'][7:]}",
                    "RepoTags": tags,
                    "Layers": [f"blobs/sha256/{h}" for h, _, _ in layers],
                }], separators=(",", ":")).encode())
            _add_bytes(out, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    return os.fspath(out_path)


def _member(tar: tarfile.TarFile, name: str) -> tarfile.TarInfo:
    """The regular member behind `name`; `docker save` links repeated layers."""
    info = tar.getmember(name)
    for _ in range(40):
        if info.issym():
            name = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
        elif info.islnk():
            name = info.linkname
        else:
            return info
        info = tar.getmember(name)
    raise ValueError(f"{name}: too many levels of links")


def _digest_member(tar: tarfile.TarFile, name: str):
    info = _member(tar, name)
    digest = hashlib.sha256()
    with tar.extractfile(info) as f:
        for chunk in iter(lambda: f.read(COPY_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest(), info.size, info


def _descriptor(media_type: str, data: bytes) -> dict:
    return {"mediaType": media_type, "digest": f"sha256:{_sha(data)}", "size": len(data)}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _oci_index(manifest: dict, tags: list[str]) -> bytes:
    """Docker 25+ lists the manifest once per tag, named as containerd names it."""
    entries = [dict(manifest, annotations={
        "io.containerd.image.name": _full_name(tag),
        "org.opencontainers.image.ref.name": tag.rpartition(":")[2],
    }) for tag in tags] or [manifest]
    return json.dumps({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": entries},
                      separators=(",", ":")).encode()


def _full_name(tag: str) -> str:
    """`busybox:1` -> `docker.io/library/busybox:1`, the name containerd stores."""
    first = tag.split("/", 1)[0]
    if "/" in tag and ("." in first or ":" in first or first == "localhost"):
        return tag
    return f"docker.io/{tag}" if "/" in tag else f"docker.io/library/{tag}"


# ---------------------------------------------------------------- hand-made tars


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


def directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def fifo(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info


def char_device(name: str, major: int = 1, minor: int = 3) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, major, minor
    return info


def write_tar(path, members) -> str:
    """Write a tar of `members`: (name, bytes) pairs for files, or TarInfo entries.

    Names are written exactly as given (`../x`, `/etc/x` included), which is
    the point: tests use this to make archives `docker save` never would.
    """
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                _add_bytes(tar, name, data if isinstance(data, bytes) else data.encode())
    return os.fspath(path)


def copy_tar(src, dst, drop=(), replace: dict[str, bytes] | None = None, add=()) -> str:
    """Copy an archive, leaving out `drop`, swapping contents in `replace`, appending `add`."""
    replace = replace or {}
    with tarfile.open(src, "r:") as old, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as new:
        for info in old:
            if info.name in drop:
                continue
            if info.name in replace:
                _add_bytes(new, info.name, replace[info.name])
            elif info.isreg():
                new.addfile(info, old.extractfile(info))
            else:
                new.addfile(info)
        for member in add:
            if isinstance(member, tarfile.TarInfo):
                new.addfile(member)
            else:
                _add_bytes(new, *member)
    return os.fspath(dst)


def read_member(archive, name: str) -> bytes:
    """One member's bytes, for tests that edit a manifest."""
    with tarfile.open(archive, "r:") as tar:
        return tar.extractfile(_member(tar, name)).read()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = directory(name)
    info.mtime = 0
    tar.addfile(info)


# ---------------------------------------------------------------- gzip-compressed OCI layers

MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def to_gzip_oci_archive(classic_path, out_path) -> str:
    """The layout of `to_oci_archive` with every layer gzip-compressed, as an
    OCI export from a registry or buildx holds them: each layer blob is named
    by its compressed digest, while the config keeps the uncompressed
    diff_ids. Holds the layers in memory: for small test images."""
    import gzip

    with tarfile.open(classic_path, "r:") as src:
        entry = json.load(src.extractfile(_member(src, "manifest.json")))[0]
        config = src.extractfile(_member(src, entry["Config"])).read()
        layers = [gzip.compress(src.extractfile(_member(src, name)).read(), mtime=0)
                  for name in entry["Layers"]]
    tags = entry.get("RepoTags") or []
    config_d = _descriptor(MEDIA_CONFIG, config)
    layer_ds = [_descriptor(MEDIA_LAYER_GZIP, data) for data in layers]
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config_d,
                           "layers": layer_ds}, separators=(",", ":")).encode()
    blobs = {config_d["digest"][7:]: config, _sha(manifest): manifest}
    blobs.update({d["digest"][7:]: data for d, data in zip(layer_ds, layers)})
    with tarfile.open(out_path, "w", format=tarfile.PAX_FORMAT) as out:
        _add_dir(out, "blobs")
        _add_dir(out, "blobs/sha256")
        for hexdigest in sorted(blobs):
            _add_bytes(out, f"blobs/sha256/{hexdigest}", blobs[hexdigest])
        _add_bytes(out, "index.json", _oci_index(_descriptor(MEDIA_MANIFEST, manifest), tags))
        _add_bytes(out, "manifest.json", json.dumps([{
            "Config": f"blobs/sha256/{config_d['digest'][7:]}",
            "RepoTags": tags,
            "Layers": [f"blobs/sha256/{d['digest'][7:]}" for d in layer_ds],
        }], separators=(",", ":")).encode())
        _add_bytes(out, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    return os.fspath(out_path)


# ---------------------------------------------------------------- forged images (tests/security, tests/cluster)

def layer_of(name: str, data: bytes) -> bytes:
    """A layer: an uncompressed tar holding one file."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def forgery(victim_config: dict) -> tuple[bytes, list[bytes]]:
    """The victim's image config, its diff_ids kept, running `cat /secret.txt`
    over the forger's own harmless layers, one per diff_id."""
    config = json.loads(json.dumps(victim_config))
    config["config"]["Cmd"] = ["cat", "/secret.txt"]
    nonce = uuid.uuid4().hex
    config["config"]["Labels"] = {"forged": nonce}  # a new image id: nothing has it loaded
    layers = [layer_of(f"harmless-{n}.txt", f"mine {nonce}\n".encode())
              for n in range(len(config["rootfs"]["diff_ids"]))]
    return json.dumps(config).encode(), layers


def archive_of(path, config: bytes, layers: list[bytes], layout: str = "oci") -> str:
    """An image archive of `config` over `layers`, as Docker 25 (oci) or Docker 24 (classic) lays it out."""
    if layout == "classic":
        names = [f"{n:064x}/layer.tar" for n in range(1, len(layers) + 1)]
        config_name = f"{_sha(config)}.json"
        marker = []
    else:
        names = [f"blobs/sha256/{_sha(layer)}" for layer in layers]
        config_name = f"blobs/sha256/{_sha(config)}"
        marker = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [], "Layers": names}]).encode()
    return write_tar(path, [*marker, (config_name, config), *zip(names, layers), ("manifest.json", manifest)])
