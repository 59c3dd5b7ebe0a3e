"""Notifications without a cluster: signing and its check, the retry schedule
PINK ships, the URL policy, and `webhooks.post` against a real local HTTP server."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
import time

import pytest

from pink import config as pink_config
from pink import notifications, webhooks
from pink.errors import BadRequest, ConfigError
from pink.notifications import Notice
from pink.tasks import Params, State, new_record

SECRET = "pinkwh_test-secret"


def _task(**changes):
    task = new_record("t123", "ada", Params(name="train"), {"sha256": "a" * 64, "size": 1}, "web1")
    for key, value in changes.items():
        setattr(task, key, value)
    return task


# ---------------------------------------------------------------- signing

def test_a_signature_verifies_and_anything_changed_does_not():
    data = notifications.body({"event": "succeeded", "task": "t123"})
    sent = notifications.headers(SECRET, "succeeded", "d1", data, now=1_800_000_000.5)
    assert sent[notifications.HEADER_TIMESTAMP] == "1800000000"
    assert sent[notifications.HEADER_SIGNATURE].startswith("sha256=")
    assert notifications.verify(SECRET, sent, data, now=1_800_000_010)
    assert not notifications.verify("pinkwh_other", sent, data, now=1_800_000_010)
    assert not notifications.verify(SECRET, sent, data + b" ", now=1_800_000_010)
    forged = {**sent, notifications.HEADER_TIMESTAMP: "1800000001"}  # the timestamp is signed too
    assert not notifications.verify(SECRET, forged, data, now=1_800_000_010)


def test_an_old_or_future_timestamp_is_refused():
    data = b"{}"
    sent = notifications.headers(SECRET, "failed", "d1", data, now=1_000_000)
    assert notifications.verify(SECRET, sent, data, now=1_000_000 + notifications.TOLERANCE)
    assert not notifications.verify(SECRET, sent, data, now=1_000_000 + notifications.TOLERANCE + 1)
    assert not notifications.verify(SECRET, sent, data, now=1_000_000 - notifications.TOLERANCE - 1)
    assert not notifications.verify(SECRET, {**sent, notifications.HEADER_TIMESTAMP: "soon"}, data, now=1_000_000)


def test_the_signature_is_githubs_hmac_over_timestamp_dot_body():
    import hashlib
    import hmac

    data = b'{"a":1}'
    expected = "sha256=" + hmac.new(SECRET.encode(), b"1700000000." + data, hashlib.sha256).hexdigest()
    assert notifications.sign(SECRET, 1700000000, data) == expected


def test_secrets_are_new_each_time():
    first, second = notifications.new_secret(), notifications.new_secret()
    assert first != second and first.startswith("pinkwh_") and len(first) > 40


def test_the_payload_says_what_happened_and_links_the_page():
    task = _task(state=State.FAILED, exit_code=3, failure="exit_code", attempt=2)
    task.timings.update(running=1_800_000_100.0, failed=1_800_000_200.0)
    data = notifications.payload(task, "failed", "https://pink.lab/")
    assert data["event"] == "failed" and data["task"] == "t123" and data["name"] == "train"
    assert (data["user"], data["state"], data["attempt"], data["exit_code"]) == ("ada", "failed", 2, 3)
    assert data["failure"]["cause"] == "exit_code" and data["failure"]["class"] == "task"
    assert data["timestamps"]["started"].startswith("2027-01-15") and data["timestamps"]["ended"]
    assert data["url"] == "https://pink.lab/tasks/t123"
    subject, text = notifications.mail_text(data)
    assert "t123" in subject and "failed" in subject and "Exit code: 3" in text and data["url"] in text


def test_a_record_without_notify_tells_nobody():
    assert Notice.of(_task()) is None
    task = _task()
    task.extra["notify"] = Notice(url="https://hooks.example.org/x", running=True).to_json()
    assert Notice.of(task) == Notice(url="https://hooks.example.org/x", running=True)


# ---------------------------------------------------------------- the schedule PINK ships

def test_the_default_schedule_backs_off_and_gives_up_after_a_day():
    defaults = pink_config.NotificationsConfig()
    delays = notifications.retry_delays(defaults.first_retry, defaults.max_retry_interval,
                                        defaults.give_up_after, defaults.max_attempts)
    assert delays[:4] == [30, 60, 120, 240]
    assert max(delays) == defaults.max_retry_interval
    assert all(b >= a for a, b in zip(delays, delays[1:]))  # never shorter than the wait before
    assert sum(delays) <= 86400 < sum(delays) + defaults.max_retry_interval  # the last try within the day
    assert len(delays) + 1 <= defaults.max_attempts
    assert notifications.next_delay(defaults, 1) == 30
    assert notifications.next_delay(defaults, len(delays)) == delays[-1]
    assert notifications.next_delay(defaults, len(delays) + 1) is None  # given up


def test_max_attempts_caps_the_tries_whatever_the_day_leaves():
    assert len(notifications.retry_delays(1, 1, 86400, 5)) == 4


# ---------------------------------------------------------------- URLs

def _config(**notify):
    config = pink_config.from_mapping({"etcd": {"endpoints": ["10.9.8.7:2379"]}, "notifications": notify})
    return config


def _refused(url: str, policy: webhooks.Policy) -> str:
    with pytest.raises(webhooks.Refused) as caught:
        webhooks.check(url, policy)
    assert caught.value.status == 400 and isinstance(caught.value, BadRequest)
    return caught.value.message


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:8080/hook", "loopback"),
    ("http://localhost/hook", "loopback"),
    ("http://[::1]/hook", "loopback"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://10.1.2.3/", "private address (an operator may allow"),
    ("http://192.168.1.10/", "private"),
    ("http://2130706433/", "loopback"),  # 127.0.0.1 as one number: the resolver reads it so
])
def test_internal_addresses_are_refused_saying_why(url, why):
    message = _refused(url, webhooks.Policy.of(_config()))
    assert why in message and "public addresses" in message


def test_a_private_network_may_be_allowed_but_never_the_cluster_itself():
    policy = webhooks.Policy.of(_config(allow_private=["10.0.0.0/8"]))
    assert webhooks.check("https://10.1.2.3/hook", policy).address == "10.1.2.3"
    assert "this PINK cluster's own addresses" in _refused("http://10.9.8.7:2379/v3/kv/range", policy)
    assert "loopback" in _refused("http://127.0.0.1/", webhooks.Policy.of(_config(allow_private=["127.0.0.0/8"])))


def test_the_cluster_hosts_come_from_every_part_of_the_config():
    config = pink_config.from_mapping({
        "redis_url": "redis://:pw@10.0.0.5:6379/0", "redis_sentinels": ["10.0.0.6:26379"],
        "etcd": {"endpoints": ["https://10.0.0.7:2379", "[fd00::7]:2379"]}, "db": {"host": "10.0.0.8"},
        "web": {"url": "https://10.0.0.9:8443", "bind": "0.0.0.0:8443"}, "runner": {"ssh_host": "10.0.0.11"}})
    assert webhooks.cluster_hosts(config) >= {"10.0.0.5", "10.0.0.6", "10.0.0.7", "fd00::7", "10.0.0.8",
                                              "10.0.0.9", "10.0.0.11"}
    own = webhooks.Policy.of(config).own
    assert ipaddress.ip_address("10.0.0.8") in own


@pytest.mark.parametrize("url, words", [
    ("ftp://example.org/x", "scheme 'ftp' is not allowed"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("https:///path", "no host"),
    ("https://user:pw@example.org/", "user name or password"),
    ("https://example.org:99999/", "port"),
    ("https://exa mple.org/", "without spaces"),
    ("", "http:// or https://"),
    ("https://no-such-host.invalid/", "does not resolve"),
])
def test_urls_that_are_not_plain_http_are_refused(url, words):
    assert words in _refused(url, webhooks.Policy())


def test_redaction_keeps_scheme_and_host_only():
    assert notifications.redact("https://hooks.example.org:8443/t/SECRET?token=x") == "https://hooks.example.org:8443"
    assert notifications.redact("http://[2001:db8::1]/x") == "http://[2001:db8::1]"
    assert notifications.redact("ada@example.org") == "…@example.org"


def test_email_addresses_are_plain_addresses():
    assert notifications.check_email(" ada@example.org ") == "ada@example.org"
    for bad in ("ada", "Ada <ada@example.org>", "ada@example.org\r\nBcc: x@y.org", "a@b", "x" * 250 + "@e.org"):
        with pytest.raises(BadRequest):
            notifications.check_email(bad)


# ---------------------------------------------------------------- sending

class _Receiver(http.server.BaseHTTPRequestHandler):
    answers: list = []
    seen: list = []

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        type(self).seen.append((self.headers, self.rfile.read(length)))
        status, headers, body = type(self).answers.pop(0)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    _Receiver.answers, _Receiver.seen = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _target(server, path="/hook"):
    """A Target as `check` makes it, at the test's own loopback server (check refuses loopback)."""
    port = server.server_address[1]
    return webhooks.Target(url=f"http://hooks.test:{port}{path}", scheme="http", host="hooks.test", port=port,
                           path=path, address="127.0.0.1")


