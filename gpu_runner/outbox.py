"""The runner's outbox: task logs and exports, fetched by the transfer account.

That unprivileged account owns the directory, so it can replace any name in
it (with a symlink to /etc/shadow, say) while the runner, as root, writes
there. Files are therefore created afresh with O_NOFOLLOW | O_EXCL and handed
over by descriptor (fchown), never reopened or chowned by path; `sweep`
removes files no live task refers to. Names are `<task>-<attempt><suffix>`.
Used by execution and export (writing) and the agent (sweeping).
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Callable

CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
CREATE_TRIES = 5  # the account may plant a new name between our unlink and open


def owner(outbox_dir: str) -> tuple[int, int]:
    """(uid, gid) of the transfer account: the owner of the outbox itself."""
    st = os.stat(outbox_dir)
    return st.st_uid, st.st_gid


def create(path: str, uid_gid: tuple[int, int]) -> int:
    """A new empty file at `path` (mode 0600, owned by `uid_gid`); returns its descriptor.

    Whatever held the name (a stale file, a planted symlink) is unlinked,
    which never follows a link; O_EXCL | O_NOFOLLOW refuse anything planted
    after that instead of writing through it.
    """
    for _ in range(CREATE_TRIES):
        Path(path).unlink(missing_ok=True)
        try:
            fd = os.open(path, CREATE_FLAGS, 0o600)
        except FileExistsError:
            continue
        try:
            os.fchown(fd, *uid_gid)
            os.fchmod(fd, 0o600)
        except OSError:
            os.close(fd)
            raise
        return fd
    raise FileExistsError(f"{path} keeps being recreated in the outbox")


def attempt_of(name: str) -> tuple[str, int] | None:
    """(task id, attempt) an outbox file belongs to; None for a foreign name."""
    task_id, _, attempt = name.split(".", 1)[0].rpartition("-")
    return (task_id, int(attempt)) if task_id and attempt.isdigit() else None


def sweep(outbox_dir: str, referenced: Callable[[str, int], bool], grace: float) -> list[str]:
    """Remove files older than `grace` seconds whose (task, attempt) is not
    `referenced`; returns their names. Exports whose finalize failed, part
    files of interrupted exports and foreign files would otherwise fill the
    disk. `referenced` is asked once per attempt, and only about old files.
    Links are removed, never followed (lstat, unlink); directories are left."""
    stale: dict[tuple[str, int] | None, list[str]] = {}
    now = time.time()
    for name in os.listdir(outbox_dir):
        try:
            st = os.lstat(os.path.join(outbox_dir, name))
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode) and now - st.st_mtime > grace:
            stale.setdefault(attempt_of(name), []).append(name)
    removed = []
    for key, names in stale.items():
        if key is not None and referenced(*key):
            continue
        for name in names:
            try:
                os.unlink(os.path.join(outbox_dir, name))
                removed.append(name)
            except FileNotFoundError:
                pass  # fetched and removed by finalize meanwhile
    return removed
