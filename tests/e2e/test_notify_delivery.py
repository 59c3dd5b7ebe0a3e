"""Notifications end to end on real services: signed webhooks to a real HTTP
receiver (succeeded, failed, running first), retried after a 500, hostile
URLs refused when set and never reached when sent, e-mail through a real
SMTP server (aiosmtpd); and the jobs themselves on the test's real Redis and
MariaDB (a fan-out run twice, a crashing try, maintain giving up). The
backoff is shrunk in these tests' config only; tests/pink/test_notifications.py
checks the schedule PINK ships."""

from __future__ import annotations

import email
import json
import time

import pytest
from rq import Queue
from rq.job import Job

from devcluster.ports import free_port
from pink import archive, notification_db, notifications
from pink.notifications import Settings
from pink.webhooks import Outcome
from queue_workers import context, notify
from tests.helpers import Api, make_user
from tests.receivers import FAST_RETRIES, Mailbox, Receiver, deliveries, start_for_ada
from tests.receivers import receiver  # noqa: F401 - the fixture


@pytest.fixture
def loopback():
    """A receiver no delivery may ever reach (loopback: the cluster's own side)."""
    r = Receiver("127.0.0.1")
    yield r
    r.close()


@pytest.fixture
def hooked(pink_processes, config_variant, receiver) -> Api:
    """PINK with fast retries, allowing the receiver's private address."""
    return start_for_ada(pink_processes, config_variant, allow_private=[f"{receiver.address}/32"], **FAST_RETRIES)


def _verified(delivery, secret: str) -> dict:
    assert notifications.verify(secret, delivery.headers, delivery.body, time.time()), delivery.headers
    assert delivery.headers[notifications.HEADER_EVENT] == delivery.json["event"]
    return delivery.json


def test_signed_webhooks_for_a_success_a_failure_and_running_first(hooked, receiver, writer_archive,
                                                                   slow_archive):
    api = hooked
    settings = json.loads(api.cli("notify", "set", "--webhook", receiver.url("/mine"), "--json").stdout)
    secret = settings["secret"]
    assert secret.startswith("pinkwh_") and api("GET", "/me/notifications").json()["notifications"]["secret"] == secret
    ok = api.submit(writer_archive, name="fine").json()["task"]["id"]
    bad = api.submit(writer_archive, cmd="sh -c 'exit 3'").json()["task"]["id"]
    slow = api.cli("submit", str(slow_archive), "--notify", receiver.url("/this-task"),
                   "--notify-running").stdout.strip()
    for task_id in (ok, bad, slow):
        api.wait(task_id)
    got = {(d.json["task"], d.json["event"]): d for d in receiver.wait(4)}
    assert set(got) == {(ok, "succeeded"), (bad, "failed"), (slow, "running"), (slow, "succeeded")}
    fine = _verified(got[ok, "succeeded"], secret)
    assert (fine["name"], fine["user"], fine["state"], fine["attempt"], fine["exit_code"]) == \
        ("fine", "ada", "succeeded", 1, 0)
    assert fine["url"] == f"{api.url}/tasks/{ok}" and fine["timestamps"]["ended"]
    failed = _verified(got[bad, "failed"], secret)
    assert failed["exit_code"] == 3 and failed["failure"]["cause"] == "exit_code"
    assert got[ok, "succeeded"].path == got[bad, "failed"].path == "/mine"
    running, done = _verified(got[slow, "running"], secret), _verified(got[slow, "succeeded"], secret)
    assert running["state"] == "running" and done["state"] == "succeeded"
    assert got[slow, "running"].at < got[slow, "succeeded"].at and got[slow, "running"].path == "/this-task"
    assert len({d.headers[notifications.HEADER_DELIVERY] for d in got.values()}) == 4
    shown = deliveries(api, ok)
    assert shown == [{"channel": "webhook", "event": "succeeded", "target": receiver.origin, "state": "delivered",
                      "attempts": 1, "last_error": None, "created_at": shown[0]["created_at"]}]
    assert [n["event"] for n in deliveries(api, slow)] == ["succeeded", "running"]
    admin = Api(api.config, make_user(api.config, "root", admin=True))
    scraped = admin.http.get(api.url + "/metrics", verify=api.ca, timeout=30).text
    _secret_stays_with_its_owner(api, admin, secret, (ok, slow))
    assert 'pink_notification_deliveries_total{channel="webhook",outcome="delivered"} 4.0' in scraped

    rotated = json.loads(api.cli("notify", "rotate-secret", "--json").stdout)["secret"]
    assert rotated != secret and f"secret:     {rotated}" in api.cli("notify", "show").stdout
    api.cli("notify", "clear")
    assert "webhook:    -" in api.cli("notify", "show").stdout