def test_post_connects_to_the_checked_address_and_names_the_host(receiver):
    _Receiver.answers = [(204, {}, b"")]
    data = notifications.body({"event": "succeeded"})
    outcome = webhooks.post(_target(receiver), data, notifications.headers(SECRET, "succeeded", "d1", data, 1e9),
                            pink_config.NotificationsConfig())
    assert outcome == webhooks.Outcome(True, status=204)
    headers, body = _Receiver.seen[0]
    assert headers["Host"] == f"hooks.test:{receiver.server_address[1]}" and body == data
    assert headers[notifications.HEADER_EVENT] == "succeeded"


def test_post_does_not_follow_a_redirect(receiver):
    _Receiver.answers = [(302, {"Location": "http://127.0.0.1:1/"}, b"")]
    outcome = webhooks.post(_target(receiver), b"{}", {}, pink_config.NotificationsConfig())
    assert not outcome.delivered and outcome.status == 302
    assert "redirect to http://127.0.0.1:1/ not followed" in outcome.error
    assert len(_Receiver.seen) == 1


def test_post_reads_a_bounded_answer_and_reports_the_status(receiver):
    _Receiver.answers = [(500, {}, b"x" * 100_000)]
    config = pink_config.NotificationsConfig(max_response_bytes=10)
    outcome = webhooks.post(_target(receiver), b"{}", {}, config)
    assert (outcome.delivered, outcome.status, outcome.error) == (False, 500, "HTTP 500: xxxxxxxxxx")


