"""The runner under faults and tampering, on real services.

etcd paused (SIGSTOP) while a task loads its image or finishes; a cached image
a placed task needs while another load evicts; links planted in the outbox
by the transfer account; old outbox files no live task needs.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import stat
import time
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from gpu_runner.agent import OUTBOX_GRACE
from pink import config as pink_config_module
from pink.store import Store
from pink.tasks import Params, State, new_record
from tests import images
from tests.helpers import Api, files_in_output, make_user

WRITER = 'CMD ["sh", "-c", "echo hello from pink > /result.txt; echo done"]\n'
FINISHER = 'CMD ["sh", "-c", "echo start; sleep 2; echo finished > /done.txt; echo end"]\n'
BULKY = 'RUN dd if=/dev/zero of=/blob bs=1M count=96\nCMD ["sh", "-c", "echo loaded > /done.txt"]\n'
ETCD_TIMEOUT = 5.0  # seconds a PINK process waits for an etcd answer (pink.store.Store)
PAUSE = ETCD_TIMEOUT + 3  # seconds etcd stays paused: a call made in the pause times out
BLIP_TTL = 20  # node and leader TTL of the blip tests: a lease outlives the pause


def _start(pink_processes, path: str, runner: bool = True) -> None:
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader):
        start(config_path=path)
    if runner:
        pink_processes.runner(config_path=path)


def _seconds(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def _until(check, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, what
        time.sleep(interval)
    return result


@contextlib.contextmanager
def etcd_paused(cluster):
    """etcd frozen (a member hung or restarting): connections stay open, nothing answers."""
    pid = cluster.pid("etcd")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _cached(docker_client) -> set[str]:
    return {t.split(":", 1)[1] for i in docker_client.images.list(name="pink/cache") for t in i.tags}


@pytest.fixture(scope="module")
def finisher_archive(docker_client, tmp_path_factory):
    return images.build_archive(docker_client, "pink/test-finisher:1", FINISHER,
                                tmp_path_factory.mktemp("finisher") / "finisher.tar")


@pytest.fixture
def blip_api(pink_processes, pink_config, config_variant):
    path = config_variant("blip", node_ttl=BLIP_TTL, leader_ttl=BLIP_TTL)
    _start(pink_processes, path)
    return Api(pink_config_module.load(path), make_user(pink_config, "alice"))


# ---------------------------------------------------------------- etcd blips


def test_etcd_blip_while_a_task_finishes_delays_its_report(blip_api, cluster, finisher_archive,
                                                           docker_client):
    api = blip_api
    task_id = api.submit(finisher_archive, output="/done.txt").json()["task"]["id"]
    api.wait(task_id, states={"running"})
    container = _until(lambda: docker_client.containers.list(filters={"label": f"pink.task={task_id}"}),
                       30, "the task's container never ran")[0]
    with etcd_paused(cluster):
        _until(lambda: container.reload() or container.status == "exited", 30, "the container never exited")
        time.sleep(PAUSE)  # the runner exports and tries to report meanwhile
        resumed = time.time()
    task = api.wait(task_id, timeout=120)
    assert task["state"] == "succeeded" and task["attempt"] == 1, task  # neither failed nor run again
    assert _seconds(task["timings"]["exported"]) >= resumed - 1
    output = api("GET", f"/tasks/{task_id}/output").content
    assert files_in_output(output) == {"done.txt": b"finished\n"}
    assert "end" in api("GET", f"/tasks/{task_id}/logs").text


def test_etcd_blip_while_the_image_loads(blip_api, cluster, docker_client, tmp_path):
    api, store = blip_api, Store.from_config(blip_api.config)
    archive = images.fresh_archive(docker_client, "bulky", tmp_path / "bulky.tar", BULKY)
    task_id = api.submit(archive, output="/done.txt").json()["task"]["id"]

    def running() -> bool:
        rec = store.get(store.keys.task(task_id))
        return rec is not None and rec.value.state == "running"

    _until(running, 120, "the task never started", interval=0.005)  # then the runner loads the image
    with etcd_paused(cluster):
        paused = time.time()  # the load ends in the pause: evicting and publishing need etcd
        time.sleep(PAUSE)
        resumed = time.time()
    task = api.wait(task_id, timeout=120)
    assert task["state"] == "succeeded" and task["attempt"] == 1, task
    loaded = _seconds(task["timings"]["running"]) + task["timings"]["image_load_seconds"]
    assert paused < loaded < resumed - ETCD_TIMEOUT, "the load did not end early in the pause: resize BULKY"
    assert files_in_output(api("GET", f"/tasks/{task_id}/output").content) == {"done.txt": b"loaded\n"}


# ---------------------------------------------------------------- the image cache


def test_eviction_spares_the_image_of_a_placed_task(pink_processes, pink_config, config_variant,
                                                    docker_client, tmp_path):
    path = config_variant("evict", runner={"image_cache_bytes": 1})  # all but the spared go
    _start(pink_processes, path)
    api = Api(pink_config_module.load(path), make_user(pink_config, "alice"))
    placed, other = (images.fresh_archive(docker_client, "evict", tmp_path / f"e{n}.tar", WRITER)
                     for n in range(2))
    first = api.wait(api.submit(placed).json()["task"]["id"])
    sha = first["image"]["sha256"]
    assert first["state"] == "succeeded" and sha in _cached(docker_client)
    # A task placed here, not started yet: its transfer skipped the copy since
    # the node record listed the image, so the cache is its only copy.
    store = Store.from_config(pink_config)
    assert store.create(store.keys.alloc("run1"), {"0123456789ab": {"gpus": [], "attempt": 1, "image": sha}})
    second = api.wait(api.submit(other).json()["task"]["id"])
    assert second["state"] == "succeeded" and second["timings"]["image_load_seconds"] > 0
    assert sha in _cached(docker_client)  # spared by its reservation
    assert "0123456789ab" in store.get(store.keys.alloc("run1")).value


# ---------------------------------------------------------------- the outbox


def _victim(tmp_path) -> tuple[str, bytes]:
    """A root-owned file outside the outbox that a planted link points to."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's own file\n")
    os.chmod(victim, 0o644)
    return str(victim), victim.read_bytes()


