"""Notifications: what PINK tells a task's owner when the task ends (or starts
running), and how a receiver knows the message is PINK's.

A user sets a webhook and/or an e-mail address (and whether `running` is
told too) in their account; a submit's `notify=URL` sends that task's
webhook elsewhere. Whether a task is notified is decided at submit and kept
in its record (`Notice`, the record's `notify` key), so that the leader and
finalize decide without reading the database; where it goes and the secret
are read when it is sent.

Webhooks are signed as GitHub signs them, with a timestamp against replays:
`X-Pink-Signature-256: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`
with `X-Pink-Timestamp` (Unix seconds), `X-Pink-Event` and `X-Pink-Delivery`
(unique per delivery, the same on each retry of it). `verify` is what a
receiver does (README, docs/api.md). Everything here is pure: the database is
`pink.notification_db`, sending `pink.webhooks` and `pink.mail`, the jobs
`queue_workers.notify`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pink import failures
from pink.errors import BadRequest
from pink.tasks import State, Task, iso

RUNNING = State.RUNNING.value
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"  # a delivery's state

HEADER_EVENT = "X-Pink-Event"
HEADER_DELIVERY = "X-Pink-Delivery"
HEADER_TIMESTAMP = "X-Pink-Timestamp"
HEADER_SIGNATURE = "X-Pink-Signature-256"
TOLERANCE = 300  # seconds: a receiver refuses a timestamp older (or further ahead) than this
SECRET_PREFIX = "pinkwh_"
MAX_URL_CHARS = 2000
MAX_EMAIL_CHARS = 254
# printable ASCII only: no spaces, no control characters (no header injection), no name or brackets
_EMAIL = re.compile(r"[\x21-\x7e]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,63}")
_EMAIL_REFUSED = set("@<>\"',;()[]\\:")  # in the local part: a name, a list or a route, not one mailbox
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")  # ASCII, C1 and Unicode line breaks
MAX_SUBJECT_CHARS = 200


@dataclass(frozen=True)
class Settings:
    """A user's notification settings (their account); `secret` signs their webhooks."""

    webhook_url: str | None = None
    email: str | None = None
    on_running: bool = False
    secret: str = field(default="", repr=False)  # never in a log line or a traceback's repr

    @property
    def any(self) -> bool:
        return bool(self.webhook_url or self.email)

    def view(self, email_enabled: bool) -> dict:
        """As the owner sees it (API, CLI, account page): the secret included, for them only."""
        return {"webhook": self.webhook_url, "email": self.email, "on_running": self.on_running,
                "secret": self.secret or None, "email_enabled": email_enabled}


@dataclass(frozen=True)
class Notice:
    """What a task's record says about its notifications (its `notify` key):
    a webhook of its own (else its owner's), and whether `running` is told."""

    url: str | None = None
    running: bool = False

    def to_json(self) -> dict:
        return {"url": self.url, "running": self.running}

    @classmethod
    def of(cls, task: Task) -> "Notice | None":
        """The task's notice; None for a task that notifies nobody."""
        raw = task.extra.get("notify")
        if not isinstance(raw, dict):
            return None
        url = raw.get("url")
        return cls(url=url if isinstance(url, str) and url else None, running=raw.get("running") is True)


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def payload(task: Task, event: str, link: str) -> dict:
    """The JSON a receiver gets: the task as it is at `event`, and a link to its page."""
    return {
        "event": event, "task": task.id, "name": task.name, "user": task.user, "state": task.state.value,
        "attempt": task.attempt, "exit_code": task.exit_code, "failure": failures.describe(task.failure),
        "error": task.error,
        "timestamps": {"submitted": iso(task.timings.get("submitted") or task.created_at),
                       "started": iso(task.timings.get(RUNNING)),
                       "ended": iso(task.timings.get(task.state.value)) if task.final else None},
        "url": f"{link.rstrip('/')}/tasks/{task.id}" if link else None,
    }


