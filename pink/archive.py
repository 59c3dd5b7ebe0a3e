"""The task archive in MariaDB: one row per finished task, its logs and history.

The finalize job writes a task's row once, keyed by the task id and its
attempt (`write` does nothing when that attempt is already archived), and
only then removes the task from etcd: a crash between the two leaves a task
that the next finalize removes without archiving it again. Everything that
shows past tasks reads here: the API (one task, paged history, usage), logs,
downloads, and the leader's retention sweep.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator

import pymysql

from pink import db
from pink.errors import BadRequest, PinkError, Unavailable
from pink.tasks import Task

log = logging.getLogger("pink.archive")
LOG_PIECE = 1 << 20  # bytes of log per row: pymysql sends bytes as hex, so a statement holds twice this
STATEMENT_SLACK = 4096  # bytes of a piece's INSERT besides its hex
PACKET_TOO_LARGE = (1153, 1301)  # ER_NET_PACKET_TOO_LARGE, ER_WARN_ALLOWED_PACKET_OVERFLOWED
_schema_ready: set[tuple] = set()  # databases this process has brought up to date


def _ensure_schema(conn, db_config) -> None:
    key = (db_config.host, db_config.port, db_config.database)
    if key not in _schema_ready:
        db.init_schema(conn)
        _schema_ready.add(key)


def _one(conn, sql: str, args: tuple) -> dict | None:
    """One row (or None), ending the read's transaction so the next read sees new commits."""
    with conn.cursor() as cur:
        cur.execute(sql, args)
        row = cur.fetchone()
    conn.commit()
    return row


def archived_attempt(conn, task_id: str) -> int | None:
    """The attempt archived for this task, or None if it has no row yet."""
    row = _one(conn, "SELECT attempt FROM tasks WHERE id=%s", (task_id,))
    return row["attempt"] if row else None


def archive_task(conn, task: Task, logs: bytes, expires_at: float | None = None,
                 deleted: bool = False) -> bool:
    """Insert the task's row, logs and events in one transaction.

    Returns False, writing nothing, when the row exists already: the same
    attempt finalized twice (or a finalize that crashed before removing the
    task from etcd) must not rewrite what users may have seen or deleted.
    """
    t = task.timings
    output = task.output or {}
    now = time.time()
    row = (task.id, task.user, task.name, task.state.value, task.attempt, task.node, task.exit_code, task.error,
           task.image["sha256"], task.image["size"], output.get("size"), json.dumps(task.gpus), len(task.gpus),
           t.get("submitted", task.created_at), t.get("running"), t.get("exited", t.get("exported")), t.get(task.state.value),
           output.get("host"), output.get("path"), _peer(output), expires_at,
           task.logs_truncated, now if deleted else None, now if deleted else None, json.dumps(task.to_json()))
    try:
        return _insert(conn, task, logs, row, deleted)
    except pymysql.err.IntegrityError:  # another finalize inserted it first
        conn.rollback()
        return False


def _insert(conn, task: Task, logs: bytes, row: tuple, deleted: bool) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT attempt FROM tasks WHERE id=%s FOR UPDATE", (task.id,))
        if cur.fetchone():
            conn.rollback()
            return False
        cur.execute(
            "INSERT INTO tasks (id, user_name, name, state, attempt, node, exit_code, error, "
            "image_sha256, image_size, output_size, gpus, gpu_count, submitted_at, started_at, "
            "ended_at, finished_at, output_host, output_path, output_peer, expires_at, logs_truncated, "
            "deleted_at, expired_at, record) "
            "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", row)
        if not deleted:
            _write_log(cur, task.id, logs)
        cur.executemany("INSERT INTO task_events (task_id, at, state, detail) VALUES (%s,%s,%s,%s)",
                        [(task.id, at, state, detail) for at, state, detail in task.history])
    conn.commit()
    return True


