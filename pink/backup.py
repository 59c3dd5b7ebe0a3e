"""Backups of PINK's state, their restore, and the tasks finalized after a dump.

What holds what (docs/architecture.md): MariaDB is the archive (users,
tokens, every finished task's row, log and events); etcd holds the live
tasks, runners and reservations; web nodes hold the outputs on disk. This
module is the one implementation that the `backup` role's systemd timers
and the playbooks `ansible/backup.yml` and `ansible/restore.yml` run
(`pink-backup COMMAND`, or `python -m pink.backup COMMAND`):

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

The journal: a dump is hours old when it is needed, and tasks finalized
since then have their row, log and events in no dump. Their outputs are on
the web nodes, but a row is what makes an output a task (the sweep deletes
outputs no row names). So finalize writes, just before it inserts the row,
the same final record, its log and expiry to `<output_dir>/.journal/<day>/
<task>-<attempt>.rec.zst` on the web node that finalizes (the node that holds
the output's first copy); each sweep drops the days older than JOURNAL_DAYS.
`recover`, run on every web node after a dump is loaded and before PINK's
units start again, inserts the row of every journaled task that has none
(unless etcd holds the task at a later attempt), through the very insert
finalize uses; an entry whose output is no longer on this node (expired,
deleted or lost after the dump) comes back expired. A task deleted after
it was archived leaves a tombstone in the journal of the node that took the
delete; `redelete`, run on every web node once every `recover` is done,
deletes it again. What it cannot bring back it says, never silently: a dump
older than the journal reaches, users and tokens made after the dump (see
roles/backup/README.md).
"""

from __future__ import annotations

import argparse
import calendar
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import zstandard

from pink.errors import PinkError

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

JOURNAL = ".journal"  # in a web node's output_dir: what finalize archived, by day
JOURNAL_DAYS = 14  # days of finalized tasks a web node's journal keeps (= backup_keep_days' default)
JOURNAL_SUFFIX = ".rec.zst"
JOURNAL_NAME = re.compile(r"^([0-9A-Za-z_-]+)-(\d+)" + re.escape(JOURNAL_SUFFIX) + "$")
DELETION_SUFFIX = ".deleted"  # a tombstone: the task was deleted after it was archived
DELETION_NAME = re.compile(r"^([0-9A-Za-z_-]+)" + re.escape(DELETION_SUFFIX) + "$")
DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
PRUNED_MARK = "pruned-before"  # in the journal: the first day still kept after a prune
LIVE_BATCH = 128  # task ids checked against the archive, and etcd, per read


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


# -- the journal of finalized tasks --------------------------------------------------

def journal_dir(output_dir: str) -> str:
    return os.path.join(output_dir, JOURNAL)


def _day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def journal(output_dir: str, task, logs: bytes, expires_at: float | None, deleted: bool,
            now: float | None = None) -> str:
    """Record a task finalize is about to archive (its final record, log and
    expiry), so that a restore from an older dump can insert its row again.

    Written before the row (a crash in between leaves an entry for a task
    still live in etcd, which `recover` skips) and synced; an attempt written
    again replaces its entry. Best effort: when the disk refuses it, the
    finalize goes on without it (logged; "" returned), since a task must never
    wait for its safety net. Only the tasks archived then are missing from a
    later `recover`.
    """
    now = time.time() if now is None else now
    root = journal_dir(output_dir)
    day = os.path.join(root, _day(now))
    name = f"{task.id}-{task.attempt}{JOURNAL_SUFFIX}"
    if deleted:
        logs = b""  # a deleted task's log is gone from the archive: not kept here either
    header = {"v": 1, "journaled_at": now, "expires_at": expires_at, "deleted": bool(deleted),
              "log_bytes": len(logs), "record": task.to_json()}
    body = json.dumps(header, separators=(",", ":")).encode() + b"\n" + logs
    part = os.path.join(day, f".{name}.{uuid.uuid4().hex[:8]}.part")
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)  # logs are their users' alone
        os.makedirs(day, mode=0o700, exist_ok=True)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(body))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, os.path.join(day, name))
    except OSError as exc:
        try:
            os.unlink(part)
        except OSError:
            pass
        log.warning("task %s: the finalize journal in %s refused its entry (%s): archived without it",
                    task.id, day, exc)
        return ""
    return os.path.join(day, name)


