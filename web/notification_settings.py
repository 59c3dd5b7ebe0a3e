"""A user's notifications through the web node: their settings (the account
API, `web.accounts`), a submit's `notify` parameters (`web.api.create_task`)
and a task's deliveries (`GET /api/v1/tasks/<id>`).

URLs are checked here when they are set (`pink.webhooks.check`, against
the cluster's addresses as this node's config and etcd know them, cached
for `webhooks.POLICY_TTL`), and again by the delivery job before each try.

A task's own `notify=URL` is kept whole in its record (`Notice`): the
delivery job needs it, and the record is shown through the API without it
(`pink.tasks.public_view`); deliveries are shown redacted to scheme and host.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pymysql

from pink import db, mail, notification_db, webhooks
from pink.errors import BadRequest, PinkError
from pink.notifications import Notice, Settings, check_email
from pink.request_input import field, flag
from pink.tasks import Task
from web.resources import res

log = logging.getLogger("pink.web")

DB_TIMEOUT = 2.0  # seconds a task's GET waits for MariaDB to connect or answer about its deliveries
PARAMETERS = ("notify", "notify_running")  # a submit's query parameters read here, not by `Params`
OUTAGE_PAUSE = 30.0  # seconds after a failed read during which a task's GET does not ask MariaDB again


def _policy() -> webhooks.Policy:
    return webhooks.cached_policy(res().config, res().store)


def _email_enabled() -> bool:
    return mail.enabled(res().config.notifications)


def check_url(url: str) -> str:
    """A webhook URL as set by a user: refused (400, saying why) unless PINK may send to it."""
    webhooks.check(url, _policy())
    return url


def view(user) -> dict:
    found = notification_db.settings(res().db(), user.name) or Settings()
    return found.view(_email_enabled())


def update(user, body: dict) -> dict:
    """{"webhook": URL or null, "email": address or null, "on_running": bool}: the
    fields sent are set (null clears one), the others kept. The first
    setting makes the user's signing secret."""
    now = notification_db.settings(res().db(), user.name) or Settings()
    webhook, email = now.webhook_url, now.email
    if "webhook" in body:
        webhook = field(body, "webhook", str, null_ok=True) or None
        webhook = check_url(webhook) if webhook else None
    if "email" in body:
        email = field(body, "email", str, null_ok=True) or None
        if email:
            if not _email_enabled():
                raise BadRequest("this PINK sends no e-mail (its operator set no [notifications] smtp_host): "
                                 "use a webhook", code="email_off")
            email = check_email(email)
    on_running = field(body, "on_running", bool, now.on_running)
    saved = notification_db.save(res().db(), user.id, Settings(webhook, email, on_running, now.secret))
    return saved.view(_email_enabled())


def clear(user) -> None:
    notification_db.clear(res().db(), user.id)


def rotate(user) -> dict:
    notification_db.rotate(res().db(), user.id)
    return view(user)


@dataclass(frozen=True)
class Requested:
    """A submit's own notification parameters: `notify=URL`, `notify_running=1|0`
    (None: not given). Read and checked before the upload is received."""

    url: str | None = None
    running: bool | None = None

    @classmethod
    def of(cls, args) -> "Requested":
        url = args.get("notify") or None
        running = flag(args, "notify_running")
        if url:
            check_url(url)
        return cls(url=url, running=running)

    @property
    def given(self) -> bool:
        return self.url is not None or self.running is not None

    def fingerprint(self) -> dict:
        """What an Idempotency-Key's fingerprint includes of it: nothing when not given,
        so the keys of requests without notify parameters keep their fingerprint."""
        return {"notify": self.url, "notify_running": self.running} if self.given else {}


def notice_for(user, requested: Requested, kept: Notice | None = None) -> dict | None:
    """What a new task's record says about its notifications (`pink.notifications.Notice`),
    from the submit's `requested` parameters and the user's settings; None when
    nobody is to be told. A rerun passes the original task's notice as `kept`:
    without parameters of its own, the rerun is told as the original was."""
    if kept is not None and not requested.given:
        return kept.to_json()
    url = requested.url or (kept.url if kept else None)
    running = requested.running if requested.running is not None else (kept.running if kept else None)
    try:
        settings = notification_db.settings(res().db(), user.name)
        if url and settings is None:  # the task's webhook is signed with the user's secret: make it now
            settings = notification_db.save(res().db(), user.id, Settings())
    except (PinkError, pymysql.err.Error) as exc:  # a database outage must not refuse submits
        log.warning("notification settings of %s not read (decided when sent): %s", user.name, exc)
        return Notice(url=url, running=bool(running)).to_json()
    if not url and (settings is None or not settings.any):
        if running:
            raise BadRequest("notify_running needs somewhere to notify: pass notify=URL or set a webhook "
                             "or e-mail (`pink notify set`)", code="bad_param")
        return None
    return Notice(url=url, running=settings.on_running if running is None else running).to_json()


_outage_until = 0.0  # monotonic time before which MariaDB is not asked (it just failed)


def of_task(task: Task) -> list[dict] | None:
    """The task's deliveries as the API shows them; None when the database cannot say now.

    A task whose record asks for no notification has none: MariaDB is not
    asked, so a live task's GET never waits on it. Otherwise a connection of
    its own, with DB_TIMEOUT on connecting and on the answer, bounds what an
    outage adds to the GET, and after a failure OUTAGE_PAUSE spares the next ones."""
    global _outage_until
    if Notice.of(task) is None:
        return []
    if time.monotonic() < _outage_until:
        return None
    try:
        conn = db.connect(res().config.db, connect_timeout=DB_TIMEOUT, read_timeout=DB_TIMEOUT)
        try:
            return [d.view() for d in notification_db.of_task(conn, task.id)]
        finally:
            conn.close()
    except (PinkError, pymysql.err.Error, OSError) as exc:
        _outage_until = time.monotonic() + OUTAGE_PAUSE
        log.warning("task %s: deliveries not read: %s", task.id, exc)
        return None
