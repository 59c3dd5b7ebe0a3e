"""Notifications in MariaDB (schema version 5, `pink.db`): users' settings,
deliveries and each try of them.

The signing secret is stored as it is (an HMAC needs it): only its owner
reads it through the API, and the delivery jobs to sign. A delivery is one
row per (task, event, task attempt, channel), inserted once, so a job that
runs twice sends once; its tries are rows of `notification_attempts`
(deleted with it). Rows older than `[notifications] keep_days` are pruned.
A delivery's `target` is the whole URL: every retry sends to it again (a
path or query often carries the receiver's own token), so it is shown only
redacted (`Delivery.view`), never whole through the API or the pages.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from pink import notifications
from pink.notifications import DELIVERED, FAILED, PENDING, Settings
from pink.tasks import iso

MAX_SHOWN = 20  # deliveries of one task the API shows (newest first)


def settings(conn, user_name: str) -> Settings | None:
    with conn.cursor() as cur:
        cur.execute("SELECT s.webhook_url, s.email, s.on_running, s.secret FROM notification_settings s "
                    "JOIN users u ON u.id = s.user_id WHERE u.name=%s", (user_name,))
        row = cur.fetchone()
    conn.commit()
    if row is None:
        return None
    return Settings(webhook_url=row["webhook_url"], email=row["email"], on_running=bool(row["on_running"]),
                    secret=row["secret"])


def save(conn, user_id: int, wanted: Settings) -> Settings:
    """Store the user's settings; a user without a secret yet gets one."""
    secret = wanted.secret or notifications.new_secret()
    with conn.cursor() as cur:
        cur.execute("INSERT INTO notification_settings (user_id, webhook_url, email, on_running, secret, updated_at) "
                    "VALUES (%s,%s,%s,%s,%s,%s) ON DUPLICATE KEY UPDATE webhook_url=VALUES(webhook_url), "
                    "email=VALUES(email), on_running=VALUES(on_running), updated_at=VALUES(updated_at)",
                    (user_id, wanted.webhook_url, wanted.email, wanted.on_running, secret, time.time()))
    conn.commit()
    return Settings(wanted.webhook_url, wanted.email, wanted.on_running, _secret(conn, user_id))


def _secret(conn, user_id: int) -> str:
    with conn.cursor() as cur:
        cur.execute("SELECT secret FROM notification_settings WHERE user_id=%s", (user_id,))
        row = cur.fetchone()
    conn.commit()
    return row["secret"] if row else ""


def ensure_secret(conn, user_name: str) -> str:
    """The user's secret, made now if they have none (a task's own webhook
    submitted while the database was away)."""
    with conn.cursor() as cur:
        cur.execute("INSERT IGNORE INTO notification_settings (user_id, secret, updated_at) "
                    "SELECT id, %s, %s FROM users WHERE name=%s", (notifications.new_secret(), time.time(), user_name))
    conn.commit()
    found = settings(conn, user_name)
    return found.secret if found else ""


def rotate(conn, user_id: int) -> str:
    """A new secret for the user (settings kept); the old one stops signing at once."""
    secret = notifications.new_secret()
    with conn.cursor() as cur:
        cur.execute("INSERT INTO notification_settings (user_id, secret, updated_at) VALUES (%s,%s,%s) "
                    "ON DUPLICATE KEY UPDATE secret=VALUES(secret), updated_at=VALUES(updated_at)",
                    (user_id, secret, time.time()))
    conn.commit()
    return secret


def clear(conn, user_id: int) -> None:
    """Forget the user's settings and secret (a later webhook gets a new secret)."""
    with conn.cursor() as cur:
        cur.execute("DELETE FROM notification_settings WHERE user_id=%s", (user_id,))
    conn.commit()


@dataclass(frozen=True)
class Delivery:
    """One notification of one event on one channel, and how its tries went."""

    id: int
    delivery: str  # the X-Pink-Delivery id, the same on every try
    task_id: str
    user: str
    event: str
    channel: str
    target: str
    payload: dict
    state: str
    attempts: int
    last_error: str | None
    created_at: float

    def view(self) -> dict:
        """As the API and the task page show it: the target redacted to scheme and host."""
        return {"channel": self.channel, "event": self.event, "target": notifications.redact(self.target),
                "state": self.state, "attempts": self.attempts, "last_error": self.last_error,
                "created_at": iso(self.created_at)}


_COLUMNS = ("id, delivery, task_id, user_name, event, channel, target, payload, state, attempts, last_error, "
            "created_at")


def _delivery(row: dict) -> Delivery:
    return Delivery(id=row["id"], delivery=row["delivery"], task_id=row["task_id"], user=row["user_name"],
                    event=row["event"], channel=row["channel"], target=row["target"],
                    payload=json.loads(row["payload"]), state=row["state"], attempts=row["attempts"],
                    last_error=row["last_error"], created_at=row["created_at"])