def body(data: dict) -> bytes:
    """The exact bytes sent and signed."""
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def sign(secret: str, timestamp: int, data: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>." + body)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + data, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def headers(secret: str, event: str, delivery: str, data: bytes, now: float) -> dict[str, str]:
    timestamp = int(now)
    return {"Content-Type": "application/json", "User-Agent": "PINK-Notifications/1",
            HEADER_EVENT: event, HEADER_DELIVERY: delivery, HEADER_TIMESTAMP: str(timestamp),
            HEADER_SIGNATURE: sign(secret, timestamp, data)}


def verify(secret: str, got_headers, data: bytes, now: float, tolerance: float = TOLERANCE) -> bool:
    """A receiver's check: the signature matches the body and the timestamp is recent.

    Compared in constant time; a timestamp more than `tolerance` seconds away
    from `now` is refused, so a captured delivery cannot be replayed later.
    """
    try:
        timestamp = int(got_headers.get(HEADER_TIMESTAMP, ""))
    except ValueError:
        return False
    if abs(now - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, data), got_headers.get(HEADER_SIGNATURE, ""))


def retry_delays(first: float, longest: float, give_up_after: float, max_attempts: int) -> list[float]:
    """The waits before each retry: doubling from `first`, at most `longest`,
    while the next try still falls within `give_up_after` of the first one and
    within `max_attempts` tries. Its length + 1 is how many tries a delivery gets."""
    delays, total, wait = [], 0.0, max(first, 0.001)
    while len(delays) + 1 < max_attempts and total + wait <= give_up_after:
        delays.append(wait)
        total += wait
        wait = min(wait * 2, longest)
    return delays


def next_delay(config, attempt: int) -> float | None:
    """Seconds before try `attempt + 1` of a delivery ([notifications]); None: give up."""
    delays = retry_delays(config.first_retry, config.max_retry_interval, config.give_up_after,
                          config.max_attempts)
    return delays[attempt - 1] if attempt <= len(delays) else None


def redact(url: str) -> str:
    """A target as pages and the API show it: scheme and host only (paths and
    queries often carry a receiver's own secret token)."""
    if "@" in url and "://" not in url:  # an e-mail address: its domain only
        return "…@" + url.rsplit("@", 1)[1]
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if _port(parts) else ""
    return f"{parts.scheme}://{host}{port}"


def _port(parts) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None


def check_email(address: str) -> str:
    """An address PINK may send to, or BadRequest saying what is wrong."""
    address = address.strip()
    local = address.rsplit("@", 1)[0]
    if len(address) > MAX_EMAIL_CHARS or not _EMAIL.fullmatch(address) or _EMAIL_REFUSED & set(local):
        raise BadRequest(f"email must be one plain address like ada@example.org (at most {MAX_EMAIL_CHARS} "
                         "characters, no name or brackets)", code="bad_email")
    return address


def mail_text(data: dict) -> tuple[str, str]:
    """The subject and text of the e-mail telling `payload` `data`."""
    subject = one_line(f"[PINK] task {data['name']} ({data['task']}) {data['state']}", MAX_SUBJECT_CHARS)
    lines = [f"Task {data['name']} ({data['task']}) is {data['state']} (attempt {data['attempt']})."]
    if data.get("exit_code") is not None:
        lines.append(f"Exit code: {data['exit_code']}")
    if failure := data.get("failure"):
        lines.append(f"Failure ({failure.get('class')}): {failure.get('summary')}")
        if failure.get("advice"):
            lines.append(f"What to do: {failure['advice']}")
    if data.get("url"):
        lines.append(f"\n{data['url']}")
    return subject, "\n".join(lines) + "\n"


def one_line(text: str, limit: int) -> str:
    """`text` without control characters or line breaks (each run becomes one
    space), at most `limit` characters: a task's name is the user's, and a
    newline in a header would start another header."""
    return _CONTROL.sub(" ", str(text)).strip()[:limit]
