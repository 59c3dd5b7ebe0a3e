"""Image recipes: the blobs that rebuild one loadable image, and its names.

A GPU image is 5-15 GB and a person changes a few kB between runs, so PINK
moves blobs (layer tars and configs, keyed by sha256 as the archive stores
them), not archives: a `Recipe` says which blobs make an image,
`pink.blob_store` holds them on web nodes and runners, and
`pink.rebuilt_archive` serves the `docker load`-able tar assembled from them.
A recipe is kept as `Recipe.to_dict()` in task records and upload
sessions; its `key` names the image in stores and spools. No Flask, no
Docker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tarfile
import types

from pink import image_archive
from pink.config import WebConfig
from pink.errors import ArchiveError, BadRequest

MAX_LAYERS = 128  # layers a recipe may list: overlay2 mounts no more; each task record in etcd lists them
MAX_TAGS = 100  # repo tags a recipe may carry
MAX_CONFIG_BYTES = 16 * 2**20  # an image config (they are kilobytes)
MAX_TAG_CHARS = 512  # characters in one repo tag (Docker: 255 for the name, 128 for the tag)
MAX_BLOB_BYTES = WebConfig.max_upload_bytes  # bytes: largest blob, and largest sum of a recipe's blobs

HEX64 = re.compile(r"[0-9a-f]{64}")  # a bare sha256 digest, as blobs are named
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_TAG = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space: what a Docker reference may hold


def _bad(message: str) -> BadRequest:
    return BadRequest(message, code="bad_manifest")


def check_hex(digest, what: str = "digest", code: str = "bad_manifest") -> str:
    """`digest` when it is a bare sha256 (64 lowercase hex digits); else BadRequest `code`."""
    if not isinstance(digest, str) or not HEX64.fullmatch(digest):
        raise BadRequest(f"{what} {str(digest)[:80]!r} is not 64 lowercase hex digits (a sha256)",
                         code=code)
    return digest


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
        check_hex(self.config, "config digest")
        if not isinstance(self.layers, (list, tuple)):
            raise _bad("layers is not a list of digests")
        if len(self.layers) > MAX_LAYERS:
            raise _bad(f"the image has {len(self.layers)} layers; at most {MAX_LAYERS} accepted")
        for layer in self.layers:
            check_hex(layer, "layer digest")
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
            "Config": image_archive.BLOBS_DIR + self.config,
            "RepoTags": list(self.repo_tags),
            "Layers": [image_archive.BLOBS_DIR + layer for layer in self.layers],
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
        `pink.blob_store.BlobStore.ingest` checks every digest as it copies
        the bytes, and `pink.blob_store.verified_diff_ids` the config's
        diff_ids against the stored layers.
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
            named = landed[len(image_archive.BLOBS_DIR):]
            if landed.startswith(image_archive.BLOBS_DIR) and HEX64.fullmatch(named):
                digest = named
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
    holds a recipe): its config and layers; none for a record without one
    (an earlier version's whole-archive task)."""
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
