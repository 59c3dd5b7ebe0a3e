"""`pink submit`'s upload: only the layers the server lacks (`web.blob_uploads`).

The archive is read where it lies: its headers tell where each layer's
bytes are (`pink.recipes.Recipe.from_archive`), so nothing is unpacked or
hashed whole here. The server answers which layers it lacks, and for those
it holds a challenge: hash a few random ranges, which only someone holding
the layer can. Each missing layer goes in its own PUT; one cut off is
resumed from the offset the server reports (HEAD). Used by
`pink_cli.client.Client.submit`.
"""

from __future__ import annotations

import base64
import time
from typing import Callable

from pink import image_archive, possession, recipes
from pink.errors import Conflict, PinkError, Unavailable

Progress = Callable[[int, "int | None"], None]
RESUME_TRIES = 5  # times one layer's upload is resumed after a cut connection
CHUNK = 1 << 20


class NoLayerUploads(Exception):
    """The server predates layer uploads: send the whole archive."""


class _Range:
    """Bytes [offset, offset + size) of a file as a request body, reporting progress."""

    def __init__(self, path, offset: int, size: int, report: Callable[[int], None]):
        self._fh = open(path, "rb")
        self._fh.seek(offset)
        self._left = size
        self._report = report

    def __len__(self) -> int:
        return self._left

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(min(self._left, CHUNK if size is None or size < 0 else size))
        self._left -= len(data)
        self._report(len(data))
        return data

    def close(self) -> None:
        self._fh.close()


def _reader(path, offset: int):
    def read(start: int, length: int) -> bytes:
        with open(path, "rb") as fh:
            fh.seek(offset + start)
            return fh.read(length)
    return read


def submit(client, archive, params: list[tuple[str, str]], progress: Progress | None = None,
           on_plan: Callable[[int, int, int], None] | None = None, idempotency_key: str | None = None,
           sweep: dict | None = None) -> dict:
    """Create a task from `archive`, uploading only what the server lacks; returns the task.

    `on_plan(layers to send, layers in all, bytes to send)` is told the plan
    before the upload starts. The commit carries `idempotency_key`, so the
    client may send it again after a cut and still get one task. Raises
    NoLayerUploads for an older server.
    """
    info = image_archive.inspect(archive)
    recipe, where = recipes.Recipe.from_archive(archive, info)
    with open(archive, "rb") as fh:
        fh.seek(where[recipe.config][0])
        config = fh.read(where[recipe.config][1])
    body = {"config": base64.b64encode(config).decode(), "layout": info.layout,
            "layers": [{"digest": d, "size": recipe.sizes[d]} for d in recipe.layers],
            "repo_tags": list(recipe.repo_tags)}
    resp = client._request("POST", "/uploads", json=body, expect=(201, 404, 405))
    if resp.status_code != 201:
        resp.close()
        raise NoLayerUploads()
    plan = resp.json()
    upload, missing = plan["upload"], plan["missing"]
    proofs = {d: possession.proof(_reader(archive, where[d][0]), c) for d, c in plan["challenges"].items()}
    total = sum(recipe.sizes[d] for d in missing)
    if on_plan:
        on_plan(len(missing), len(set(recipe.layers)), total)
    sent = [0]

    def report(n: int) -> None:
        sent[0] += n
        if progress:
            progress(sent[0], total)

    if progress:
        progress(0, total)
    for digest in missing:
        challenge = _put(client, upload, digest, archive, where[digest], report)
        if challenge:
            proofs[digest] = possession.proof(_reader(archive, where[digest][0]), challenge)
    key = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    body = {"proofs": proofs, **({"sweep": sweep} if sweep else {})}  # a sweep's spec (web.sweeps)
    return client._json("POST", f"/uploads/{upload}/commit", "task", params=params, json=body,
                        headers=key, expect=(200, 201))


def _put(client, upload: str, digest: str, archive, where: tuple[int, int], report) -> dict | None:
    """Send one layer, resuming after cuts; returns a challenge if the server got it elsewhere."""
    offset, size = where
    path = f"/uploads/{upload}/blobs/{digest}"
    held = 0
    for attempt in range(RESUME_TRIES + 1):
        body = _Range(archive, offset + held, size - held, report)
        try:
            resp = client._request("PUT", path, data=body, expect=(200, 201, 202),
                                   headers={"Upload-Offset": str(held), "Content-Type": "application/octet-stream"},
                                   timeout=(10.0, 600.0))
        except (Unavailable, Conflict):  # cut off; or the server still holds the cut request
            if attempt == RESUME_TRIES:
                raise
            time.sleep(min(2 ** attempt, 10))
            head = client._request("HEAD", path)
            resumed = int(head.headers.get("Upload-Offset", "0"))
            report(resumed - held - (size - held - len(body)))  # count what arrived, not what was read
            held = resumed
            continue
        finally:
            body.close()
        answer = resp.json()
        if resp.status_code == 200:
            return answer.get("challenge")
        held = answer["offset"]
        if held >= size:
            return None
    raise PinkError(f"layer {digest} did not arrive whole after {RESUME_TRIES} tries", code="upload_failed")