def test_post_to_nobody_is_an_error_not_an_exception():
    config = pink_config.NotificationsConfig(connect_timeout=1, read_timeout=1)
    target = webhooks.Target(url="http://x.test:9/", scheme="http", host="x.test", port=9, path="/",
                             address="127.0.0.1")
    outcome = webhooks.post(target, b"{}", {}, config)
    assert not outcome.delivered and outcome.status is None and outcome.error


def test_the_cli_sends_notify_parameters_only_when_given():
    from pink_cli.client import submit_params

    assert submit_params(notify="https://h.example.org/x", notify_running=False) == [
        ("notify", "https://h.example.org/x"), ("notify_running", "0")]
    assert submit_params(notify_running=True) == [("notify_running", "1")]
    assert submit_params() == []


# ---------------------------------------------------------------- review fixes

@pytest.mark.parametrize("url, carried", [
    ("http://[2002:7f00:1::1]/", "127.0.0.1"),  # 6to4 of loopback: is_global, yet a relay delivers inside
    ("http://[2002:a09:807::1]/", "10.9.8.7"),  # 6to4 of the cluster's etcd
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "127.0.0.1"),  # Teredo: client = ~address
    ("http://[64:ff9b::a09:807]/", "10.9.8.7"),  # NAT64
    ("http://[::a09:807]/", "10.9.8.7"),  # IPv4-compatible
])
def test_ipv4_carried_in_ipv6_is_checked_as_itself(url, carried):
    message = _refused(url, webhooks.Policy.of(_config(allow_private=["2000::/3", "64:ff9b::/96", "::/96"])))
    assert f"carries the IPv4 address {carried}" in message


def test_a_wildcard_bind_makes_this_hosts_interfaces_the_clusters_own(tmp_path):
    (tmp_path / "fib_trie").write_text("Local:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 203.0.113.7\n"
                                       "        /32 host LOCAL\n     |-- 203.0.113.255\n        /32 link BROADCAST\n")
    (tmp_path / "if_inet6").write_text("20010db8000000000000000000000042 02 40 00 80 eth0\n")
    assert webhooks.local_addresses(tmp_path) == {ipaddress.ip_address("203.0.113.7"),
                                                  ipaddress.ip_address("2001:db8::42")}
    local = webhooks.local_addresses()
    assert ipaddress.ip_address("127.0.0.1") in local
    wild = pink_config.from_mapping({"web": {"bind": "0.0.0.0:8443"}})
    assert local <= webhooks.Policy.of(wild).own


def test_the_secret_is_not_in_a_settings_repr():
    settings = notifications.Settings(webhook_url="https://h.example.org/", secret=SECRET)
    assert SECRET not in repr(settings) and "h.example.org" in repr(settings)


def test_email_addresses_are_printable_ascii():
    for bad in ("adä@example.org", "a\tb@example.org", "a b@example.org", "a\x7f@example.org", "a@b@example.org",
                "ada@exämple.org"):
        with pytest.raises(BadRequest):
            notifications.check_email(bad)
    assert notifications.check_email("ada.lovelace+pink@example.org") == "ada.lovelace+pink@example.org"


def test_a_task_name_with_a_newline_makes_one_subject_line():
    task = _task(state=State.SUCCEEDED)
    task.name = "train\r\nBcc: eve@example.org\u2028x"
    subject, _ = notifications.mail_text(notifications.payload(task, "succeeded", ""))
    assert subject == "[PINK] task train Bcc: eve@example.org x (t123) succeeded"