def read_entry(path: str) -> tuple[dict, bytes]:
    """(header, log) of a journal entry."""
    with open(path, "rb") as fh:
        data = zstandard.ZstdDecompressor().decompress(fh.read())
    line, _, logs = data.partition(b"\n")
    header = json.loads(line)
    if header.get("v") != 1 or len(logs) != header.get("log_bytes"):
        raise ValueError("not a complete journal entry of version 1")
    return header, logs


def journal_deletion(output_dir: str, task, now: float | None = None) -> str:
    """Record that an archived task was deleted, so that a restore from an
    older dump deletes it again (`redelete`): the user's wish outlives the
    dump. The task's own entry, when this host holds it, is rewritten as
    deleted without its log: its row still comes back (usage counts it),
    its log never. Written on the web node that took the delete,
    which need not be the one that finalized the task; every node's
    tombstones are applied after every node's rows are back. Best effort,
    like `journal`: "" when the disk refuses it."""
    now = time.time() if now is None else now
    root = journal_dir(output_dir)
    try:
        days = [d for d in os.listdir(root) if DAY.match(d)]
    except FileNotFoundError:
        days = []
    for day in days:
        _forget_log(os.path.join(root, day, f"{task.id}-{task.attempt}{JOURNAL_SUFFIX}"))
    day = os.path.join(root, _day(now))
    path = os.path.join(day, f"{task.id}{DELETION_SUFFIX}")
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        os.makedirs(day, mode=0o700, exist_ok=True)
        with open(path + ".part", "w") as fh:
            json.dump({"v": 1, "deleted_at": now}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(path + ".part", path)
    except OSError as exc:
        log.warning("task %s: the journal in %s refused its deletion (%s): a restore from an older "
                    "dump brings it back", task.id, day, exc)
        return ""
    return path


def _forget_log(path: str) -> None:
    """Rewrite a journal entry, if there is one, as a deleted task's: no log."""
    try:
        header, _ = read_entry(path)
    except FileNotFoundError:
        return
    except (OSError, ValueError, zstandard.ZstdError):
        os.unlink(path)  # unreadable: recover would skip it anyway, and it may hold a log
        return
    header.update(deleted=True, log_bytes=0)
    part = f"{path}.{uuid.uuid4().hex[:8]}.part"
    with open(part, "wb") as fh:
        fh.write(zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(
            json.dumps(header, separators=(",", ":")).encode() + b"\n"))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)


def prune_journal(output_dir: str, now: float | None = None, days: int = JOURNAL_DAYS) -> int:
    """Drop the journal's days older than `days` (one listing of at most a
    few dozen day directories: the sweep calls it every pass). Returns how
    many days went."""
    root = journal_dir(output_dir)
    now = time.time() if now is None else now
    first_kept = _day(now - days * 86400)
    try:
        old = sorted(e.name for e in os.scandir(root) if DAY.match(e.name) and e.name < first_kept)
    except FileNotFoundError:
        return 0
    for name in old:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if old:
        mark = os.path.join(root, PRUNED_MARK)
        with open(mark + ".part", "w") as fh:
            fh.write(first_kept + "\n")
        os.replace(mark + ".part", mark)
    return len(old)


def _journal_days(root: str, since: float | None) -> list[str]:
    """The journal's day directories, oldest first (from the day before
    `since` on, when given: a dump's time is not exactly a day's start)."""
    first = _day(since - 86400) if since is not None else ""
    try:
        return sorted(os.path.join(root, e.name) for e in os.scandir(root)
                      if e.is_dir() and DAY.match(e.name) and e.name >= first)
    except FileNotFoundError:
        return []


