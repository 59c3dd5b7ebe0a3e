"""dockerd restarts under a running task (a docker.io upgrade; live-restore on).

The container runs on, but every stream the runner had open ends with
dockerd: its log follow, its wait. The restart here is of a private dockerd
(tests/private_dockerd.py), never the shared engine. The runner's follower
(gpu_runner/tasklog.py) must keep the whole log; a whole runner on that
engine must finish the task at attempt 1 with its whole log and its output,
and enforce a deadline that passes while dockerd is down.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone

import pytest
import requests

from gpu_runner import tasklog
from tests.private_dockerd import PrivateDockerd

LINES = 50  # one each 0.2 s: 10 s of output, a dockerd restart in the middle
COUNTER = f"i=0; while [ $i -lt {LINES} ]; do echo line $i; i=$((i+1)); sleep 0.2; done"
WHOLE_LOG = [f"line {i}" for i in range(LINES)]
# sh as PID 1 ignores SIGTERM: the deadline's SIGKILL ends it
TICKER = "sh -c 'while true; do echo tick; sleep 0.2; done'"
TIMEOUT = 8  # seconds a ticking task may run; its SIGTERM is sent STOP_GRACE before
STOP_GRACE = 1


@pytest.fixture(scope="module")
def dockerd():
    """The private engine; the host's docker0 (the shared engine's default
    network) must be as it was: a private dockerd outside its own network
    namespace would delete it."""
    docker0 = os.path.exists("/sys/class/net/docker0")
    engine = PrivateDockerd()
    try:
        engine.start()
        engine.image = engine.import_busybox()
        yield engine
    finally:
        engine.close()
    assert os.path.exists("/sys/class/net/docker0") == docker0, "the private dockerd touched the host's docker0"


def _until(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, what
        time.sleep(interval)
    return result


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


def _exit_code(container, timeout: float = 60) -> int:
    """The container's exit code, waiting through dockerd not answering."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return container.wait(timeout=1)["StatusCode"]
        except (requests.exceptions.ConnectionError, requests.exceptions.ReadTimeout):
            time.sleep(0.2)
    raise AssertionError("the container did not exit")


def test_the_follower_keeps_the_whole_log_across_a_dockerd_restart(dockerd, tmp_path):
    """Docker's follow stream ends when dockerd stops; the follower reads on
    from where it was once dockerd is back, and writes each line once."""
    container = dockerd.client.containers.run(dockerd.image, ["sh", "-c", COUNTER],
                                              detach=True, network_mode="none")
    path = tmp_path / "task.log"
    stop = threading.Event()
    with open(path, "ab", buffering=0) as out:
        follower = threading.Thread(target=tasklog.follow, args=(container, out, stop), daemon=True)
        follower.start()
        _until(lambda: len(_lines(path)) >= 5, 30, "the follower wrote nothing")
        dockerd.restart(down=1.0)
        container.reload()
        assert container.status == "running", "the restart stopped the container (no live-restore?)"
        written = len(_lines(path))
        assert written < LINES, "the container ended before dockerd was back: no restart mid-task"
        assert _exit_code(container) == 0
        follower.join(timeout=30)
        stop.set()
        assert not follower.is_alive(), "the follower did not end after the exit"
    assert _lines(path) == WHOLE_LOG
    container.remove(force=True)


def test_the_seam_is_written_once_when_lines_share_a_timestamp(dockerd, tmp_path):
    """A long line reaches Docker's log in 16 KiB parts stamped alike: a read
    resumed at that stamp skips the parts already written, no more."""
    big = 40_000  # bytes: three parts of one line
    script = f"head -c {big} /dev/zero | tr '\\0' x; echo; echo after"
    container = dockerd.client.containers.run(dockerd.image, ["sh", "-c", script],
                                              detach=True, network_mode="none")
    assert _exit_code(container) == 0
    cursor, out = tasklog.Cursor(), (tmp_path / "seam.log").open("wb")
    frames = list(container.logs(stream=True, timestamps=True))
    for frame in frames[:2]:  # a read cut after two parts of the long line
        stamp, _, line = frame.partition(b" ")
        assert cursor.admit(stamp)
        out.write(line)
    assert cursor.repeats == 2 and frames[0].partition(b" ")[0] == frames[2].partition(b" ")[0]
    tasklog.copy(container, out, cursor)  # resumed from the cursor, as after a restart
    out.close()
    assert (tmp_path / "seam.log").read_text() == "x" * big + "\nafter\n"
    container.remove(force=True)


# ---------------------------------------------------------------- a whole runner on the private engine

@pytest.fixture
def runner_api(dockerd, control_plane, pink_processes, config_variant):
    """web, worker and leader (the shared engine's), and a runner whose Docker is `dockerd`."""
    path = config_variant("private-dockerd", runner={"docker_url": dockerd.url, "stop_grace": STOP_GRACE})
    pink_processes.runner(config_path=path)
    return control_plane


def _seconds(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def _containers(dockerd, task_id: str) -> list:
    return dockerd.client.containers.list(all=True, filters={"label": f"pink.task={task_id}"})


def _followed(api, task_id: str):
    """The task's log, followed as a user does (through web, from the outbox)."""
    api.wait(task_id, states={"running"})
    return api("GET", f"/tasks/{task_id}/logs", params={"follow": 1}, stream=True).iter_lines()


def test_a_task_runs_through_a_dockerd_restart(runner_api, dockerd, slow_archive):
    """dockerd restarts mid-task: the task succeeds at attempt 1, in the same
    container, with its whole log (archived and followed live) and its output."""
    api = runner_api
    cmd = f"sh -c '{COUNTER}; echo finished > /done.txt'"
    task_id = api.submit(slow_archive, cmd=cmd).json()["task"]["id"]
    lines = _followed(api, task_id)
    assert [next(lines) for _ in range(5)] == [line.encode() for line in WHOLE_LOG[:5]]
    (container,) = _containers(dockerd, task_id)
    dockerd.restart(down=1.0)
    container.reload()
    assert container.status == "running", "the restart stopped the container"
    task = api.wait(task_id, timeout=120)
    assert task["state"] == "succeeded" and task["attempt"] == 1, task
    assert api("GET", f"/tasks/{task_id}/logs").text.splitlines() == WHOLE_LOG
    assert [line.decode() for line in lines if line] == WHOLE_LOG[5:]  # one follow, across the restart
    assert api("GET", f"/tasks/{task_id}/output").status_code == 200
    assert _containers(dockerd, task_id) == [], "left behind"


def test_a_deadline_that_passes_while_dockerd_is_down_is_enforced(runner_api, dockerd, slow_archive):
    """dockerd is down when the task's deadline comes: the runner stops the
    container once dockerd is back, and the task timed out (it neither fails
    for a runner error nor leaves the container running)."""
    api = runner_api
    task_id = api.submit(slow_archive, cmd=TICKER, timeout=TIMEOUT).json()["task"]["id"]
    lines = _followed(api, task_id)
    assert next(lines) == b"tick"
    running = _seconds(api.task(task_id)["timings"]["running"])
    assert time.time() < running + TIMEOUT - STOP_GRACE, "too slow to stop dockerd before the deadline"
    dockerd.stop()
    time.sleep(max(0.0, running + TIMEOUT + 2 - time.time()))
    dockerd.start()
    task = api.wait(task_id, timeout=60)
    assert task["state"] == "timed_out" and task["attempt"] == 1, task
    assert task["error"] == f"timed out after {TIMEOUT}s", task
    _until(lambda: _containers(dockerd, task_id) == [], 30, "the container was left behind")
