"""Notification jobs on their own queue, `pink-notify`, and the leader's part in them.

Nothing here may slow the pipeline: finalize (after its archive commit,
or finding the attempt archived already) and the leader (seeing a task
`running` in its mirror) only enqueue a `fan_out` job, and a failure to
enqueue is logged, never raised. `pink-notify` is served by notify workers
of its own (`pink-worker --queues notify`, `queues.notify_queues`), never by
the pipeline's, so a slow receiver cannot hold a transfer or a finalize.

- `fan_out(payload, notice)` reads where the task's owner wants to hear
  (webhook, e-mail), records one delivery per channel (once: a fan-out
  run twice adds none) and enqueues each one's first try.
- `deliver(id, attempt)` makes one try and records it (a try that crashed
  is a failed try too); a failed try enqueues the next one after the
  backoff (`notifications.next_delay`), until `[notifications]
  give_up_after` or `max_attempts`. At most IN_FLIGHT_PER_USER tries of
  one user are sent at once (a try beyond waits DEFER seconds, uncounted),
  and each try has a wall-clock deadline (`webhooks.post`).
- `maintain()` (hourly) gives up pending deliveries past `give_up_after`,
  prunes those past `keep_days` and re-enqueues pending ones whose next try
  was lost (Redis lost its data, a worker died).

A try due later waits in the queue's ScheduledJobRegistry; the notify
workers themselves move it into the queue when due (`Mover`, a thread of
each notify worker, a small pipelined chunk at a time) and enqueue
`maintain`, so the leader's pass does not grow with a notification backlog.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import timedelta

from redis import Redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.utils import current_timestamp

from pink import archive, mail, metrics, notification_db, notifications, webhooks
from pink.notifications import DELIVERED, FAILED, PENDING, RUNNING, Notice, Settings
from pink.tasks import State, Task
from queue_workers import context

log = logging.getLogger("pink.notify")

QUEUE = "pink-notify"
JOB_TIMEOUT = 120  # seconds: one try is bounded by its deadline (connect + read timeout), far less
DUE_CHECK = 1.0  # seconds between a notify worker's looks for tries now due
DUE_CHUNK = 50  # due tries moved per look (one pipeline each way): a backlog drains over a few looks
MAINTAIN_INTERVAL = 3600.0  # seconds between two `maintain` jobs
IN_FLIGHT_PER_USER = 2  # tries of one user's deliveries sent at once, over all notify workers
DEFER = 5.0  # seconds a try waits when its user has IN_FLIGHT_PER_USER tries in flight already
BUSY_KEY = "pink:notify:busy:"  # + user: a sorted set of the user's tries in flight, scored by expiry
RESCUE_BATCH = 500  # pending deliveries `maintain` re-enqueues at most per run
ERRORS = Retry(max=3, interval=[10, 60, 300])  # a job that crashed (the database away): run it again


def link(config) -> str:
    """The base of task links in payloads: where people open PINK."""
    return config.notifications.public_url or config.web.url


# -- enqueueing (finalize, the leader) ---------------------------------------------

def enqueue(redis: Redis, config, task: Task, event: str) -> bool:
    """Enqueue the notification of `event` if the task's record asks for one.

    Never raises: a notification lost to Redis is logged, the pipeline goes
    on. False only when Redis failed (the leader tries again next pass)."""
    notice = Notice.of(task)
    if notice is None or (event == RUNNING and not notice.running):
        return True
    jid = f"{task.id}-notify-{event}-{task.attempt}"
    try:
        if Job.exists(jid, connection=redis):
            return True
        Queue(QUEUE, connection=redis).enqueue(
            fan_out, notifications.payload(task, event, link(config)), notice.to_json(), job_id=jid,
            job_timeout=JOB_TIMEOUT, result_ttl=86400, failure_ttl=7 * 86400, retry=ERRORS,
            description=f"notify {event} of task {task.id}")
        return True
    except Exception as exc:  # noqa: BLE001 - a notification never fails its caller
        log.warning("task %s: notification of %s not enqueued: %s", task.id, event, exc)
        return False


def _enqueue_try(redis: Redis, notification_id: int, attempt: int, delay: float) -> None:
    """Enqueue try `attempt` unless its job is queued, scheduled or running already
    (a fan-out or a rescue run twice): enqueueing a live id again would run it twice."""
    jid = f"notify-{notification_id}-{attempt}"
    if _job_alive(redis, jid):
        return
    queue = Queue(QUEUE, connection=redis)
    options = dict(job_id=jid, job_timeout=JOB_TIMEOUT, result_ttl=600,
                   failure_ttl=86400, retry=ERRORS, description=f"notification {notification_id} try {attempt}")
    if delay > 0:
        queue.enqueue_in(timedelta(seconds=delay), deliver, notification_id, attempt, **options)
    else:
        queue.enqueue(deliver, notification_id, attempt, **options)


# -- jobs ---------------------------------------------------------------------------

def fan_out(payload: dict, notice: dict) -> str:
    """One delivery per channel the task's owner wants, each with its first try enqueued."""
    config = context.config()
    with archive.connection(config.db) as conn:
        settings = notification_db.settings(conn, payload["user"]) or Settings()
        targets = _targets(config, settings, notice)
        if notice.get("url") and not settings.secret:
            notification_db.ensure_secret(conn, payload["user"])
        for channel, target in targets:
            notification_db.add(conn, payload, channel, target)  # once: a rerun adds none
        unsent = notification_db.unsent(conn, payload)  # new ones, and those a crashed run left unsent
    for _, nid in unsent:
        _enqueue_try(context.redis(), nid, 1, 0)  # the try's job id makes a second enqueue a no-op
    return f"{len(unsent)} deliveries: {', '.join(c for c, _ in unsent) or 'none'}"


