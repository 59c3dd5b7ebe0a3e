"""Image archive inspection: is an uploaded `docker save` tar safe and usable?

The web node calls `inspect(path)` on a spooled upload before anything trusts
it; it reads member headers and the small JSON files only, never layer data.
Both layouts Docker writes are accepted: classic (`manifest.json`, Docker up
to 24) and OCI (`oci-layout`, `index.json`, `blobs/sha256/`, Docker 25+).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tarfile

from pink.errors import ArchiveError

RESERVED_REPO = "pink/cache"  # runners tag loaded images <this>:<archive sha256> (gpu_runner.images); uploads may not
MAX_MEMBERS = 100_000  # members an archive may hold; a real image has a few per layer
MAX_JSON_BYTES = 16 * 2**20  # bytes: largest manifest, index or config we read
MAX_HEADER_BYTES = 1 * 2**20  # bytes: largest pax or GNU long-name header we read
MAX_LINK_HOPS = 40  # symlinks followed while resolving one path, as Linux does

MANIFEST = "manifest.json"
OCI_INDEX = "index.json"
OCI_LAYOUT = "oci-layout"
BLOBS_DIR = "blobs/sha256/"

MEDIA_MANIFESTS = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
MEDIA_INDEXES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}

SAVE_HINT = "create it with `docker save IMAGE -o FILE.tar`"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
COMPRESSED = {  # magic bytes Docker detects -> compression
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the rest of PINK may rely on once an archive passed inspection."""

    layout: str  # "docker" (classic) or "oci" (Docker 25+, or a pure OCI layout)
    image_id: str  # "sha256:<hex>" of the config: the ID `docker load` will report
    repo_tags: list[str]
    layers: list[str]  # member names, base layer first
    config: str  # member name of the image config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def inspect(path, max_members: int = MAX_MEMBERS) -> ImageInfo:
    """Check an uploaded archive and describe the one image it holds.

    Raises ArchiveError (HTTP 400) with a code the client can act on:
    not_tar, no_manifest, bad_manifest, missing_layer or unsafe_member.
    """
    with open(path, "rb") as raw:
        _refuse_compressed(raw.read(8))
        raw.seek(0)
        try:
            tar = tarfile.open(fileobj=raw, mode="r:", tarinfo=_BoundedTarInfo)
        except tarfile.ReadError as e:
            raise _unreadable(raw, e) from None
        with tar:
            members = _read_members(tar, raw, max_members)
            return _describe(_Archive(tar, members))


