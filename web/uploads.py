"""Receiving a whole image archive (`curl --data-binary @image.tar`, the web page).

The body is read in fixed-size chunks straight into a spool file, so memory
stays flat whatever the size; once inspected, its config and layers go into
the web node's blob store (`pink.blob_store`) and the archive is deleted: the
task keeps the image's recipe, and the next upload sharing those layers
can skip them (`web.blob_uploads`). Anything wrong (too large, cut off, not
a valid image archive, a config whose diff_ids are not its layers) removes
the partial file before the error is raised: a failed upload leaves nothing
behind but verified blobs, which the store collects like any other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flask import request
from werkzeug.exceptions import ClientDisconnected

from pink import blob_store, image_archive, rebuilt_archive, recipes
from pink.errors import BadRequest, TooLarge


@dataclass
class Upload:
    recipe: recipes.Recipe
    received: int  # bytes of the request body
    info: image_archive.ImageInfo

    def image(self) -> dict:
        return image_record(self.recipe, self.info.layout)


def image_record(recipe: recipes.Recipe, layout: str) -> dict:
    """A task's `image`: named by its recipe's key, sized as the archive a runner loads."""
    return {"sha256": recipe.key, "size": rebuilt_archive.archive_size(recipe), "image_id": recipe.image_id,
            "repo_tags": list(recipe.repo_tags), "layout": layout, "recipe": recipe.to_dict()}


def _source():
    """The archive's byte stream: the raw body, or the file of a multipart form."""
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("image")
        if upload is None:
            raise BadRequest("the form has no file field named 'image'", code="no_file")
        return upload.stream
    return request.stream


def receive(spool_dir: str, store: blob_store.BlobStore, task_id: str, max_bytes: int) -> Upload:
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise TooLarge(f"the archive is {declared} bytes; the limit is {max_bytes} bytes")
    os.makedirs(spool_dir, mode=0o700, exist_ok=True)
    part = os.path.join(spool_dir, f".{task_id}.part")
    try:
        raw = request.mimetype != "multipart/form-data"
        size = _spool(_source(), part, max_bytes)
        if raw and declared is not None and size != declared:
            raise BadRequest(f"the upload was cut off after {size} of {declared} bytes; send it again",
                             code="truncated")
        if size == 0:
            raise BadRequest("the request body is empty: send the `docker save` archive as the body",
                             code="empty")
        info = image_archive.inspect(part)
        recipe, ranges = recipes.Recipe.from_archive(part, info)
        for digest, (offset, length) in ranges.items():
            store.ingest(digest, part, offset, length)  # checked even when the store holds it
            store.prepare_diff_id(digest)  # every layer's, now: a session may reuse one later
        blob_store.verified_diff_ids(store, recipe)  # the config's word about its layers, checked
    except ClientDisconnected:
        raise BadRequest("the upload was cut off before the end; send it again", code="truncated") from None
    finally:
        Path(part).unlink(missing_ok=True)
    return Upload(recipe=recipe, received=size, info=info)


def _spool(stream, path: str, max_bytes: int) -> int:
    size = 0
    with open(path, "wb") as out:
        os.chmod(path, 0o600)
        while chunk := stream.read(blob_store.COPY_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise TooLarge(f"the archive is over the limit of {max_bytes} bytes")
            out.write(chunk)
    return size