def _secret_stays_with_its_owner(api: Api, admin: Api, secret: str, task_ids) -> None:
    """Only ada reads her secret: not another user, not an admin, not in any task's record or view."""
    other = Api(api.config, make_user(api.config, "bob"))
    assert other("GET", "/me/notifications").json()["notifications"]["secret"] is None
    assert secret not in admin("GET", "/me/notifications").text
    assert secret not in admin("GET", "/users").text
    for task_id in task_ids:
        for reader in (api, admin):
            assert secret not in reader("GET", f"/tasks/{task_id}").text
    for rec in _records(api.config):
        assert secret not in json.dumps(rec)


def _records(config) -> list[dict]:
    """Every archived task record, as MariaDB keeps it."""
    with archive.connection(config.db) as conn, conn.cursor() as cur:
        cur.execute("SELECT record FROM tasks")
        return [json.loads(row["record"]) for row in cur.fetchall()]


def test_a_receiver_that_fails_gets_the_delivery_again(hooked, receiver, writer_archive):
    api = hooked
    receiver.answers["/flaky"] = [(500, {}), (503, {})]
    task_id = api.submit(writer_archive, notify=receiver.url("/flaky")).json()["task"]["id"]
    api.wait(task_id)
    tries = receiver.wait(3, path="/flaky")
    assert len({d.headers[notifications.HEADER_DELIVERY] for d in tries}) == 1  # one delivery, tried again
    assert tries[1].at - tries[0].at >= 0.4 and tries[2].at - tries[1].at >= 0.9  # backed off, doubling
    [shown] = deliveries(api, task_id)
    assert (shown["state"], shown["attempts"], shown["last_error"]) == ("delivered", 3, "HTTP 503")
    with archive.connection(api.config.db) as conn:
        [row] = notification_db.of_task(conn, task_id)
        assert [a["status"] for a in notification_db.attempts(conn, row.id)] == [500, 503, 204]


def test_hostile_urls_are_refused_when_set_and_never_reached_when_sent(hooked, receiver, loopback, cluster,
                                                                       writer_archive):
    api = hooked
    etcd = cluster.etcd_endpoint
    redis_host_port = api.config.redis_url.split("@")[-1].split("//")[-1].split("/")[0]
    for url, why in ((loopback.url("/"), "is a loopback address"),
                     (f"http://localhost:{loopback.server.server_address[1]}/", "(127.0.0.1) is a loopback"),
                     (f"http://{etcd}/v3/kv/range", "loopback"),
                     (f"http://{redis_host_port}/", "loopback"),
                     ("http://169.254.169.254/latest/meta-data/", "link-local"),
                     ("gopher://example.org/", "scheme 'gopher' is not allowed")):
        r = api("PUT", "/me/notifications", json={"webhook": url})
        assert r.status_code == 400 and r.json()["error"] == "bad_webhook", (url, r.text)
        assert why in r.json()["message"], r.text
    r = api.submit(writer_archive, notify=loopback.url("/"))
    assert r.status_code == 400 and "loopback" in r.json()["message"], r.text

    # A receiver that redirects to the cluster's side: accepted when set, its redirect never followed.
    receiver.answers["/bounce"] = [(302, {"Location": loopback.url("/stolen")})] * 3
    assert api("PUT", "/me/notifications", json={"webhook": receiver.url("/bounce")}).status_code == 200
    bounced = api.submit(writer_archive).json()["task"]["id"]
    api.wait(bounced)
    [shown] = deliveries(api, bounced)
    assert shown["state"] == "failed" and shown["attempts"] == 3
    assert "not followed" in shown["last_error"] and "given up after 3 tries" in shown["last_error"]

    # DNS changed since it was set (here: the row written as it would now resolve): refused at send time.
    with archive.connection(api.config.db) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM users WHERE name='ada'")
            user_id = cur.fetchone()["id"]
        secret = notification_db.settings(conn, "ada").secret
        notification_db.save(conn, user_id, Settings(webhook_url=loopback.url("/rebound"), secret=secret))
    rebound = api.submit(writer_archive).json()["task"]["id"]
    api.wait(rebound)
    [shown] = deliveries(api, rebound)
    assert (shown["state"], shown["attempts"]) == ("failed", 1) and shown["last_error"].startswith("refused:")
    assert "loopback" in shown["last_error"]
    assert loopback.got == []