# ---------------------------------------------------------------- the tar itself


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses huge pax / long-name headers.

    tarfile reads those headers into memory whole; a hostile upload could
    declare one of many gigabytes.
    """

    def _proc_member(self, tarfile_):
        special = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                    tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
        if self.type in special and self.size > MAX_HEADER_BYTES:
            raise ArchiveError(
                f"the archive has an extended tar header of {self.size} bytes "
                f"(at most {MAX_HEADER_BYTES} accepted); {SAVE_HINT}",
                code="unsafe_member")
        return super()._proc_member(tarfile_)


def _refuse_compressed(head: bytes) -> None:
    """We inspect by seeking in the file, which a compressed stream forbids."""
    for magic, kind in COMPRESSED.items():
        if head.startswith(magic):
            raise ArchiveError(
                f"the file is {kind}-compressed; upload the plain tar that "
                f"`docker save IMAGE -o FILE.tar` writes (it is not compressed)",
                code="not_tar")


def _unreadable(raw, error) -> ArchiveError:
    raw.seek(0, 2)
    if raw.tell() == 0:
        return ArchiveError(f"the file is empty; {SAVE_HINT}", code="not_tar")
    raw.seek(0)
    if raw.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE):
        return ArchiveError(f"the tar archive is empty: it holds no image; {SAVE_HINT}",
                            code="no_manifest")
    return ArchiveError(f"the file is not a tar archive ({error}); {SAVE_HINT}",
                        code="not_tar")


def _read_members(tar: tarfile.TarFile, raw, max_members: int) -> dict[str, tarfile.TarInfo]:
    """Every member by normalised name, each checked alone as it is read."""
    members: dict[str, tarfile.TarInfo] = {}
    while True:
        try:
            info = tar.next()
        except tarfile.ReadError as e:
            raise ArchiveError(
                f"the tar archive is truncated or corrupt ({e}); upload it again",
                code="not_tar") from None
        except OSError:  # Python 3.10's tarfile seeks to -1 in an empty file
            if members:
                raise
            info = None
        if info is None:
            break
        if len(members) >= max_members:
            raise ArchiveError(
                f"the archive has more than {max_members} members; an image "
                f"archive has a few per layer. {SAVE_HINT}", code="unsafe_member")
        name = _member_name(info)
        if name in members:
            raise ArchiveError(f"member {info.name!r} appears twice in the archive",
                               code="unsafe_member")
        members[name] = info
    _check_end_marker(raw, tar.offset)
    _check_links(members)
    return members


def _check_end_marker(raw, offset: int) -> None:
    """A tar that stops without its two zero blocks was cut short.

    tarfile treats a truncated or garbled header as a normal end, and
    `docker save` always writes the end marker, so its absence means the
    upload lost its tail (where `manifest.json` lives).
    """
    raw.seek(offset)
    tail = raw.read(2 * tarfile.BLOCKSIZE)
    if tail != bytes(2 * tarfile.BLOCKSIZE):
        raise ArchiveError(
            f"the tar archive is truncated or corrupt at byte {offset}: it lacks the "
            f"end-of-archive marker; upload the complete file again", code="not_tar")


def _member_name(info: tarfile.TarInfo) -> str:
    """The member's path inside the archive, refused if it could leave it."""
    if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
        raise ArchiveError(
            f"member {info.name!r} is a device, fifo or other special file; "
            f"an image archive holds only files, directories and links",
            code="unsafe_member")
    name = _clean_path(info.name)
    if name is None:
        raise ArchiveError(
            f"member {info.name!r} has an absolute path or `..` component; "
            f"it would be written outside the archive", code="unsafe_member")
    return name


def _clean_path(path: str) -> str | None:
    """`a/./b/` -> `a/b`; None for an absolute path or any `..` component."""
    if path.startswith("/"):
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        return None
    return "/".join(parts)


def _check_links(members: dict[str, tarfile.TarInfo]) -> None:
    """No link may point outside the archive root, and nothing is written through one.

    Link targets are resolved against the archive's own symlinks, so a chain
    such as `a -> .` and `b -> a/..` is caught, not just a literal `../`.
    """
    for name, info in members.items():
        parent = name.rpartition("/")[0]
        if parent and _through_symlink(parent, members):
            raise ArchiveError(f"member {info.name!r} would be written through a symlink",
                               code="unsafe_member")
        if info.issym():
            target = info.linkname
            base = parent
        elif info.islnk():
            target = info.linkname
            base = ""  # a hard link names another member from the root
        else:
            continue
        if target.startswith("/") or _resolve(base, target, members) is None:
            kind = "symlink" if info.issym() else "hard link"
            raise ArchiveError(
                f"{kind} {info.name!r} points to {target!r}, outside the archive",
                code="unsafe_member")


def _through_symlink(path: str, members) -> bool:
    parts = path.split("/")
    return any(
        (m := members.get("/".join(parts[:i + 1]))) is not None and m.issym()
        for i in range(len(parts)))


def _resolve(base: str, target: str, members, hops: int = 0) -> str | None:
    """Where `target`, read from directory `base`, lands; None if it escapes.

    The root is `""`. Symlinks met on the way are followed as the kernel
    would after extraction; a loop counts as an escape.
    """
    if hops > MAX_LINK_HOPS:
        return None
    done: list[str] = [p for p in base.split("/") if p]
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not done:
                return None
            done.pop()
            continue
        done.append(part)
        member = members.get("/".join(done))
        if member is not None and member.issym():
            if member.linkname.startswith("/"):
                return None
            landed = _resolve("/".join(done[:-1]), member.linkname, members, hops + 1)
            if landed is None:
                return None
            done = [p for p in landed.split("/") if p]
    return "/".join(done)


# ---------------------------------------------------------------- the image


