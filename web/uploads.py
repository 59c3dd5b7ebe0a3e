"""Receiving an image archive: streamed to the spool, hashed, validated.

The body is read in fixed-size chunks straight into a spool file while its
SHA-256 is computed, so memory stays flat whatever the size. Anything wrong
(too large, cut off, not a valid image archive) removes the partial file
before the error is raised: a failed upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from flask import request
from werkzeug.exceptions import ClientDisconnected

from pink import defaults, image_archive
from pink.errors import BadRequest, TooLarge
from pink.tasks import spool_file


@dataclass
class Upload:
    path: str
    sha256: str
    size: int
    info: image_archive.ImageInfo

    def image(self) -> dict:
        return {"sha256": self.sha256, "size": self.size, **self.info.to_dict()}


def _source():
    """The archive's byte stream: the raw body, or the file of a multipart form."""
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("image")
        if upload is None:
            raise BadRequest("the form has no file field named 'image'", code="no_file")
        return upload.stream
    return request.stream


def receive(spool_dir: str, task_id: str, max_bytes: int) -> Upload:
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise TooLarge(f"the archive is {declared} bytes; the limit is {max_bytes} bytes")
    os.makedirs(spool_dir, mode=0o700, exist_ok=True)
    part = os.path.join(spool_dir, f".{task_id}.part")
    final = spool_file(spool_dir, task_id)
    try:
        raw = request.mimetype != "multipart/form-data"
        sha, size = _spool(_source(), part, max_bytes)
        if raw and declared is not None and size != declared:
            raise BadRequest(f"the upload was cut off after {size} of {declared} bytes; send it again",
                             code="truncated")
        if size == 0:
            raise BadRequest("the request body is empty: send the `docker save` archive as the body",
                             code="empty")
        info = image_archive.inspect(part)
        os.replace(part, final)
    except ClientDisconnected:
        _discard(part)
        raise BadRequest("the upload was cut off before the end; send it again", code="truncated") from None
    except BaseException:
        _discard(part)
        raise
    return Upload(path=final, sha256=sha, size=size, info=info)


def _spool(stream, path: str, max_bytes: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as out:
        os.chmod(path, 0o600)
        while chunk := stream.read(defaults.UPLOAD_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise TooLarge(f"the archive is over the limit of {max_bytes} bytes")
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), size


def _discard(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
