"""Backups of PINK's state, their restore, and the tasks finalized after a dump.

What holds what (docs/architecture.md): MariaDB is the archive (users,
tokens, every finished task's row, log and events); etcd holds the live
tasks, runners and reservations; web nodes hold the outputs on disk. This
module is the one implementation that the `backup` role's systemd timers
and the playbooks `ansible/backup.yml` and `ansible/restore.yml` run
(`pink-backup COMMAND`, or `python -m pink.backup_command COMMAND`):

  mariadb-dump   `mariadb-dump --single-transaction` of PINK's database (one
                 consistent read, with routines, triggers and events) into
                 DIR, zstd-compressed, mode 0600; credentials come from a
                 root-only option file, never the command line
  mariadb-load   check a dump whole (decompresses, ends with the completion
                 line), then load it: the database is dropped and re-created
  etcd-snapshot  `etcdctl snapshot save` from one member, then `snapshot
                 status` checks it, compressed into DIR, mode 0600
  etcd-restore   a snapshot into a new data directory of one member
                 (`etcdutl`/`etcdctl snapshot restore`), for a cluster every
                 member of which is restored from the same snapshot
  recover        after `mariadb-load`, re-create the archive rows of the tasks
                 this web node finalized after the dump, from its journal
  redelete       then delete again the tasks this node deleted after the dump
  prune, newest  the kept files

A failure exits non-zero, so the systemd unit that ran it fails.

`recover` and `redelete` read the journal of finalized tasks
(`pink.journal`): what a dump is too old to hold.
"""

from __future__ import annotations

import calendar
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import zstandard


log = logging.getLogger("pink.backup")

STAMP = "%Y%m%dT%H%M%SZ"  # UTC, in every backup's file name: when it was started
STAMP_RE = re.compile(r"(\d{8}T\d{6}Z)")
KINDS = {"mariadb": ("pink-mariadb-", ".sql.zst"), "etcd": ("pink-etcd-", ".db.zst")}
DUMP_TRAILER = b"-- Dump completed"  # mariadb-dump's last line, written only when it finished
TAIL = 4096  # bytes of a dump's end kept to find the trailer
CHUNK = 1 << 20
ZSTD_LEVEL = 3
MARIADB_DUMP_FLAGS = ["--single-transaction", "--routines", "--triggers", "--events", "--hex-blob",
                      "--default-character-set=utf8mb4", "--add-drop-database"]



class BackupError(Exception):
    """A backup, check or restore that did not happen; its message says why."""


# -- names and retention ---------------------------------------------------------

def stamp(at: float | None = None) -> str:
    return time.strftime(STAMP, time.gmtime(time.time() if at is None else at))


def parse_stamp(text: str) -> float:
    """Seconds since the epoch of a STAMP, a file name holding one, or a number."""
    try:
        return float(text)
    except ValueError:
        pass
    found = STAMP_RE.search(os.path.basename(text))
    if not found:
        raise BackupError(f"{text!r} holds no time like 20260101T000000Z")
    return float(calendar.timegm(time.strptime(found.group(1), STAMP)))


def backup_name(kind: str, at: float | None = None) -> str:
    prefix, suffix = KINDS[kind]
    return f"{prefix}{stamp(at)}{suffix}"


def backups(directory: str | os.PathLike, kind: str) -> list[tuple[float, Path]]:
    """The kept backups of `kind` in `directory`, oldest first, with their times."""
    prefix, suffix = KINDS[kind]
    pattern = re.compile(re.escape(prefix) + r"(\d{8}T\d{6}Z)" + re.escape(suffix) + "$")
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        m = pattern.match(entry.name)
        if m and entry.is_file(follow_symlinks=False):
            found.append((parse_stamp(m.group(1)), Path(entry.path)))
    return sorted(found)


def newest(directory: str | os.PathLike, kind: str) -> Path:
    kept = backups(directory, kind)
    if not kept:
        raise BackupError(f"no {kind} backup in {directory}")
    return kept[-1][1]