def _targets(config, settings: Settings, notice: dict) -> list[tuple[str, str]]:
    targets = []
    if url := notice.get("url") or settings.webhook_url:
        targets.append(("webhook", url))
    if settings.email and mail.enabled(config.notifications):
        targets.append(("email", settings.email))
    return targets


def deliver(notification_id: int, attempt: int) -> str:
    """Try `attempt` of a delivery: send, record, and enqueue the next try after a failure."""
    config = context.config()
    with archive.connection(config.db) as conn:
        delivery = notification_db.get(conn, notification_id)
        if delivery is None or delivery.state != PENDING or delivery.attempts >= attempt:
            return "nothing to do"
        settings = notification_db.settings(conn, delivery.user) or Settings()
    slot = f"{notification_id}:{attempt}"
    if not _take_slot(context.redis(), delivery.user, slot, config.notifications):
        _defer(context.redis(), notification_id, attempt)
        return f"deferred: {delivery.user} has {IN_FLIGHT_PER_USER} tries in flight"
    try:
        outcome = _send_safely(config, delivery, settings.secret)
    finally:
        _release_slot(context.redis(), delivery.user, slot)
    delay = None if outcome.delivered or outcome.final else notifications.next_delay(config.notifications, attempt)
    state = DELIVERED if outcome.delivered else (PENDING if delay is not None else FAILED)
    error = outcome.error
    if state == FAILED and not outcome.final:
        error = f"{error} (given up after {attempt} tries)"
    with archive.connection(config.db) as conn:
        if not notification_db.record(conn, delivery, attempt, outcome.status, error, state):
            return "this try was recorded already"
    metrics.count(context.redis(), "notifications", f"{delivery.channel}/{_outcome_label(outcome, state)}")
    if delay is not None:
        _enqueue_try(context.redis(), notification_id, attempt + 1, delay)
        return f"try {attempt} failed ({error}); next in {delay:.0f}s"
    return f"{state} after {attempt} tries" + (f": {error}" if error else "")


