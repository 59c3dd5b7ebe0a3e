"""The task archive in MariaDB: one row per finished task, its logs and history.

Written by the finalize job before the task's final state is committed to
etcd, in one database transaction, and idempotent (a finalize that runs
twice rewrites the same row), so a task is never reported finished without
its archive. Read by the web API for tasks no longer in etcd.
"""

from __future__ import annotations

import json
import time

import pymysql

from pink import db
from pink.errors import Unavailable


def archive_task(conn, record: dict, logs: bytes) -> None:
    """Insert or replace the task's row, logs and events, then commit."""
    t = record.get("timings") or {}
    output = record.get("output") or {}
    row = (record["id"], record["user"], record["name"], record["state"], record["attempt"],
           record.get("node"), record.get("exit_code"), record.get("error"),
           record["image"]["sha256"], record["image"]["size"], output.get("size"),
           json.dumps(record.get("gpus") or []), t.get("submitted"), t.get("running"),
           t.get("exported"), t.get(record["state"]), json.dumps(record))
    with conn.cursor() as cur:
        cur.execute(
            "REPLACE INTO tasks (id, user_name, name, state, attempt, node, exit_code, error, "
            "image_sha256, image_size, output_size, gpus, submitted_at, started_at, ended_at, "
            "finished_at, record) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", row)
        cur.execute("REPLACE INTO task_logs (task_id, logs) VALUES (%s,%s)", (record["id"], logs))
        cur.execute("DELETE FROM task_events WHERE task_id=%s", (record["id"],))
        cur.executemany("INSERT INTO task_events (task_id, at, state, detail) VALUES (%s,%s,%s,%s)",
                        [(record["id"], at, state, detail) for at, state, detail in record["history"]])
    conn.commit()


def write(db_config, record: dict, logs: bytes, retries: int = 3) -> None:
    """Archive with a fresh connection, retrying while the database is down."""
    for attempt in range(retries + 1):
        try:
            conn = db.connect(db_config)
            try:
                db.init_schema(conn)
                archive_task(conn, record, logs)
                return
            finally:
                conn.close()
        except (Unavailable, pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
            if attempt == retries:
                raise Unavailable(f"could not archive task {record['id']}: {exc}") from exc
            time.sleep(min(2 ** attempt, 10))


def get_record(conn, task_id: str) -> dict | None:
    with conn.cursor() as cur:
        cur.execute("SELECT record FROM tasks WHERE id=%s AND deleted_at IS NULL", (task_id,))
        row = cur.fetchone()
    conn.commit()
    return json.loads(row["record"]) if row else None


def get_logs(conn, task_id: str) -> bytes | None:
    with conn.cursor() as cur:
        cur.execute("SELECT logs FROM task_logs WHERE task_id=%s", (task_id,))
        row = cur.fetchone()
    conn.commit()
    return row["logs"] if row else None


def mark_deleted(conn, task_id: str) -> None:
    with conn.cursor() as cur:
        cur.execute("UPDATE tasks SET deleted_at=%s WHERE id=%s", (time.time(), task_id))
    conn.commit()