class _Archive:
    """The members of an open tar, with the lookups the manifests need."""

    def __init__(self, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]):
        self.tar = tar
        self.members = members

    def file(self, path, what: str) -> str:
        """The member a manifest names; missing_layer if the archive lacks it."""
        name = _clean_path(path) if isinstance(path, str) else None
        if name is None:
            raise ArchiveError(f"the manifest names {what} {path!r}, which is not a "
                               f"relative path inside the archive", code="bad_manifest")
        if self.regular(name) is None:
            raise ArchiveError(
                f"the manifest names {what} {name!r}, but the archive does not hold it; "
                f"the archive is incomplete: {SAVE_HINT}", code="missing_layer")
        return name

    def regular(self, name: str) -> tarfile.TarInfo | None:
        """The regular file `name` ends at after symlinks and hard links, if any."""
        for _ in range(MAX_LINK_HOPS):
            landed = _resolve("", name, self.members)
            info = self.members.get(landed) if landed is not None else None
            if info is None or not info.islnk():
                return info if info is not None and info.isreg() else None
            name = info.linkname
        return None

    def json(self, path: str, what: str):
        """(parsed, raw bytes) of a small JSON member; bad_manifest if large or not JSON."""
        info = self.regular(self.file(path, what))
        if info.size > MAX_JSON_BYTES:
            raise ArchiveError(f"{what} {path!r} is {info.size} bytes; at most "
                               f"{MAX_JSON_BYTES} accepted", code="bad_manifest")
        data = self.tar.extractfile(info).read()
        try:
            return json.loads(data), data
        except (ValueError, RecursionError) as e:
            raise ArchiveError(f"{what} {path!r} is not valid JSON ({e})",
                               code="bad_manifest") from None

    def has(self, name: str) -> bool:
        return name in self.members


def _describe(archive: _Archive) -> ImageInfo:
    layout = "oci" if archive.has(OCI_LAYOUT) else "docker"
    if layout == "oci":
        _check_blob_names(archive)
    if archive.has(MANIFEST):
        image = _from_manifest_json(archive)
    elif layout == "oci" and archive.has(OCI_INDEX):
        image = _from_oci_index(archive)
    else:
        raise ArchiveError(
            "the tar holds no image manifest (neither manifest.json nor an OCI "
            f"index.json with oci-layout); {SAVE_HINT}", code="no_manifest")
    return _checked_config(archive, layout, *image)


def _check_blob_names(archive: _Archive) -> None:
    """OCI blobs are named by their digest; anything else under blobs/sha256/ is odd."""
    for name, info in archive.members.items():
        if name.startswith(BLOBS_DIR) and not info.isdir():
            if not _HEX64.fullmatch(name[len(BLOBS_DIR):]):
                raise ArchiveError(f"blob {name!r} is not named by a sha256 digest",
                                   code="bad_manifest")


def _from_manifest_json(archive: _Archive):
    """Config, layers and tags from `manifest.json`, which `docker load` reads first."""
    manifest, _ = archive.json(MANIFEST, "the manifest")
    if not isinstance(manifest, list) or not manifest:
        raise ArchiveError("manifest.json is not a list of images", code="bad_manifest")
    if len(manifest) > 1:
        raise ArchiveError(
            f"the archive holds {len(manifest)} images; PINK runs exactly one image "
            f"per archive: save one image per file", code="bad_manifest")
    entry = manifest[0]
    if not isinstance(entry, dict):
        raise ArchiveError("manifest.json's entry is not an object", code="bad_manifest")
    config, layers, tags = entry.get("Config"), entry.get("Layers"), entry.get("RepoTags")
    if not isinstance(config, str):
        raise ArchiveError("manifest.json names no Config", code="bad_manifest")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise ArchiveError("manifest.json's Layers is not a list of paths",
                           code="bad_manifest")
    if tags is None:
        tags = []
    if not isinstance(tags, list) or not all(isinstance(x, str) for x in tags):
        raise ArchiveError("manifest.json's RepoTags is not a list of names",
                           code="bad_manifest")
    return config, layers, list(tags)