def _take_slot(redis: Redis, user: str, slot: str, settings) -> bool:
    """Count this try among its user's tries in flight, unless IN_FLIGHT_PER_USER are
    already: one user's slow receivers then hold that many notify workers at most,
    never all of them. A slot expires at the try's deadline (a worker that died
    while sending frees it then)."""
    key, now = BUSY_KEY + user, time.time()
    expires = now + settings.connect_timeout + settings.read_timeout + 5
    with redis.pipeline() as pipe:
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.zadd(key, {slot: expires})
        pipe.zcard(key)
        pipe.expire(key, int(expires - now) + 1)
        count = pipe.execute()[2]
    if count <= IN_FLIGHT_PER_USER:
        return True
    redis.zrem(key, slot)
    return False


def _release_slot(redis: Redis, user: str, slot: str) -> None:
    try:
        redis.zrem(BUSY_KEY + user, slot)
    except Exception as exc:  # noqa: BLE001 - it expires by itself
        log.warning("notifications: slot %s of %s not released: %s", slot, user, exc)


def _defer(redis: Redis, notification_id: int, attempt: int) -> None:
    """The same try again in DEFER seconds, not counted: a job of its own id (this
    one's is still running), which `deliver` makes a no-op if the try was made."""
    Queue(QUEUE, connection=redis).enqueue_in(
        timedelta(seconds=DEFER), deliver, notification_id, attempt,
        job_id=f"notify-{notification_id}-{attempt}-{uuid.uuid4().hex[:8]}", job_timeout=JOB_TIMEOUT,
        result_ttl=600, failure_ttl=86400, retry=ERRORS, description=f"notification {notification_id} "
        f"try {attempt}, deferred")


def _outcome_label(outcome: webhooks.Outcome, state: str) -> str:
    if outcome.delivered:
        return "delivered"
    if outcome.final:
        return "refused"
    return "given_up" if state == FAILED else "failed"


def _send_safely(config, delivery: notification_db.Delivery, secret: str) -> webhooks.Outcome:
    """`_send`, with a crash (a bug, a malformed row, an odd answer) as a failed try:
    counted and recorded like any other, so a delivery that always crashes is
    given up on schedule instead of being run again for ever."""
    try:
        return _send(config, delivery, secret)
    except Exception as exc:  # noqa: BLE001 - any crash is this try's failure
        log.exception("notification %s try crashed", delivery.id)
        return webhooks.Outcome(False, error=f"the try crashed: {type(exc).__name__}: {exc}"[:500])


def _send(config, delivery: notification_db.Delivery, secret: str) -> webhooks.Outcome:
    settings = config.notifications
    if delivery.channel == "email":
        if not mail.enabled(settings):
            return webhooks.Outcome(False, error="e-mail is off on this cluster ([notifications] smtp_host)",
                                    final=True)
        subject, text = notifications.mail_text(delivery.payload)
        return mail.send(settings, delivery.target, subject, text, delivery.delivery)
    if not secret:
        return webhooks.Outcome(False, error="no signing secret: the notification settings were cleared",
                                final=True)
    try:
        target = webhooks.check(delivery.target, webhooks.cached_policy(config, context.store()))
    except webhooks.Refused as exc:
        return webhooks.Outcome(False, error=f"refused: {exc.message}", final=True)
    data = notifications.body(delivery.payload)
    sent_headers = notifications.headers(secret, delivery.event, delivery.delivery, data, time.time())
    return webhooks.post(target, data, sent_headers, settings)


def maintain() -> str:
    """Give up pending deliveries past `give_up_after`, prune those past `keep_days`,
    and re-enqueue pending ones whose next try is lost."""
    config = context.config()
    settings = config.notifications
    now = time.time()
    stale = now - settings.max_retry_interval - 2 * JOB_TIMEOUT
    with archive.connection(config.db) as conn:
        expired = notification_db.give_up_expired(
            conn, now - settings.give_up_after, f" (given up: not delivered within {settings.give_up_after:g} s)")
        pruned = notification_db.prune(conn, now - settings.keep_days * 86400)
        lost = notification_db.stale(conn, stale, RESCUE_BATCH)
    rescued = 0
    for row in lost:
        jid = f"notify-{row['id']}-{row['attempts'] + 1}"
        if not _job_alive(context.redis(), jid):
            _enqueue_try(context.redis(), row["id"], row["attempts"] + 1, 0)
            rescued += 1
    return f"{expired} deliveries given up, {pruned} pruned, {rescued} lost tries enqueued again"