def _entries(root: str, since: float | None) -> dict[str, tuple[int, str]]:
    """The newest attempt's entry of each journaled task, by task id."""
    chosen: dict[str, tuple[int, str]] = {}
    for day in _journal_days(root, since):
        for entry in os.scandir(day):
            m = JOURNAL_NAME.match(entry.name)
            if m:
                task_id, attempt = m.group(1), int(m.group(2))
                if attempt >= chosen.get(task_id, (0, ""))[0]:
                    chosen[task_id] = (attempt, entry.path)
    return chosen


def _deletions(root: str, since: float | None) -> dict[str, str]:
    """The tombstone of each task deleted after it was archived, by task id."""
    return {m.group(1): entry.path for day in _journal_days(root, since)
            for entry in os.scandir(day) if (m := DELETION_NAME.match(entry.name))}


def recover(config, since: float | None = None, now: float | None = None) -> dict:
    """Insert the archive row of every task in this web node's journal that
    has none. Run after a dump is loaded, before PINK's units start (the
    sweep deletes outputs no row names). `since`: the dump's time; the
    journal is read from the day before it on, and a dump older than the
    journal reaches is reported. Returns what it did and what it could not.

    A task etcd holds at a later attempt than the entry's is left alone: it
    was run again after that finalize failed, and its own finalize archives
    it. At the entry's attempt (a finalize that wrote the entry and had not
    yet removed the task, or etcd restored from a snapshot older than the
    finalize) the row goes in, and the finalize that follows finds it and
    removes the task from etcd without archiving it again.
    """
    from pink import archive, outputs
    from pink.store import Store
    from pink.tasks import Task

    now = time.time() if now is None else now
    output_dir = config.web.output_dir
    if not output_dir:
        raise BackupError("this config has no [web] output_dir: run recover on the web nodes")
    root = journal_dir(output_dir)
    report = {"host": config.host, "journal": root, "recovered": [], "expired": [], "present": 0,
              "live": 0, "unreadable": [], "missing_users": [], "not_journaled": None}
    try:
        with open(os.path.join(root, PRUNED_MARK)) as fh:
            first_kept = fh.read().strip()
    except FileNotFoundError:
        first_kept = ""
    if since is not None and first_kept and _day(since) < first_kept:
        report["not_journaled"] = (f"tasks this node finalized between {stamp(since)} (the dump) and "
                                   f"{first_kept} (the journal's first day) are in neither: their rows "
                                   "are lost, their outputs will be swept")
    chosen = _entries(root, since)
    store = Store.from_config(config)
    try:
        with archive.connection(config.db) as conn:
            missing = _without_rows(conn, sorted(chosen))
            report["present"] = len(chosen) - len(missing)
            live: dict[str, int] = {}  # task id -> the attempt etcd holds
            for start in range(0, len(missing), LIVE_BATCH):
                keys = [store.keys.task(t) for t in missing[start:start + LIVE_BATCH]]
                live.update((rec.value.id, rec.value.attempt) for rec in store.get_many(keys))
            users = set()
            for task_id in missing:
                if live.get(task_id, 0) > chosen[task_id][0]:
                    report["live"] += 1  # run again after this entry was written: its finalize archives it
                    continue
                path = chosen[task_id][1]
                try:
                    header, logs = read_entry(path)
                    task = Task.from_json(header["record"])
                except (OSError, ValueError, KeyError, zstandard.ZstdError) as exc:
                    report["unreadable"].append(f"{path}: {exc}")
                    continue
                output = task.output or {}
                gone = bool(output.get("stored")) and not os.path.exists(
                    outputs.local_path(output_dir, task))
                if not archive.archive_task(conn, task, logs, expires_at=header.get("expires_at"),
                                            deleted=header.get("deleted", False)):
                    report["present"] += 1  # another node's recover was first
                    continue
                if gone:
                    _mark_expired(conn, task_id, now)
                    report["expired"].append(task_id)
                report["recovered"].append(task_id)
                users.add(task.user)
            report["missing_users"] = _missing_users(conn, users)
    finally:
        store.close()
    return report