def _from_oci_index(archive: _Archive):
    """Config, layers and tags from a pure OCI layout: index.json -> manifest -> blobs."""
    archive.json(OCI_LAYOUT, "the OCI layout marker")
    index, _ = archive.json(OCI_INDEX, "the OCI index")
    descriptor = _one_manifest(archive, index, "index.json")
    tags = _tags_of(index, descriptor["digest"])
    if descriptor.get("mediaType") in MEDIA_INDEXES:
        nested, _ = archive.json(_blob(descriptor), "the nested index")
        descriptor = _one_manifest(archive, nested, f"index {descriptor['digest']}", True)
    manifest, _ = archive.json(_blob(descriptor), "the image manifest")
    if not isinstance(manifest, dict):
        raise ArchiveError("the OCI image manifest is not an object", code="bad_manifest")
    media = manifest.get("mediaType", descriptor.get("mediaType"))
    if media not in MEDIA_MANIFESTS:
        raise ArchiveError(f"the OCI index points to {media!r}, not an image manifest",
                           code="bad_manifest")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ArchiveError("the OCI image manifest has no layers list", code="bad_manifest")
    return _blob(manifest.get("config")), [_blob(d) for d in layers], tags


def _one_manifest(archive: _Archive, index, where: str, nested: bool = False) -> dict:
    """The single image an index describes, ignoring build attestations.

    In a nested (multi-platform) index, platforms whose blobs were never
    pulled, and so are not in the archive, do not count.
    """
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ArchiveError(f"{where} has no manifests list", code="bad_manifest")
    found: dict[str, dict] = {}
    for d in index["manifests"]:
        _blob(d)
        notes = d.get("annotations") or {}
        if notes.get("vnd.docker.reference.type") == "attestation-manifest":
            continue
        found.setdefault(d["digest"], d)  # one image saved under two tags is listed twice
    if nested and len(found) > 1:
        present = {k: d for k, d in found.items() if archive.has(_blob(d))}
        found = present or found
    if len(found) != 1:
        raise ArchiveError(
            f"{where} describes {len(found)} images; PINK runs exactly one image per "
            f"archive: save one image (one platform) per file", code="bad_manifest")
    return next(iter(found.values()))


def _blob(descriptor) -> str:
    """The member path of a descriptor's blob; bad_manifest for a malformed digest."""
    digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise ArchiveError(f"malformed descriptor digest {digest!r}; expected "
                           f"sha256:<64 hex digits>", code="bad_manifest")
    return BLOBS_DIR + match.group(1)


def _tags_of(index: dict, digest: str) -> list[str]:
    """`docker load` names an OCI image from containerd's annotation."""
    tags = []
    for d in index["manifests"]:
        name = (d.get("annotations") or {}).get("io.containerd.image.name")
        if d.get("digest") == digest and isinstance(name, str) and _familiar(name) not in tags:
            tags.append(_familiar(name))
    return tags


def _familiar(name: str) -> str:
    """`docker.io/library/busybox:1` -> `busybox:1`, as `docker images` shows it."""
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _checked_config(archive: _Archive, layout: str, config: str, layers: list[str],
                    tags: list[str]) -> ImageInfo:
    """Resolve every member the manifest names and read the config it points to.

    The image ID is the sha256 of the config bytes: exactly what Docker
    reports after `docker load`, whatever the config member is called.
    """
    config = archive.file(config, "config")
    layers = [archive.file(layer, "layer") for layer in layers]
    parsed, data = archive.json(config, "config")
    digest = hashlib.sha256(data).hexdigest()
    named = re.fullmatch(r"(?:.*/)?(?:sha256:)?([0-9a-f]{64})(?:\.json)?", config)
    if named and named.group(1) != digest:
        raise ArchiveError(f"config {config!r} does not match its sha256 ({digest}); "
                           f"the archive is corrupt", code="bad_manifest")
    diff_ids = parsed.get("rootfs", {}).get("diff_ids") if isinstance(parsed, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise ArchiveError(
            f"config {config!r} lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'}"
            f" layer diff_ids but the manifest names {len(layers)} layers",
            code="bad_manifest")
    reserved = [t for t in tags if t.split(":", 1)[0].endswith(RESERVED_REPO)]
    if reserved:
        raise ArchiveError(f"the image is tagged {reserved[0]}: {RESERVED_REPO} is PINK's own cache; "
                           "retag it (docker tag) and save it again", code="bad_manifest")
    return ImageInfo(layout=layout, image_id=f"sha256:{digest}", repo_tags=tags,
                     layers=layers, config=config)