def test_email_through_a_real_smtp_server(pink_processes, config_variant, writer_archive):
    controller_module = pytest.importorskip("aiosmtpd.controller", reason="pip install -e '.[test]' (aiosmtpd)")
    mailbox, port = Mailbox(), free_port()
    smtp = controller_module.Controller(mailbox, hostname="127.0.0.1", port=port)
    smtp.start()
    try:
        api = start_for_ada(pink_processes, config_variant, smtp_host="127.0.0.1", smtp_port=port, smtp_starttls=False,
                     smtp_from="pink@lab.test", public_url="https://pink.lab.test")
        r = api("PUT", "/me/notifications", json={"email": "ada@example.org", "on_running": False})
        assert r.status_code == 200 and r.json()["notifications"]["email"] == "ada@example.org", r.text
        bad = api("PUT", "/me/notifications", json={"email": "Ada <ada@example.org>"})
        assert bad.status_code == 400 and "one plain address" in bad.json()["message"]
        task_id = api.submit(writer_archive, name="mailed").json()["task"]["id"]
        api.wait(task_id)
        [shown] = deliveries(api, task_id)
        assert (shown["channel"], shown["target"], shown["state"]) == ("email", "…@example.org", "delivered")
        [envelope] = mailbox.messages
        assert envelope.mail_from == "pink@lab.test" and envelope.rcpt_tos == ["ada@example.org"]
        message = email.message_from_bytes(envelope.content)
        assert message["Subject"] == f"[PINK] task mailed ({task_id}) succeeded"
        assert message["X-Pink-Delivery"]
        assert f"https://pink.lab.test/tasks/{task_id}" in message.get_payload(decode=True).decode()
    finally:
        smtp.stop()


# ---------------------------------------------------------------- the jobs on real Redis and MariaDB

@pytest.fixture
def jobs(pink_config, config_variant):
    """The notify jobs' context on this test's Redis and MariaDB, user ada with a webhook
    at a public-looking address nothing listens on (no worker runs: the tests run the jobs)."""
    path = config_variant("notify-jobs", notifications=FAST_RETRIES)
    context.configure(path)
    make_user(pink_config, "ada")
    with archive.connection(pink_config.db) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM users WHERE name='ada'")
        user_id = cur.fetchone()["id"]
        notification_db.save(conn, user_id, Settings(webhook_url="http://192.0.2.10/hook"))
    yield context
    context.configure(pink_config.path)


def _payload(task_id: str = "tjobs1") -> dict:
    return {"event": "succeeded", "task": task_id, "user": "ada", "attempt": 1, "name": "n", "state": "succeeded"}


def _rows(config, task_id: str) -> list[notification_db.Delivery]:
    with archive.connection(config.db) as conn:
        return notification_db.of_task(conn, task_id)


def test_a_fan_out_run_twice_records_once_and_enqueues_what_a_crash_left_unsent(jobs, pink_config):
    assert notify.fan_out(_payload(), {"url": None, "running": False}) == "1 deliveries: webhook"
    [row] = _rows(pink_config, "tjobs1")
    redis = jobs.redis()
    first = f"notify-{row.id}-1"
    assert Job.exists(first, connection=redis)
    Job.fetch(first, connection=redis).delete()  # as if the first run died before enqueueing it
    Queue(notify.QUEUE, connection=redis).empty()
    assert notify.fan_out(_payload(), {"url": None, "running": False}) == "1 deliveries: webhook"
    assert [r.id for r in _rows(pink_config, "tjobs1")] == [row.id]  # recorded once
    assert Job.exists(first, connection=redis)  # its first try enqueued by the rerun