def _peer(output: dict) -> str | None:
    """The output's second holder, if it has one."""
    copies = output.get("copies") or []
    return copies[1] if len(copies) > 1 else None


def _write_log(cur, task_id: str, logs: bytes) -> None:
    """The log as rows of at most one piece each, sized to the server's
    max_allowed_packet: a log of the shipped cap (8 MiB, 16 MiB as hex) in one
    INSERT is refused by a server of MariaDB's default 16 MiB."""
    cur.execute("SELECT @@max_allowed_packet AS packet")
    piece = max(1024, min(LOG_PIECE, (int(cur.fetchone()["packet"]) - STATEMENT_SLACK) // 2))
    for seq, start in enumerate(range(0, max(len(logs), 1), piece)):
        cur.execute("INSERT INTO task_logs (task_id, seq, logs) VALUES (%s,%s,%s)",
                    (task_id, seq, logs[start:start + piece]))


@contextlib.contextmanager
def connection(db_config) -> Iterator:
    """A connection with the schema up to date; database failures become
    Unavailable, but a statement over max_allowed_packet (refused whenever
    it is sent) a PinkError, which a finalize gives up on.

    Jobs use this rather than retrying: the leader backs a failing finalize
    off, so a database outage fails a job at once instead of holding a worker.
    """
    conn = db.connect(db_config)
    try:
        _ensure_schema(conn, db_config)
        yield conn
    except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
        if exc.args and exc.args[0] in PACKET_TOO_LARGE:  # the same statement is refused every time
            raise PinkError(f"the database refused a statement: {exc.args[-1]}", code="archive_refused") from exc
        raise Unavailable(f"the database failed: {exc.args[-1] if exc.args else exc}") from exc
    finally:
        conn.close()


def _with_columns(row: dict) -> Task:
    """The archived record, with what changed after archiving (expiry)."""
    task = Task.from_json(json.loads(row["record"]))
    task.expires_at = row.get("expires_at")
    task.expired_at = row.get("expired_at")
    return task


def _readable(rows: list[dict]) -> list[Task]:
    """The rows' records; one that no longer reads as a task (edited by hand) is
    left out with a warning rather than failing the whole page."""
    out = []
    for row in rows:
        try:
            out.append(_with_columns(row))
        except Exception as exc:  # noqa: BLE001 - any malformed record
            log.warning("archived record %s is malformed (%s: %s); left out", row.get("id"),
                        type(exc).__name__, exc)
    return out


def get_record(conn, task_id: str) -> Task | None:
    row = _one(conn, "SELECT record, expires_at, expired_at FROM tasks WHERE id=%s AND deleted_at IS NULL",
               (task_id,))
    return _with_columns(row) if row else None


def by_sweep(conn, sweep_id: str, limit: int = 10000) -> list[Task]:
    """A sweep's archived indexes, through the `by_sweep` index (never a scan of the history)."""
    with conn.cursor() as cur:
        cur.execute("SELECT id, record, expires_at, expired_at FROM tasks WHERE sweep_id=%s AND deleted_at IS NULL "
                    "LIMIT %s", (sweep_id, limit))
        rows = cur.fetchall()
    conn.commit()
    return _readable(rows)


def get_logs(conn, task_id: str) -> bytes | None:
    """The archived log, its pieces joined in order; None when it has none (deleted, expired)."""
    with conn.cursor() as cur:
        cur.execute("SELECT logs FROM task_logs WHERE task_id=%s ORDER BY seq", (task_id,))
        rows = cur.fetchall()
    conn.commit()
    return b"".join(r["logs"] for r in rows) if rows else None


def mark_deleted(conn, task_id: str, at: float | None = None) -> bool:
    """Hide the row; its output and logs go now (the output file with the
    next sweep). False when there is no such row or it was deleted already."""
    at = time.time() if at is None else at
    with conn.cursor() as cur:
        hidden = cur.execute("UPDATE tasks SET deleted_at=%s, expired_at=COALESCE(expired_at, %s) "
                             "WHERE id=%s AND deleted_at IS NULL", (at, at, task_id))
        cur.execute("DELETE FROM task_logs WHERE task_id=%s", (task_id,))
    conn.commit()
    return bool(hidden)


# -- history -------------------------------------------------------------------

MAX_PAGE = 500  # rows one page of history may hold
DEFAULT_PAGE = 50


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: history is ordered by (submitted, id), newest first."""

    submitted: float
    task_id: str

    def encode(self) -> str:
        raw = json.dumps([self.submitted, self.task_id]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> "Cursor":
        try:
            submitted, task_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            if not math.isfinite(float(submitted)):
                raise ValueError(submitted)
            return cls(float(submitted), str(task_id))
        except (ValueError, TypeError):
            raise BadRequest("cursor is not one this server gave out; start again without it",
                             code="bad_param") from None

    def after(self, task: Task) -> bool:
        """Does `task` come after this cursor (older, or the same time and a lower id)?"""
        return (task.created_at, task.id) < (self.submitted, self.task_id)


@dataclass(frozen=True)
class Query:
    """A filter over history; `user` None means every user (admins)."""

    user: str | None = None
    state: str | None = None
    name: str | None = None  # substring
    since: float | None = None  # submitted at or after
    until: float | None = None  # submitted before
    limit: int = DEFAULT_PAGE
    cursor: Cursor | None = None

    def matches(self, task: Task) -> bool:
        """The same filter, applied to a live task."""
        return ((self.user is None or task.user == self.user)
                and (self.state is None or task.state == self.state)
                and (not self.name or self.name.lower() in task.name.lower())
                and (self.since is None or task.created_at >= self.since)
                and (self.until is None or task.created_at < self.until)
                and (self.cursor is None or self.cursor.after(task)))


def page(conn, query: Query) -> list[Task]:
    """Up to limit + 1 archived tasks matching `query`, newest first."""
    sql, args = page_statement(query)
    with conn.cursor() as cur:
        cur.execute(sql, args)
        rows = cur.fetchall()
    conn.commit()
    return _readable(rows)


def page_statement(query: Query) -> tuple[str, list]:
    """The SELECT for one page, and its arguments.

    The ORDER BY matches the (user_name | state, submitted_at, id) indexes, so
    the first page costs the same however long the history is.
    """
    where, args = ["deleted_at IS NULL"], []
    for column, value in (("user_name", query.user), ("state", query.state)):
        if value is not None:
            where.append(f"{column}=%s")
            args.append(value)
    if query.name:
        where.append("name LIKE %s")
        args.append("%" + query.name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
    if query.since is not None:
        where.append("submitted_at >= %s")
        args.append(query.since)
    if query.until is not None:
        where.append("submitted_at < %s")
        args.append(query.until)
    if query.cursor is not None:
        where.append("(submitted_at < %s OR (submitted_at = %s AND id < %s))")
        args += [query.cursor.submitted, query.cursor.submitted, query.cursor.task_id]
    sql = (f"SELECT record, expires_at, expired_at FROM tasks WHERE {' AND '.join(where)} "
           "ORDER BY submitted_at DESC, id DESC LIMIT %s")
    return sql, [*args, query.limit + 1]


def usage(conn, since: float | None, until: float | None, user: str | None) -> list[dict]:
    """Per user, tasks that finished in [since, until): counts, GPU-hours, wall-hours.

    Wall time is the time a task's container ran (running to exited; to
    exported for tasks archived before runners stamped `exited`, whose GPUs
    were held through the export, and for tasks that never ran); a task's
    GPU-hours are that time multiplied by its GPUs. Of the tasks whose GPU use
    was measured (`pink.gpu_usage`), `gpu_hours_used` weighs their GPU-hours by
    their mean utilisation and `gpu_hours_idle` counts their idle minutes on
    all their GPUs, both out of `gpu_hours_measured` (those tasks' GPU-hours:
    unmeasured tasks' hours are in neither, so used + idle never read against
    all `gpu_hours`); all three are None ("not measured") for a user with no such task.
    """
    where, args = ["1=1"], []
    if since is not None:
        where.append("finished_at >= %s")
        args.append(since)
    if until is not None:
        where.append("finished_at < %s")
        args.append(until)
    if user is not None:
        where.append("user_name = %s")
        args.append(user)
    run = "GREATEST(COALESCE(ended_at - started_at, 0), 0)"
    sql = ("SELECT user_name AS user, COUNT(*) AS tasks, "
           "SUM(state='succeeded') AS succeeded, SUM(state='failed') AS failed, "
           "SUM(state='timed_out') AS timed_out, SUM(state='cancelled') AS cancelled, "
           f"SUM(gpu_count * {run}) / 3600 AS gpu_hours, SUM({run}) / 3600 AS wall_hours, "
           f"SUM(gpu_count * {run} * gpu_mean_percent / 100) / 3600 AS gpu_hours_used, "
           f"SUM(gpu_count * LEAST(gpu_idle_minutes * 60, {run})) / 3600 AS gpu_hours_idle, "
           f"SUM(IF(gpu_mean_percent IS NULL, NULL, gpu_count * {run})) / 3600 AS gpu_hours_measured, "
           "COUNT(gpu_mean_percent) AS measured_tasks "
           f"FROM tasks WHERE {' AND '.join(where)} GROUP BY user_name ORDER BY gpu_hours DESC, user_name")
    with conn.cursor() as cur:
        cur.execute(sql, args)
        rows = cur.fetchall()
    conn.commit()
    return [{"user": r["user"], "tasks": int(r["tasks"]), "succeeded": int(r["succeeded"] or 0),
             "failed": int(r["failed"] or 0), "timed_out": int(r["timed_out"] or 0),
             "cancelled": int(r["cancelled"] or 0), "gpu_hours": round(float(r["gpu_hours"] or 0), 4),
             "wall_hours": round(float(r["wall_hours"] or 0), 4), "measured_tasks": int(r["measured_tasks"] or 0),
             "gpu_hours_used": _hours(r["gpu_hours_used"]), "gpu_hours_idle": _hours(r["gpu_hours_idle"]),
             "gpu_hours_measured": _hours(r["gpu_hours_measured"])}
            for r in rows]


def _hours(value) -> float | None:
    """A sum of hours as shown; None stays None (nothing measured), never 0."""
    return None if value is None else round(float(value), 4)


# -- retention -------------------------------------------------------------------

def expire(conn, now: float, max_bytes_per_user: int, output_days: float = 0, batch: int = 1000) -> int:
    """Mark outputs (and drop logs) past their expiry, or over a user's byte cap
    (oldest first). Returns how many rows expired; each web host's sweep job
    then deletes its files. Rows archived before expiry was recorded get
    one from `output_days`."""
    with conn.cursor() as cur:
        if output_days:
            cur.execute("UPDATE tasks SET expires_at = COALESCE(finished_at, %s) + %s "
                        "WHERE expired_at IS NULL AND expires_at IS NULL LIMIT %s",
                        (now, output_days * 86400, batch))
        cur.execute("SELECT id FROM tasks WHERE expired_at IS NULL AND expires_at < %s LIMIT %s",
                    (now, batch))
        ids = [r["id"] for r in cur.fetchall()]
        if max_bytes_per_user:
            ids += _over_quota(cur, max_bytes_per_user, batch)
        if ids:
            marks = ",".join(["%s"] * len(ids))
            cur.execute(f"UPDATE tasks SET expired_at=%s WHERE id IN ({marks}) AND expired_at IS NULL",
                        (now, *ids))
            cur.execute(f"DELETE FROM task_logs WHERE task_id IN ({marks})", ids)
    conn.commit()
    return len(set(ids))


def _over_quota(cur, cap: int, batch: int) -> list[str]:
    """The oldest outputs of each user whose stored outputs exceed `cap` bytes.

    The sum reads the index `by_user_outputs` over unexpired rows only: its
    cost follows the outputs kept (bounded by `output_days`), not the history."""
    cur.execute("SELECT user_name, SUM(output_size) AS held FROM tasks "
                "WHERE expired_at IS NULL AND output_size IS NOT NULL "
                "GROUP BY user_name HAVING held > %s", (cap,))
    ids = []
    for over in cur.fetchall():
        excess = int(over["held"]) - cap
        cur.execute("SELECT id, output_size FROM tasks WHERE user_name=%s AND expired_at IS NULL "
                    "AND output_size IS NOT NULL ORDER BY finished_at LIMIT %s", (over["user_name"], batch))
        for row in cur.fetchall():
            if excess <= 0:
                break
            ids.append(row["id"])
            excess -= row["output_size"]
    return ids


def expired_files(conn, host: str, batch: int = 1000) -> list[tuple[str, str]]:
    """(task id, path) of expired or deleted outputs still stored on `host`."""
    with conn.cursor() as cur:
        cur.execute("SELECT id, output_path FROM tasks WHERE output_host=%s AND output_path IS NOT NULL "
                    "AND expired_at IS NOT NULL LIMIT %s", (host, batch))
        rows = cur.fetchall()
    conn.commit()
    return [(r["id"], r["output_path"]) for r in rows]


def forget_file(conn, task_id: str) -> None:
    """The output file is gone from its host: no sweep needs to look at the row again."""
    with conn.cursor() as cur:
        cur.execute("UPDATE tasks SET output_path=NULL WHERE id=%s", (task_id,))
    conn.commit()


SINGLE_COPIES = ("SELECT id, record, expires_at, expired_at FROM tasks WHERE output_host=%s "
                 "AND output_peer IS NULL AND expired_at IS NULL AND id > %s AND output_path IS NOT NULL "
                 "ORDER BY id LIMIT %s")


@dataclass
class CopyPage:
    """One page of single-copy outputs, and the id the next page starts after
    ("" once the last page is read: the next pass starts over)."""

    tasks: list[Task]
    after: str


def single_copies(conn, host: str, after: str, batch: int) -> CopyPage:
    """Kept outputs whose only copy is on `host` (finalized while no other web
    node was up), with ids after `after`; read by the `by_single_copy` index
    (which ends in the primary key, so the id order costs no sort)."""
    with conn.cursor() as cur:
        cur.execute(SINGLE_COPIES, (host, after, batch))
        rows = cur.fetchall()
    conn.commit()
    return CopyPage(_readable(rows), rows[-1]["id"] if len(rows) == batch else "")


def record_copy(conn, task_id: str, peer: str) -> None:
    """`peer` now holds a copy of the task's output too: in its column and in the record downloads read."""
    with conn.cursor() as cur:
        cur.execute("UPDATE tasks SET output_peer=%s, "
                    "record=JSON_SET(record, '$.output.copies', JSON_ARRAY(output_host, %s)) "
                    "WHERE id=%s AND output_peer IS NULL", (peer, peer, task_id))
    conn.commit()


def has_row(conn, task_id: str) -> bool:
    """Does the archive hold the task at all (deleted and expired rows too)?"""
    return _one(conn, "SELECT 1 AS one FROM tasks WHERE id=%s", (task_id,)) is not None


def is_empty(conn) -> bool:
    """Does the archive hold no task at all (a new or a lost database)?"""
    return _one(conn, "SELECT 1 AS one FROM tasks LIMIT 1", ()) is None


def stored_output(conn, task_id: str) -> str | None:
    """The path of the task's output while it is kept (not expired, not deleted)."""
    row = _one(conn, "SELECT output_path FROM tasks WHERE id=%s AND expired_at IS NULL", (task_id,))
    return row["output_path"] if row else None
