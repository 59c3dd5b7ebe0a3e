"""A runner restarts without touching its containers (issue 19): a stop
(SIGTERM, as `systemctl restart` and an upgrade send) or a crash leaves the
container running, and the runner's next process carries the task on at the
same attempt while the lease lasts. After the lease, the task is re-queued
(`test_faults.py::test_runner_killed_mid_task_is_retried`)."""

from __future__ import annotations

import time

import pytest

from pink.config import Config
from pink.store import Store
from tests.helpers import wait_requeued

# Prints a line, stays silent long enough for a restart, prints the rest.
CMD = "sh -c 'echo start; sleep 12; echo middle; sleep 1; echo end; echo finished > /done.txt'"
WHOLE_LOG = ["start", "middle", "end"]


@pytest.fixture
def shipped_ttl(config_variant) -> str:
    """A config whose runner lease is the shipped one (10 s; the tests' is 3 s)."""
    assert Config.node_ttl == 10
    return config_variant("shipped-ttl", node_ttl=Config.node_ttl)


def _container(docker_client, task_id: str):
    found = docker_client.containers.list(all=True, filters={"label": f"pink.task={task_id}"})
    assert len(found) == 1, found
    return found[0]


def _running_task(api, pink_processes, shipped_ttl, archive) -> tuple[str, str, object]:
    """A task whose container has printed its first line; the runner's name, the follow's lines."""
    runner = pink_processes.runner(config_path=shipped_ttl)
    task_id = api.submit(archive, cmd=CMD).json()["task"]["id"]
    api.wait(task_id, states={"running"})
    followed = api("GET", f"/tasks/{task_id}/logs", params={"follow": 1}, stream=True)
    lines = followed.iter_lines()
    assert next(lines) == b"start"
    return task_id, runner, lines


def _carried_on(api, docker_client, task_id: str, container_id: str, lines) -> None:
    """The task ended at attempt 1, in the same container, with its whole log."""
    task = api.wait(task_id, timeout=120)
    assert task["state"] == "succeeded" and task["attempt"] == 1, task
    assert api("GET", f"/tasks/{task_id}/logs").text.split() == WHOLE_LOG
    assert [line for line in lines if line] == [b"middle", b"end"]  # one follow, across the restart
    output = api("GET", f"/tasks/{task_id}/output")
    assert output.status_code == 200, output.text
    assert container_id not in {c.id for c in docker_client.containers.list(all=True)}, "left behind"


def test_a_restarted_runner_carries_on_its_running_task(control_plane, pink_processes, shipped_ttl,
                                                        slow_archive, docker_client):
    """`systemctl restart pink-runner` mid-task: the container runs on through
    the restart, and the task succeeds at attempt 1 with its whole log."""
    api = control_plane
    task_id, runner, lines = _running_task(api, pink_processes, shipped_ttl, slow_archive)
    container = _container(docker_client, task_id)
    pink_processes.stop(runner)  # SIGTERM: a planned stop
    container.reload()
    assert container.status == "running", "the stop touched the container"
    store = Store.from_config(api.config)
    assert store.get(store.keys.task(task_id)).value.attempt == 1
    pink_processes.runner(config_path=shipped_ttl)
    _carried_on(api, docker_client, task_id, container.id, lines)


def test_a_runner_killed_and_started_within_its_lease_carries_on(control_plane, pink_processes, shipped_ttl,
                                                                slow_archive, docker_client):
    """A runner killed with SIGKILL and started again while its lease lasts
    carries its task on the same way: attempt 1, the whole log."""
    api = control_plane
    task_id, runner, lines = _running_task(api, pink_processes, shipped_ttl, slow_archive)
    container = _container(docker_client, task_id)
    pink_processes.kill(runner)
    pink_processes.runner(config_path=shipped_ttl)
    _carried_on(api, docker_client, task_id, container.id, lines)


def test_a_task_that_ended_during_the_restart_is_exported(control_plane, pink_processes, shipped_ttl,
                                                          slow_archive, docker_client):
    """A container that exited while no runner process watched it is found
    exited by the next one, exported and reported at attempt 1."""
    api = control_plane
    runner = pink_processes.runner(config_path=shipped_ttl)
    task_id = api.submit(slow_archive, cmd="sh -c 'echo start; sleep 2; echo end'").json()["task"]["id"]
    api.wait(task_id, states={"running"})
    container = _container(docker_client, task_id)
    pink_processes.stop(runner)
    deadline = time.monotonic() + 30
    while container.reload() or container.status != "exited":
        assert time.monotonic() < deadline, container.status
        time.sleep(0.2)
    pink_processes.runner(config_path=shipped_ttl)
    task = api.wait(task_id, timeout=60)
    assert task["state"] == "succeeded" and task["attempt"] == 1, task
    assert api("GET", f"/tasks/{task_id}/logs").text.split() == ["start", "end"]


def test_a_runner_stopped_past_its_lease_is_a_lost_node(control_plane, pink_processes, slow_archive,
                                                        docker_client):
    """A runner that stays stopped longer than its lease (3 s here) lost its
    node: the task is re-queued (fenced by the old epoch), and the next
    process removes the container the stop left running before it runs attempt 2."""
    api = control_plane
    runner = pink_processes.runner()
    task_id = api.submit(slow_archive, cmd=CMD).json()["task"]["id"]
    api.wait(task_id, states={"running"})
    first = _container(docker_client, task_id)
    pink_processes.stop(runner)
    store = Store.from_config(api.config)
    wait_requeued(store, task_id)
    pink_processes.runner()
    task = api.wait(task_id, timeout=120)
    assert task["state"] == "succeeded" and task["attempt"] == 2, task
    assert first.id not in {c.id for c in docker_client.containers.list(all=True)}
