"""Followed logs: one user cannot take a web node away from everyone by
following logs (issue 18, item 2). Gone clients are noticed while the task is
silent, follows are capped per user and per node with the shipped defaults,
a follow ends and is resumed without losing or repeating a byte."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from pink import config as pink_config_module
from pink.config import LimitsConfig
from pink_cli.client import FollowedLog
from tests import images
from tests.helpers import Api, make_user
from web import log_streams, serve

SILENT = 'CMD ["sh", "-c", "trap \'exit 0\' TERM; sleep 600 & wait"]\n'  # prints nothing; stops on TERM
CHATTY = 'CMD ["sh", "-c", "echo one; sleep 3; printf two; sleep 2; echo \' and three\'"]\n'
CHATTY_LOG = b"one\ntwo and three\n"
PROMPT = 10  # seconds within which the node must answer a health check while followers sit idle


@pytest.fixture(scope="session")
def silent_archive(docker_client, tmp_path_factory):
    """An image whose task runs ten minutes and never prints a byte."""
    return images.build_archive(docker_client, "pink/test-silent:1", SILENT,
                                tmp_path_factory.mktemp("silent") / "silent.tar")


@pytest.fixture(scope="session")
def chatty_archive(docker_client, tmp_path_factory):
    """An image whose task prints a line, a partial line 3 s later, and its end 2 s after."""
    return images.build_archive(docker_client, "pink/test-chatty:1", CHATTY,
                                tmp_path_factory.mktemp("chatty") / "chatty.tar")


def _follow(api: Api, task_id: str, **params) -> requests.Response:
    """A follow on a connection of its own (headers read, body not): as `curl -N` holds one."""
    return requests.get(f"{api.url}/api/v1/tasks/{task_id}/logs", params={"follow": 1, **params},
                        headers={"Authorization": f"Bearer {api.token}"}, stream=True,
                        timeout=(5, 30), verify=api.ca)


def _open_streams_settle(config, expected: int = 0, within: float = 5.0) -> int:
    """The node's count of open follows once it reaches `expected` (or `within` s pass)."""
    deadline = time.monotonic() + within
    while (n := log_streams.open_streams(config)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def _running(api: Api, archive) -> str:
    task_id = api.submit(archive).json()["task"]["id"]
    api.wait(task_id, states={"running"})
    return task_id


def _health_answers(api: Api) -> None:
    r = requests.get(f"{api.url}/api/v1/health", timeout=PROMPT, verify=api.ca)
    assert r.status_code == 200, r.text


def _cancel(api: Api, *task_ids: str) -> None:
    """Stop live tasks (a DELETE of a finished task would delete it instead)."""
    for task_id in task_ids:
        api("DELETE", f"/tasks/{task_id}")
    for task_id in task_ids:
        api.wait(task_id)


def test_dropped_follows_of_a_silent_task_leave_the_node_answering(api, silent_archive, writer_archive):
    """A user cannot take a web node away from everyone by following a silent
    task's log 80 times and dropping each client after 2 s: every dropped
    follow is noticed within seconds (the node's count of open follows goes
    back to 0), and health checks and submits answer all along."""
    task_id = _running(api, silent_archive)
    for _wave in range(10):  # 10 x the per-user cap = the 80 follows of the report
        follows = [_follow(api, task_id) for _ in range(LimitsConfig.log_streams_per_user)]
        assert [r.status_code for r in follows] == [200] * len(follows), [r.text for r in follows]
        assert log_streams.open_streams(api.config) == len(follows)
        time.sleep(2)
        for r in follows:
            r.close()
        assert _open_streams_settle(api.config) == 0, "dropped follows still held by the node"
    _health_answers(api)
    with_follows = [_follow(api, task_id) for _ in range(LimitsConfig.log_streams_per_user)]
    _health_answers(api)
    submitted = api.submit(writer_archive)
    assert submitted.status_code == 201, submitted.text
    for r in with_follows:
        r.close()
    _cancel(api, task_id)
    api.wait(submitted.json()["task"]["id"])


def test_one_user_may_follow_eight_logs_at_once(api, silent_archive):
    """A user cannot hold more than `log_streams_per_user` (8, shipped) follows
    on a web node: the 9th is refused with 429 naming the limit and what to
    do, a read without follow still answers, and another user still follows."""
    bob = Api(api.config, make_user(api.config, "bob"))
    task_id, bobs_task = _running(api, silent_archive), _running(bob, silent_archive)
    follows = [_follow(api, task_id) for _ in range(LimitsConfig.log_streams_per_user)]
    assert [r.status_code for r in follows] == [200] * LimitsConfig.log_streams_per_user
    refused = _follow(api, task_id)
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert body["error"] == "log_streams_per_user"
    assert "log_streams_per_user = 8" in body["message"] and "without follow" in body["message"], body
    assert api("GET", f"/tasks/{task_id}/logs").status_code == 200  # a plain read is never capped
    bobs = _follow(bob, bobs_task)
    assert bobs.status_code == 200, bobs.text
    follows.pop().close()
    deadline = time.monotonic() + 5
    while (again := _follow(api, task_id)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert again.status_code == 200, "a closed follow's slot did not come back"
    for r in (*follows, again, bobs):
        r.close()
    assert _open_streams_settle(api.config) == 0
    _cancel(api, task_id)
    _cancel(bob, bobs_task)


def _worker_threads(master: int) -> int:
    """The OS threads of every gunicorn worker process under `master`."""
    workers = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return sum(len(os.listdir(f"/proc/{pid}/task")) for pid in workers)


def test_idle_follows_hold_no_thread(pink_processes, pink_config, writer_archive):
    """A follow of a silent task holds no thread of pink-web: with the node's
    whole shipped cap (32) held by four users, its worker processes run no
    more threads than before, and a health check and a submit still answer
    at once beside them."""
    config = pink_config
    assert config.limits.log_streams_per_node == LimitsConfig.log_streams_per_node == 32
    web = pink_processes.web()
    pink_processes.worker()
    pink_processes.leader()
    users = [Api(config, make_user(config, name)) for name in ("alice", "bob", "carol", "dave")]
    tasks = [(user, user.submit(writer_archive).json()["task"]["id"]) for user in users]  # no runner: silent
    _health_answers(users[0])
    before = _worker_threads(pink_processes.cluster.pid(web))
    follows = [_follow(user, task_id) for user, task_id in tasks for _ in range(LimitsConfig.log_streams_per_user)]
    try:
        assert [r.status_code for r in follows] == [200] * 32
        assert _open_streams_settle(config, 32) == 32
        after = _worker_threads(pink_processes.cluster.pid(web))
        assert after - before < 8, f"{after - before} more threads with 32 idle follows"
        _health_answers(users[0])
        submitted = users[0].submit(writer_archive)
        assert submitted.status_code == 201, submitted.text
    finally:
        for r in follows:
            r.close()
    assert _open_streams_settle(config) == 0


def test_node_cap_refuses_one_more_follow(pink_processes, config_variant, writer_archive):
    """A web node serves at most `log_streams_per_node` follows (lowered to 3
    here; the shipped value is checked above): one more is refused with 429
    naming the limit, and the node still answers health checks."""
    path = config_variant("node-cap", limits={"log_streams_per_node": 3})
    pink_processes.web(config_path=path)
    pink_processes.worker(config_path=path)
    pink_processes.leader(config_path=path)
    config = pink_config_module.load(path)
    alice = Api(config, make_user(config, "alice"))
    task_id = alice.submit(writer_archive).json()["task"]["id"]  # no runner: it waits, silent
    follows = [_follow(alice, task_id) for _ in range(3)]
    assert [r.status_code for r in follows] == [200] * 3
    refused = _follow(alice, task_id)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"] == "log_streams_per_node"
    assert "log_streams_per_node = 3" in refused.json()["message"]
    _health_answers(alice)
    for r in follows:
        r.close()
    assert _open_streams_settle(config) == 0


def test_followed_log_is_the_log_byte_for_byte(api, chatty_archive):
    """A follower gets exactly the bytes the task wrote (no heartbeat or
    marker in between), through the API and `pink logs -f`, and the follow
    ends when the task does."""
    task_id = api.submit(chatty_archive).json()["task"]["id"]
    api.wait(task_id, states={"running"})
    with _follow(api, task_id) as r:
        assert r.status_code == 200 and r.headers["X-Pink-Log-Attempt"] == "1"
        followed = b"".join(r.iter_content(chunk_size=None))  # returns only once the stream ends
    assert api.task(task_id)["state"] == "succeeded"
    assert followed == CHATTY_LOG
    assert api("GET", f"/tasks/{task_id}/logs").content == CHATTY_LOG
    assert api.cli("logs", task_id, "-f").stdout == CHATTY_LOG.decode()


def test_follow_ended_by_its_time_limit_is_resumed(pink_processes, config_variant, chatty_archive):
    """A follow ends after `log_follow_seconds` even while the task is live
    (shipped: 1 h; 1 s here), and `pink logs -f` resumes it from its offset:
    the user sees every byte once."""
    path = config_variant("follow-time", limits={"log_follow_seconds": 1})
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader):
        start(config_path=path)
    pink_processes.runner(config_path=path)
    config = pink_config_module.load(path)
    assert pink_config_module.Config().limits.log_follow_seconds == 3600
    alice = Api(config, make_user(config, "alice"))
    task_id = alice.submit(chatty_archive).json()["task"]["id"]
    alice.wait(task_id, states={"running"})
    started = time.monotonic()
    with _follow(alice, task_id) as r:
        first = b"".join(r.iter_content(chunk_size=None))
    assert time.monotonic() - started < 4 and alice.task(task_id)["state"] == "running"
    assert CHATTY_LOG.startswith(first)
    assert alice.cli("logs", task_id, "-f").stdout == CHATTY_LOG.decode()
    with _follow(alice, task_id, attempt=1, offset=len(b"one\n")) as r:
        assert r.content == b"two and three\n"


def test_resumed_follow_starts_where_the_last_one_stopped_even_across_attempts():
    """`pink logs -f` resuming a follow neither repeats nor skips a byte, even
    when the line between two attempts arrived split over chunks: it asks for
    the new attempt's log past what it printed of it."""
    place = FollowedLog()
    place.start("1")
    stream = b"one\ntwo" + b"\n[pink: attempt 2 started on run1]\n" + b"again\n"
    for i in range(0, len(stream), 5):
        place.advance(stream[i:i + 5])
    assert place.params() == {"follow": "1", "attempt": 2, "offset": len(b"again\n")}
    place.start("2")  # the resumed response, in the attempt asked for
    place.advance(b"more")
    assert place.params() == {"follow": "1", "attempt": 2, "offset": len(b"again\nmore")}


def test_long_polls_take_the_same_slots_and_never_queue_behind_them(api, silent_archive):
    """A long poll (`GET /tasks/<id>?wait=`) holds a thread like a follow, so it
    takes one of the same slots while it waits; a user whose slots are all
    held gets an answer at once instead of a held thread (the clients pause
    before asking again), so long polls cannot starve a node either."""
    import threading

    task_id = _running(api, silent_archive)
    seen = {"seen": f"running:{api.task(task_id)['attempt']}"}
    answered = []
    poll = threading.Thread(target=lambda: answered.append(
        api("GET", f"/tasks/{task_id}", params={"wait": 8, **seen})), daemon=True)
    poll.start()
    assert _open_streams_settle(api.config, expected=1) == 1  # the waiting poll holds a slot
    poll.join(30)
    assert answered and answered[0].status_code == 200
    assert _open_streams_settle(api.config) == 0
    follows = [_follow(api, task_id) for _ in range(LimitsConfig.log_streams_per_user)]
    assert [r.status_code for r in follows] == [200] * LimitsConfig.log_streams_per_user
    r = requests.get(f"{api.url}/api/v1/tasks/{task_id}", params={"wait": 30, **seen}, timeout=(5, 20),
                     headers={"Authorization": f"Bearer {api.token}"}, verify=api.ca)
    assert r.status_code == 200 and r.json()["task"]["state"] == "running"  # at once, not after 30 s
    for follow in follows:
        follow.close()
    assert _open_streams_settle(api.config) == 0
    _cancel(api, task_id)


def test_a_stopping_web_node_ends_its_follows_cleanly(pink_processes, pink_config, writer_archive):
    """A web node being restarted (SIGTERM: an upgrade) ends its followed logs
    at once, each with a whole answer the client resumes from elsewhere, and
    stops without waiting out its graceful time for them."""
    web = pink_processes.web()
    pink_processes.worker()
    pink_processes.leader()
    alice = Api(pink_config, make_user(pink_config, "alice"))
    task_id = alice.submit(writer_archive).json()["task"]["id"]  # no runner: it waits, silent
    follow = _follow(alice, task_id)
    assert follow.status_code == 200, follow.text
    started = time.monotonic()
    pink_processes.stop(web)
    took = time.monotonic() - started
    assert follow.raw.read() == b""  # a whole (empty) answer: a cut one would raise
    assert took < serve.GRACEFUL_SECONDS / 4, f"the node took {took:.1f}s to stop"
