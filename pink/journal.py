"""The journal of finalized tasks on a web node: what a dump is too old to hold.

A dump is hours old when it is needed, and tasks finalized
since then have their row, log and events in no dump. Their outputs are on
the web nodes, but a row is what makes an output a task (the sweep deletes
outputs no row names). So finalize writes, just before it inserts the row,
the same final record, its log and expiry to `<output_dir>/.journal/<day>/
<task>-<attempt>.rec.zst` on the web node that finalizes (the node that holds
the output's first copy); each sweep drops the days older than KEEP_DAYS.
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

import json
import logging
import os
import re
import shutil
import time
import uuid

import zstandard

from pink.backup import ZSTD_LEVEL, BackupError, stamp

log = logging.getLogger("pink.journal")

DIRNAME = ".journal"  # in a web node's output_dir: what finalize archived, by day
KEEP_DAYS = 14  # days of finalized tasks a web node's journal keeps (= backup_keep_days' default)
ENTRY_SUFFIX = ".rec.zst"
ENTRY_NAME = re.compile(r"^([0-9A-Za-z_-]+)-(\d+)" + re.escape(ENTRY_SUFFIX) + "$")
DELETION_SUFFIX = ".deleted"  # a tombstone: the task was deleted after it was archived
DELETION_NAME = re.compile(r"^([0-9A-Za-z_-]+)" + re.escape(DELETION_SUFFIX) + "$")
DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
PRUNED_MARK = "pruned-before"  # in the journal: the first day still kept after a prune
LIVE_BATCH = 128  # task ids checked against the archive, and etcd, per read


def directory(output_dir: str) -> str:
    return os.path.join(output_dir, DIRNAME)


def _day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def add(output_dir: str, task, logs: bytes, expires_at: float | None, deleted: bool,
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
    root = directory(output_dir)
    day = os.path.join(root, _day(now))
    name = f"{task.id}-{task.attempt}{ENTRY_SUFFIX}"
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


def add_deletion(output_dir: str, task, now: float | None = None) -> str:
    """Record that an archived task was deleted, so that a restore from an
    older dump deletes it again (`redelete`): the user's wish outlives the
    dump. The task's own entry, when this host holds it, is rewritten as
    deleted without its log: its row still comes back (usage counts it),
    its log never. Written on the web node that took the delete,
    which need not be the one that finalized the task; every node's
    tombstones are applied after every node's rows are back. Best effort,
    like `add`: "" when the disk refuses it."""
    now = time.time() if now is None else now
    root = directory(output_dir)
    try:
        days = [d for d in os.listdir(root) if DAY.match(d)]
    except FileNotFoundError:
        days = []
    for day in days:
        _forget_log(os.path.join(root, day, f"{task.id}-{task.attempt}{ENTRY_SUFFIX}"))
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


def prune(output_dir: str, now: float | None = None, days: int = KEEP_DAYS) -> int:
    """Drop the journal's days older than `days` (one listing of at most a
    few dozen day directories: the sweep calls it every pass). Returns how
    many days went."""
    root = directory(output_dir)
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
            m = ENTRY_NAME.match(entry.name)
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
    root = directory(output_dir)
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
    tombstones = _deletions(directory(output_dir), since)
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