def test_a_crashing_try_is_a_failed_try_counted_and_recorded(jobs, pink_config, monkeypatch):
    notify.fan_out(_payload("tjobs2"), {"url": None, "running": False})
    [row] = _rows(pink_config, "tjobs2")

    def crash(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(notify, "_send", crash)
    assert notify.deliver(row.id, 1).startswith("try 1 failed (the try crashed: RuntimeError: a bug)")
    [after] = _rows(pink_config, "tjobs2")
    assert (after.state, after.attempts) == ("pending", 1)
    with archive.connection(pink_config.db) as conn:
        [tried] = notification_db.attempts(conn, row.id)
    assert tried["error"] == "the try crashed: RuntimeError: a bug" and tried["status"] is None
    assert notify.deliver(row.id, 1) == "nothing to do"  # a rerun of the same try sends nothing
    scheduled = Queue(notify.QUEUE, connection=jobs.redis()).scheduled_job_registry
    assert f"notify-{row.id}-2" in scheduled.get_job_ids()
    notify.deliver(row.id, 2)
    assert notify.deliver(row.id, 3).startswith("failed after 3 tries")  # FAST_RETRIES: 3 tries at most
    assert _rows(pink_config, "tjobs2")[0].last_error.endswith("(given up after 3 tries)")


def test_due_tries_are_moved_by_the_notify_worker_once(jobs, pink_config):
    notify.fan_out(_payload("tjobs3"), {"url": None, "running": False})
    [row] = _rows(pink_config, "tjobs3")
    redis = jobs.redis()
    queue = Queue(notify.QUEUE, connection=redis)
    queue.empty()
    notify._enqueue_try(redis, row.id, 2, 0.01)
    time.sleep(1.1)  # RQ's scheduled times are whole seconds
    assert notify.move_due(redis) == 1 and notify.move_due(redis) == 0  # claimed once
    assert queue.job_ids == [f"notify-{row.id}-2"]


def test_maintain_gives_up_deliveries_past_give_up_after(jobs, pink_config):
    notify.fan_out(_payload("tjobs4"), {"url": None, "running": False})
    [row] = _rows(pink_config, "tjobs4")
    with archive.connection(pink_config.db) as conn, conn.cursor() as cur:
        cur.execute("UPDATE notifications SET created_at=%s WHERE id=%s", (time.time() - 2 * 86400, row.id))
        conn.commit()
    assert notify.maintain().startswith("1 deliveries given up")
    [after] = _rows(pink_config, "tjobs4")
    assert after.state == "failed" and "given up: not delivered within 86400 s" in after.last_error
    assert notify.deliver(row.id, 1) == "nothing to do"


def test_a_users_tries_beyond_its_in_flight_cap_wait_uncounted(jobs, pink_config, monkeypatch):
    notify.fan_out(_payload("tjobs5"), {"url": None, "running": False})
    [row] = _rows(pink_config, "tjobs5")
    redis = jobs.redis()
    busy = notify.BUSY_KEY + "ada"
    redis.zadd(busy, {f"other:{n}": time.time() + 60 for n in range(notify.IN_FLIGHT_PER_USER)})
    assert notify.deliver(row.id, 1).startswith("deferred")
    assert _rows(pink_config, "tjobs5")[0].attempts == 0  # not a try
    deferred = Queue(notify.QUEUE, connection=redis).scheduled_job_registry.get_job_ids()
    assert any(jid.startswith(f"notify-{row.id}-1-") for jid in deferred)
    redis.delete(busy)
    monkeypatch.setattr(notify, "_send", lambda *args: Outcome(True, status=204))
    assert notify.deliver(row.id, 1) == "delivered after 1 tries"
    assert redis.zcard(busy) == 0  # its slot given back