def test_the_mail_of_a_newline_name_reaches_a_real_smtp_server_with_one_subject():
    controller_module = pytest.importorskip("aiosmtpd.controller", reason="pip install -e '.[test]' (aiosmtpd)")
    import email

    from devcluster.ports import free_port
    from pink import mail
    from tests.receivers import Mailbox

    mailbox, port = Mailbox(), free_port()
    smtp = controller_module.Controller(mailbox, hostname="127.0.0.1", port=port)
    smtp.start()
    try:
        task = _task(state=State.FAILED)
        task.name = "evil\nBcc: eve@example.org"
        subject, text = notifications.mail_text(notifications.payload(task, "failed", ""))
        config = pink_config.NotificationsConfig(smtp_host="127.0.0.1", smtp_port=port, smtp_starttls=False,
                                                 smtp_from="pink@lab.test")
        assert mail.send(config, "ada@example.org", subject, text, "d1") == webhooks.Outcome(True, status=250)
    finally:
        smtp.stop()
    [envelope] = mailbox.messages
    assert envelope.rcpt_tos == ["ada@example.org"]
    message = email.message_from_bytes(envelope.content)
    assert message["Subject"] == "[PINK] task evil Bcc: eve@example.org (t123) failed" and message["Bcc"] is None
    assert message[notifications.HEADER_DELIVERY] == "d1"


def test_the_payload_names_no_node():
    assert "node" not in notifications.payload(_task(node="run1"), "running", "")


@pytest.mark.parametrize("setting, value", [("first_retry", 0), ("read_timeout", -1), ("keep_days", 0),
                                            ("give_up_after", float("inf")), ("max_attempts", 0),
                                            ("connect_timeout", "5")])
def test_notification_settings_out_of_range_are_a_config_error(setting, value):
    with pytest.raises(ConfigError, match=f"\\[notifications\\] {setting} must be a number above 0"):
        pink_config.from_mapping({"notifications": {setting: value}})


def test_a_bad_allowed_network_is_a_config_error():
    with pytest.raises(ConfigError, match="allow_private"):
        webhooks.Policy.of(_config(allow_private=["10.0.0.0/33"]))


def test_a_url_over_max_url_chars_is_refused():
    url = "https://hooks.example.org/" + "a" * notifications.MAX_URL_CHARS
    assert f"at most {notifications.MAX_URL_CHARS} characters" in _refused(url, webhooks.Policy())


def test_flags_are_one_helper():
    from pink.request_input import flag

    assert [flag({"x": v}, "x") for v in ("1", "TRUE", "yes", "0", "false", "No")] == [True] * 3 + [False] * 3
    assert flag({}, "x") is None and flag({"x": ""}, "x", False) is False
    with pytest.raises(BadRequest, match="x must be 1 or 0"):
        flag({"x": "maybe"}, "x")


def test_pipeline_workers_never_serve_notifications():
    from queue_workers import notify, queues

    assert notify.QUEUE not in queues.queues_for("web1")
    assert queues.notify_queues() == [notify.QUEUE]


def test_a_receiver_trickling_its_answer_is_cut_at_the_deadline():
    """A byte every 0.3 s never trips a per-read timeout of 1 s; the try's deadline (2 s) stops it."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
                if stop.wait(0.3):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:  # PINK hung up at its deadline
                    return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    target = webhooks.Target(url=f"http://slow.test:{port}/", scheme="http", host="slow.test", port=port,
                             path="/", address="127.0.0.1")
    started = time.monotonic()
    outcome = webhooks.post(target, b"{}", {}, pink_config.NotificationsConfig(connect_timeout=1, read_timeout=1))
    took = time.monotonic() - started
    stop.set()
    listener.close()
    assert not outcome.delivered and "deadline" in outcome.error and 1.8 < took < 3.5, (outcome, took)


def test_a_tasks_get_asks_the_database_only_for_a_notifying_task_and_not_during_an_outage(monkeypatch):
    from types import SimpleNamespace

    from pink.errors import Unavailable
    from web import notification_settings

    asked = []

    def down(*args, **kwargs):
        asked.append(kwargs)
        raise Unavailable("the database is away")

    monkeypatch.setattr(notification_settings.db, "connect", down)
    monkeypatch.setattr(notification_settings, "res", lambda: SimpleNamespace(config=pink_config.Config()))
    monkeypatch.setattr(notification_settings, "_outage_until", 0.0)
    assert notification_settings.of_task(_task()) == [] and asked == []  # notifies nobody: not asked
    notifying = _task()
    notifying.extra["notify"] = Notice().to_json()
    assert notification_settings.of_task(notifying) is None
    assert asked == [{"connect_timeout": notification_settings.DB_TIMEOUT,
                      "read_timeout": notification_settings.DB_TIMEOUT}]
    assert notification_settings.of_task(notifying) is None and len(asked) == 1  # the outage pause