def _without_rows(conn, task_ids: list[str]) -> list[str]:
    """Those of `task_ids` the archive has no row for (by primary key, LIVE_BATCH at a time)."""
    found: set[str] = set()
    with conn.cursor() as cur:
        for start in range(0, len(task_ids), LIVE_BATCH):
            batch = task_ids[start:start + LIVE_BATCH]
            cur.execute(f"SELECT id FROM tasks WHERE id IN ({','.join(['%s'] * len(batch))})", batch)
            found |= {row["id"] for row in cur.fetchall()}
    conn.commit()
    return [t for t in task_ids if t not in found]


def _mark_expired(conn, task_id: str, now: float) -> None:
    """The output went after the dump (expired, deleted, or lost with the
    disk): the row says so, as the retention sweep would have."""
    with conn.cursor() as cur:
        cur.execute("UPDATE tasks SET expired_at=%s WHERE id=%s AND expired_at IS NULL", (now, task_id))
        cur.execute("DELETE FROM task_logs WHERE task_id=%s", (task_id,))
    conn.commit()


def redelete(config, since: float | None = None) -> dict:
    """Delete again, in a loaded dump, the tasks this web node deleted after
    it (its tombstones). Run on every web node once every node's `recover`
    is done, so that a row one node re-creates is deleted by another node's
    tombstone. Deleting twice changes nothing."""
    from pink import archive

    output_dir = config.web.output_dir
    if not output_dir:
        raise BackupError("this config has no [web] output_dir: run redelete on the web nodes")
    report = {"host": config.host, "deleted": [], "unreadable": []}
    tombstones = _deletions(journal_dir(output_dir), since)
    with archive.connection(config.db) as conn:
        for task_id, path in sorted(tombstones.items()):
            try:
                with open(path) as fh:
                    at = float(json.load(fh)["deleted_at"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                report["unreadable"].append(f"{path}: {exc}")
                continue
            if archive.mark_deleted(conn, task_id, at):
                report["deleted"].append(task_id)
    return report


def _missing_users(conn, names: set[str]) -> list[str]:
    """Those of `names` with no account in the loaded dump (made after it)."""
    if not names:
        return []
    with conn.cursor() as cur:
        cur.execute(f"SELECT name FROM users WHERE name IN ({','.join(['%s'] * len(names))})",
                    sorted(names))
        found = {row["name"] for row in cur.fetchall()}
    conn.commit()
    return sorted(names - found)


# -- the command line ------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pink-backup", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("mariadb-dump", help="dump PINK's database into --dir")
    d.add_argument("--options-file", required=True, help="root-only [client] option file (user, socket)")
    d.add_argument("--database", default="pink")
    d.add_argument("--dir", required=True)
    d.add_argument("--keep-days", type=float, help="then remove dumps older than this (not the newest)")

    lo = sub.add_parser("mariadb-load", help="check a dump whole, then load it (replaces the database)")
    lo.add_argument("file")
    lo.add_argument("--options-file", required=True)

    s = sub.add_parser("etcd-snapshot", help="save and check a snapshot of one etcd member into --dir")
    s.add_argument("--endpoint", required=True, help="one member's client URL")
    s.add_argument("--cacert", default="")
    s.add_argument("--cert", default="")
    s.add_argument("--key", default="")
    s.add_argument("--dir", required=True)
    s.add_argument("--keep-days", type=float)

    r = sub.add_parser("etcd-restore", help="a snapshot into a new member data directory")
    r.add_argument("file")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--initial-cluster", required=True)
    r.add_argument("--initial-advertise-peer-urls", required=True)
    r.add_argument("--initial-cluster-token", required=True)

    v = sub.add_parser("verify", help="check a backup file (a dump read whole, a snapshot's status)")
    v.add_argument("file")

    for command, help_text in (("recover", "re-create archive rows from this web node's journal"),
                               ("redelete", "delete again the tasks this web node deleted after the dump")):
        rc = sub.add_parser(command, help=help_text)
        rc.add_argument("--config", default=None)
        rc.add_argument("--since", default=None, help="the dump's time (its file name, a stamp or seconds)")

    pr = sub.add_parser("prune", help="remove backups older than --keep-days (never the newest)")
    pr.add_argument("--dir", required=True)
    pr.add_argument("--kind", choices=sorted(KINDS), required=True)
    pr.add_argument("--keep-days", type=float, required=True)

    n = sub.add_parser("newest", help="print the newest backup of a kind")
    n.add_argument("--dir", required=True)
    n.add_argument("--kind", choices=sorted(KINDS), required=True)
    return p


def _verify(path: str) -> dict:
    if path.endswith(KINDS["mariadb"][1]):
        return {"file": path, "sql_bytes": verify_dump(path)}
    if path.endswith(KINDS["etcd"][1]):
        with tempfile.TemporaryDirectory() as work:
            raw = os.path.join(work, "snapshot.db")
            try:
                with open(path, "rb") as src, open(raw, "wb") as dst:
                    zstandard.ZstdDecompressor().copy_stream(src, dst)
            except zstandard.ZstdError as exc:
                raise BackupError(f"{path} is damaged: {exc}") from None
            return {"file": path, **snapshot_status(raw)}
    raise BackupError(f"{path} is no PINK backup (*{KINDS['mariadb'][1]}, *{KINDS['etcd'][1]})")


def run(args) -> dict:
    os.umask(0o077)
    if args.command == "mariadb-dump":
        path = dump_mariadb(args.options_file, args.database, args.dir)
        removed = prune(args.dir, "mariadb", args.keep_days) if args.keep_days else []
        return {"file": str(path), "bytes": path.stat().st_size, "pruned": [str(p) for p in removed]}
    if args.command == "mariadb-load":
        return {"loaded": args.file, "sql_bytes": load_mariadb(args.file, args.options_file)}
    if args.command == "etcd-snapshot":
        path, status = snapshot_etcd(args.endpoint, args.dir, args.cacert, args.cert, args.key)
        removed = prune(args.dir, "etcd", args.keep_days) if args.keep_days else []
        return {"file": str(path), "bytes": path.stat().st_size, "status": status,
                "pruned": [str(p) for p in removed]}
    if args.command == "etcd-restore":
        status = restore_etcd(args.file, args.data_dir, args.name, args.initial_cluster,
                              args.initial_advertise_peer_urls, args.initial_cluster_token)
        return {"restored": args.file, "data_dir": args.data_dir, "status": status}
    if args.command == "verify":
        return _verify(args.file)
    if args.command in ("recover", "redelete"):
        from pink import config as pink_config

        since = parse_stamp(args.since) if args.since else None
        return (recover if args.command == "recover" else redelete)(pink_config.load(args.config), since)
    if args.command == "prune":
        return {"pruned": [str(p) for p in prune(args.dir, args.kind, args.keep_days)]}
    if args.command == "newest":
        return {"file": str(newest(args.dir, args.kind))}
    raise BackupError(f"unknown command {args.command}")


def main(argv: list[str] | None = None) -> int:
    """Prints one JSON object: what was done. Exits 1 (the unit fails) when it was not."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        result = run(args)
    except (BackupError, PinkError) as exc:
        print(f"pink-backup {args.command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1 if args.command in ("recover", "redelete") else None))
    if args.command == "recover" and (result["not_journaled"] or result["unreadable"]
                                      or result["missing_users"]):
        for line in filter(None, [result["not_journaled"]] + result["unreadable"]):
            print(f"pink-backup recover: WARNING: {line}", file=sys.stderr)
        if result["missing_users"]:
            print("pink-backup recover: WARNING: recovered tasks of users the dump does not hold "
                  f"(made after it): {', '.join(result['missing_users'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