def prune(directory: str | os.PathLike, kind: str, keep_days: float, now: float | None = None) -> list[Path]:
    """Remove backups of `kind` older than `keep_days` (by the time in their
    name), never the newest one; and part files a crash left a day ago."""
    now = time.time() if now is None else now
    kept = backups(directory, kind)
    removed = []
    for at, path in kept[:-1]:
        if at < now - keep_days * 86400:
            path.unlink(missing_ok=True)
            removed.append(path)
    prefix = "." + KINDS[kind][0]
    for entry in os.scandir(directory) if os.path.isdir(directory) else []:
        if entry.name.startswith(prefix) and entry.name.endswith(".part") and \
                entry.stat(follow_symlinks=False).st_mtime < now - 86400:
            shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _private_dir(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _check_private(path: str | os.PathLike) -> None:
    """An option file holding credentials must be its owner's alone."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BackupError(f"{path} does not exist") from None
    if mode & 0o077:
        raise BackupError(f"{path} is readable by others (mode {mode & 0o777:o}): "
                          "chmod 600 it, it holds credentials")


def _publish(part: Path, final: Path) -> None:
    """Rename a complete, synced part file to its final name, durably."""
    os.replace(part, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_part(directory: Path, name: str) -> Path:
    return directory / f".{name}.{uuid.uuid4().hex[:8]}.part"


def _stderr_of(fh) -> str:
    fh.seek(0)
    return fh.read().decode(errors="replace").strip()[-2000:]


# -- MariaDB -----------------------------------------------------------------------

def dump_mariadb(options_file: str, database: str, directory: str | os.PathLike,
                 at: float | None = None) -> Path:
    """`mariadb-dump` of `database` into `directory`, compressed; returns the file.

    --single-transaction reads every InnoDB table (all of PINK's) at one
    point without locking writers; routines, triggers and events come along
    so that a restore is the whole schema; --add-drop-database makes a load
    replace the database rather than merge into it. The file appears under
    its name only once the dump finished and was read back whole.
    """
    _check_private(options_file)
    out_dir = _private_dir(directory)
    final = out_dir / backup_name("mariadb", at)
    part = _new_part(out_dir, final.name)
    argv = ["mariadb-dump", f"--defaults-extra-file={options_file}", *MARIADB_DUMP_FLAGS,
            "--databases", database]
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
            tail = b""
            with zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).stream_writer(
                    out, closefd=False) as z:
                for chunk in iter(lambda: proc.stdout.read(CHUNK), b""):
                    z.write(chunk)
                    tail = (tail + chunk)[-TAIL:]
            rc = proc.wait()
            out.flush()
            os.fsync(out.fileno())
            if rc:
                raise BackupError(f"mariadb-dump exited with {rc}: {_stderr_of(err)}")
        if DUMP_TRAILER not in tail:
            raise BackupError("mariadb-dump ended without its completion line")
        verify_dump(part)
        _publish(part, final)
        return final
    finally:
        part.unlink(missing_ok=True)


def verify_dump(path: str | os.PathLike) -> int:
    """Read a compressed dump whole: it must decompress (checksums included)
    and end with mariadb-dump's completion line. Returns its SQL's size."""
    tail, size = b"", 0
    try:
        with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as z:
            for chunk in iter(lambda: z.read(CHUNK), b""):
                size += len(chunk)
                tail = (tail + chunk)[-TAIL:]
    except zstandard.ZstdError as exc:
        raise BackupError(f"{path} is damaged: {exc}") from None
    if DUMP_TRAILER not in tail:
        raise BackupError(f"{path} is not a complete dump (no completion line at its end)")
    return size


def load_mariadb(path: str | os.PathLike, options_file: str) -> int:
    """Check the dump whole, then load it with the `mariadb` client.

    The dump drops and re-creates its database, so what it does not hold
    (rows written after it) is gone until `recover` brings the journaled
    tasks back. Nothing is dropped when the file is damaged. Returns the
    SQL's size."""
    _check_private(options_file)
    size = verify_dump(path)
    argv = ["mariadb", f"--defaults-extra-file={options_file}", "--batch",
            "--default-character-set=utf8mb4"]
    with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as z, \
            tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            for chunk in iter(lambda: z.read(CHUNK), b""):
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass  # the client stopped: its status and message say why
        finally:
            proc.stdin.close()
        rc = proc.wait()
        if rc:
            raise BackupError(f"loading {path} failed (mariadb exited with {rc}): {_stderr_of(err)}")
    return size


# -- etcd --------------------------------------------------------------------------

def _etcd_tool() -> tuple[list[str], dict]:
    """etcd 3.5+ checks and restores snapshots with etcdutl; 3.4 (Debian 12) with etcdctl."""
    if shutil.which("etcdutl"):
        return ["etcdutl"], {}
    return ["etcdctl"], {"ETCDCTL_API": "3"}


def _run(argv: list[str], env: dict | None = None, what: str = "") -> str:
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode:
        raise BackupError(f"{what or argv[0]} failed ({out.returncode}): "
                          f"{(out.stderr or out.stdout).strip()[-2000:]}")
    return out.stdout


def snapshot_status(path: str | os.PathLike) -> dict:
    """`snapshot status` of an uncompressed snapshot: hash, revision, totalKey, totalSize."""
    tool, env = _etcd_tool()
    text = _run([*tool, "snapshot", "status", str(path), "-w", "json"], env, "snapshot status")
    try:
        status = json.loads(text)
    except ValueError:
        raise BackupError(f"snapshot status printed no JSON: {text[:200]!r}") from None
    if not status.get("totalKey"):  # even an empty cluster's database holds its own keys
        raise BackupError(f"the snapshot holds no keys: {status}")
    return status


def snapshot_etcd(endpoint: str, directory: str | os.PathLike, cacert: str = "", cert: str = "",
                  key: str = "", at: float | None = None) -> tuple[Path, dict]:
    """`etcdctl snapshot save` from one member (root's client certificate:
    a snapshot needs etcd's root once authentication is on), checked with
    `snapshot status`, then compressed into `directory`. Returns the file
    and its status."""
    if key:
        _check_private(key)
    out_dir = _private_dir(directory)
    final = out_dir / backup_name("etcd", at)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=out_dir))
    try:
        raw = work / "snapshot.db"
        tls = [f"--{flag}={value}" for flag, value in (("cacert", cacert), ("cert", cert), ("key", key))
               if value]
        _run(["etcdctl", f"--endpoints={endpoint}", *tls, "snapshot", "save", str(raw)],
             {"ETCDCTL_API": "3"}, "etcdctl snapshot save")
        status = snapshot_status(raw)
        part = work / "snapshot.zst"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(raw, "rb") as src, os.fdopen(fd, "wb") as dst:
            zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).copy_stream(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        _publish(part, final)
        return final, status
    finally:
        shutil.rmtree(work, ignore_errors=True)


def restore_etcd(path: str | os.PathLike, data_dir: str, name: str, initial_cluster: str,
                 peer_url: str, token: str) -> dict:
    """Restore a compressed snapshot into `data_dir` (which must not exist)
    as member `name` of a new cluster `initial_cluster` (name=peer-url,...).

    Every member is restored from the same snapshot with the same
    `initial_cluster` and `token`, then all start together with
    `--initial-cluster-state new` (the etcd role's setting): the snapshot's
    keys, leases, users and roles, under a new cluster id. Returns the
    snapshot's status."""
    target = Path(data_dir)
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{data_dir} is not empty: move the member's data aside first")
    if target.exists():
        target.rmdir()
    work = Path(tempfile.mkdtemp(prefix=".pink-etcd-restore.", dir=target.parent))
    try:
        raw = work / "snapshot.db"
        try:
            with open(path, "rb") as src, open(raw, "wb") as dst:
                zstandard.ZstdDecompressor().copy_stream(src, dst)
        except zstandard.ZstdError as exc:
            raise BackupError(f"{path} is damaged: {exc}") from None
        status = snapshot_status(raw)
        tool, env = _etcd_tool()
        _run([*tool, "snapshot", "restore", str(raw), f"--name={name}", f"--data-dir={data_dir}",
              f"--initial-cluster={initial_cluster}", f"--initial-cluster-token={token}",
              f"--initial-advertise-peer-urls={peer_url}"], env, "snapshot restore")
        os.chmod(data_dir, 0o700)
        return status
    finally:
        shutil.rmtree(work, ignore_errors=True)