def add(conn, payload: dict, channel: str, target: str) -> int | None:
    """A new pending delivery of `payload`; None when this event already has one on `channel`."""
    now = time.time()
    with conn.cursor() as cur:
        cur.execute("INSERT IGNORE INTO notifications (delivery, task_id, user_name, event, task_attempt, channel, "
                    "target, payload, state, attempts, created_at, updated_at) "
                    "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,0,%s,%s)",
                    (uuid.uuid4().hex, payload["task"], payload["user"], payload["event"], payload["attempt"],
                     channel, target, json.dumps(payload), PENDING, now, now))
        new = cur.lastrowid if cur.rowcount else None
    conn.commit()
    return new


def get(conn, notification_id: int) -> Delivery | None:
    with conn.cursor() as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM notifications WHERE id=%s", (notification_id,))
        row = cur.fetchone()
    conn.commit()
    return _delivery(row) if row else None


def record(conn, delivery: Delivery, attempt: int, status: int | None, error: str | None, state: str) -> bool:
    """Record try `attempt` and the delivery's new state; False when this try
    was recorded already (a job run twice), which then changes nothing."""
    now = time.time()
    with conn.cursor() as cur:
        cur.execute("INSERT IGNORE INTO notification_attempts (notification_id, attempt, at, status, error) "
                    "VALUES (%s,%s,%s,%s,%s)", (delivery.id, attempt, now, status, error))
        if not cur.rowcount:
            conn.commit()
            return False
        cur.execute("UPDATE notifications SET attempts=%s, state=%s, last_error=%s, updated_at=%s WHERE id=%s",
                    (attempt, state, error if state != DELIVERED else delivery.last_error, now, delivery.id))
    conn.commit()
    return True


def unsent(conn, payload: dict) -> list[tuple[str, int]]:
    """(channel, id) of the event's deliveries still pending without any try: those a
    fan-out recorded and then died before enqueueing (its rerun enqueues them)."""
    with conn.cursor() as cur:
        cur.execute("SELECT id, channel FROM notifications WHERE task_id=%s AND event=%s AND task_attempt=%s "
                    "AND state=%s AND attempts=0", (payload["task"], payload["event"], payload["attempt"], PENDING))
        rows = list(cur.fetchall())
    conn.commit()
    return [(row["channel"], row["id"]) for row in rows]


def give_up_expired(conn, created_before: float, why: str, batch: int = 1000) -> int:
    """Fail the pending deliveries created before `created_before` (past `give_up_after`):
    their tries were lost, or kept failing, for longer than a receiver is waited for."""
    with conn.cursor() as cur:
        cur.execute("UPDATE notifications SET state=%s, last_error=CONCAT(COALESCE(last_error, ''), %s), "
                    "updated_at=%s WHERE state=%s AND created_at < %s LIMIT %s",
                    (FAILED, why, time.time(), PENDING, created_before, batch))
        count = cur.rowcount
    conn.commit()
    return count


def stale(conn, updated_before: float, limit: int) -> list[dict]:
    """Pending deliveries untouched since `updated_before`: {id, attempts} (their next try may be lost)."""
    with conn.cursor() as cur:
        cur.execute("SELECT id, attempts FROM notifications WHERE state=%s AND updated_at < %s LIMIT %s",
                    (PENDING, updated_before, limit))
        rows = list(cur.fetchall())
    conn.commit()
    return rows


def attempts(conn, notification_id: int) -> list[dict]:
    """Every try of a delivery, first first: {attempt, at, status, error}."""
    with conn.cursor() as cur:
        cur.execute("SELECT attempt, at, status, error FROM notification_attempts WHERE notification_id=%s "
                    "ORDER BY attempt", (notification_id,))
        rows = list(cur.fetchall())
    conn.commit()
    return rows


def of_task(conn, task_id: str) -> list[Delivery]:
    """The task's deliveries, newest first (at most MAX_SHOWN)."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM notifications WHERE task_id=%s ORDER BY id DESC LIMIT %s",
                    (task_id, MAX_SHOWN))
        rows = list(cur.fetchall())
    conn.commit()
    return [_delivery(r) for r in rows]


def prune(conn, before: float, batch: int = 1000) -> int:
    """Delete deliveries created before `before` (and their tries), a batch at a time."""
    removed = 0
    while True:
        with conn.cursor() as cur:
            cur.execute("DELETE FROM notifications WHERE created_at < %s LIMIT %s", (before, batch))
            count = cur.rowcount
        conn.commit()
        removed += count
        if count < batch:
            return removed