def _job_alive(redis: Redis, jid: str) -> bool:
    try:
        status = Job.fetch(jid, connection=redis).get_status(refresh=False)
    except NoSuchJobError:
        return False
    return status is not None and status.value in ("queued", "started", "scheduled", "deferred")


# -- the notify workers' part: due tries and maintenance ----------------------------

def move_due(redis: Redis, chunk: int = DUE_CHUNK) -> int:
    """Move up to `chunk` tries now due from the scheduled registry into the queue.

    Each is claimed by its ZREM (one pipeline), so two notify workers moving
    at once never enqueue a try twice; the claimed jobs are read in one
    round trip and enqueued in one pipeline. A worker dying between the two
    loses the claimed tries, which `maintain` enqueues again."""
    queue = Queue(QUEUE, connection=redis)
    registry = queue.scheduled_job_registry
    due = registry.get_jobs_to_schedule(current_timestamp(), chunk_size=chunk)
    if not due:
        return 0
    with redis.pipeline() as pipe:
        for jid in due:
            pipe.zrem(registry.key, jid)
        claimed = [jid for jid, removed in zip(due, pipe.execute()) if removed]
    jobs = [job for job in Job.fetch_many(claimed, connection=redis) if job is not None]
    with redis.pipeline() as pipe:
        for job in jobs:
            queue._enqueue_job(job, pipeline=pipe)  # what RQ's own scheduler calls
        pipe.execute()
    return len(jobs)


def enqueue_maintain(redis: Redis) -> None:
    """Enqueue `maintain` unless one is queued or running (its fixed id)."""
    if not _job_alive(redis, "notify-maintain"):
        Queue(QUEUE, connection=redis).enqueue(maintain, job_id="notify-maintain", job_timeout=600,
                                               result_ttl=600, failure_ttl=86400,
                                               description="notifications: give up, prune and rescue")


class Mover:
    """A notify worker's thread: due tries into the queue every DUE_CHECK seconds
    (as RQ's scheduler would, without its separate process and connection), and
    `maintain` hourly. Never raises: a Redis failure is retried next look."""

    def __init__(self, redis_of):
        self._redis_of = redis_of  # the jobs' connection (`context.redis`)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pink-notify-due", daemon=True)
        self._maintained = float("-inf")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(DUE_CHECK):
            self.once()

    def once(self) -> None:
        try:
            redis = self._redis_of()
            while move_due(redis) == DUE_CHUNK and not self._stop.is_set():
                pass  # a full chunk: more may be due
            if time.monotonic() - self._maintained >= MAINTAIN_INTERVAL:
                enqueue_maintain(redis)
                self._maintained = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - the worker goes on; the next look tries again
            log.warning("notifications: moving due tries failed: %s", exc)


# -- the leader's part ---------------------------------------------------------------

class Notices:
    """What the leader's pass does for notifications, from its mirror only: tell
    `running` once per attempt (an enqueue per task that asked). Never raises."""

    def __init__(self, config, redis: Redis):
        self.config = config
        self.redis = redis
        self._told: set[tuple[str, int]] = set()

    def run(self, snap) -> None:
        try:
            self._running(snap.tasks)
        except Exception as exc:  # noqa: BLE001 - notifications never stop the leader
            log.warning("notifications: %s", exc)

    def _running(self, records) -> None:
        """Enqueue `running` for each task running now that asked for it and was not told yet."""
        running = set()
        for rec in records:
            task = rec.value
            if task.state != State.RUNNING:
                continue
            key = (task.id, task.attempt)
            running.add(key)
            if key not in self._told and enqueue(self.redis, self.config, task, RUNNING):
                self._told.add(key)
        self._told &= running