def _assert_untouched(victim: str, content: bytes) -> None:
    st = os.stat(victim)
    with open(victim, "rb") as fh:
        assert fh.read() == content
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)


def _plant_link(outbox: str, name: str, target: str, account: str, age: float = 0.0) -> str:
    """A link the transfer account made in its outbox (it owns the directory)."""
    link = os.path.join(outbox, name)
    os.symlink(target, link)
    user = pwd.getpwnam(account)
    os.lchown(link, user.pw_uid, user.pw_gid)
    if age:
        os.utime(link, (time.time() - age,) * 2, follow_symlinks=False)
    return link


def test_runner_never_writes_through_links_planted_in_the_outbox(pink_processes, pink_config, docker_client,
                                                                 tmp_path):
    c = pink_config
    _start(pink_processes, c.path, runner=False)
    api = Api(c, make_user(c, "alice"))
    archive = images.build_archive(docker_client, "pink/test-writer:1", WRITER, tmp_path / "writer.tar")
    task_id = api.submit(archive).json()["task"]["id"]  # waits: no runner yet
    victim, content = _victim(tmp_path)
    for suffix in (".log", ".tar.zst.part", ".tar.zst"):
        _plant_link(c.runner.outbox_dir, f"{task_id}-1{suffix}", victim, c.runner.ssh_user)
    pink_processes.runner()
    task = api.wait(task_id, timeout=120)
    assert task["state"] == "succeeded", task
    _assert_untouched(victim, content)
    output = files_in_output(api("GET", f"/tasks/{task_id}/output").content)
    assert output["result.txt"] == b"hello from pink\n"
    assert "done" in api("GET", f"/tasks/{task_id}/logs").text


def test_runner_sweeps_outbox_files_no_live_task_needs(pink_processes, pink_config, tmp_path):
    c = pink_config
    outbox, old = c.runner.outbox_dir, 2 * OUTBOX_GRACE
    store = Store.from_config(c)
    waiting = "aaaaaaaaaaaa"  # attempt 2 exported here, waiting for its finalize
    record = replace(new_record(waiting, "alice", Params(), {"sha256": "0" * 64, "size": 10}, "web1"),
                     state=State.EXPORTED, node="run1", attempt=2)
    assert store.create(store.keys.task(waiting), record)
    stale = [f"{waiting}-1.log", f"{waiting}-1.tar.zst", "bbbbbbbbbbbb-1.log", "bbbbbbbbbbbb-1.tar.zst.part",
             "not-a-task-file"]
    kept = [f"{waiting}-2.log", f"{waiting}-2.tar.zst"]
    fresh = ["cccccccccccc-1.tar.zst"]  # within its grace: it may be being written
    for name in stale + kept + fresh:
        with open(os.path.join(outbox, name), "wb") as fh:
            fh.write(b"an export or log")
        if name not in fresh:
            os.utime(os.path.join(outbox, name), (time.time() - old,) * 2)
    victim, content = _victim(tmp_path)
    link = _plant_link(outbox, "dddddddddddd-1.log", victim, c.runner.ssh_user, age=old)
    pink_processes.runner()
    gone = lambda: not any(os.path.lexists(os.path.join(outbox, n)) for n in stale + [link])  # noqa: E731
    _until(gone, 20, "old outbox files no task needs were never swept", interval=0.2)
    assert all(os.path.exists(os.path.join(outbox, n)) for n in kept + fresh)
    _assert_untouched(victim, content)


def test_a_cpu_limit_above_the_hosts_cores_runs_on_all_of_them(pink_processes, config_variant, docker_client,
                                                              tmp_path):
    """`cpus` larger than the host (a config shared by big and small runners): Docker refuses such a
    limit, so the runner caps it at the cores there are instead of failing every task."""
    path = config_variant("cpus", runner={"cpus": float(os.cpu_count() + 8)})
    _start(pink_processes, path)
    config = pink_config_module.load(path)
    api = Api(config, make_user(config, "alice"))
    archive = images.fresh_archive(docker_client, "cpus", tmp_path / "cpus.tar", WRITER)
    task = api.wait(api.submit(archive).json()["task"]["id"], timeout=120)
    assert task["state"] == "succeeded", task
    container_cpus = docker_client.info()["NCPU"]
    assert f"CPU limit {float(container_cpus):.2f}" in pink_processes.log(pink_processes.started[-1])
