"""Turning what `pink submit` was given into an archive file on disk.

An existing file is uploaded as it is; anything else is taken as the name of
an image in the local Docker Engine and `docker save`d into a temporary file
under $TMPDIR, which the caller deletes after the upload. Docker is imported
only here, and only when an image has to be saved. Called by `pink submit`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from pink.errors import PinkError

SAVE_CHUNK = 4 << 20  # bytes per chunk read from Docker's image export


def save_name(name: str, tags: list[str]) -> str | bool:
    """Which tag `docker save` should record, so the archive keeps the name the
    user typed (`alpine` means `alpine:latest`); True: the image's first tag."""
    if name in tags:
        return name
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in name and f"{name}:latest" in tags:
        return f"{name}:latest"
    return True


def _docker_image(name: str):
    missing = f"no local image {name} and no file {name}"
    try:
        import docker
        from docker import errors as docker_errors
    except ImportError:
        raise PinkError(f"{missing} (the docker Python package is not installed to look)",
                        code="no_image") from None
    try:
        return docker.from_env().images.get(name)
    except docker_errors.ImageNotFound:
        raise PinkError(missing, code="no_image") from None
    except docker_errors.DockerException as exc:
        raise PinkError(f"no file {name}, and the local Docker Engine cannot be asked for an "
                        f"image of that name: {exc}", code="no_image") from None


@contextlib.contextmanager
def archive_for(source: str, on_saving: Callable[[str, int], None] | None = None,
                progress: Callable[[int, int | None], None] | None = None) -> Iterator[str]:
    """Yield the path of a `docker save` archive for `source` (a file or an image
    name); a temporary archive is removed when the block ends, however it ends."""
    if os.path.isfile(source):
        yield source
        return
    image = _docker_image(source)
    expected = int(image.attrs.get("Size") or 0) or None
    if on_saving:
        on_saving(source, expected or 0)
    fd, path = tempfile.mkstemp(prefix="pink-image-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as fh:
            done = 0
            try:
                for chunk in image.save(chunk_size=SAVE_CHUNK, named=save_name(source, image.tags)):
                    fh.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, max(expected or 0, done))
            except Exception as exc:  # docker.errors.* or a dropped connection to the engine
                raise PinkError(f"saving image {source} from Docker failed: {exc}",
                                code="save_failed") from None
        yield path
    finally:
        Path(path).unlink(missing_ok=True)
