"""A worker killed with SIGKILL stalls nothing: its key expires a lease
(`node_ttl`) after its death, a replacement under the same fixed name (as the
systemd unit names it) registers at once, and the job it was running is retried.

Workers here get fixed RQ names (`pink_processes.worker` lets RQ pick one).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from redis import Redis
from rq import Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from pink.tasks import job_id
from queue_workers.queues import enqueue_sweep, transfer_queue
from tests import images
from tests.helpers import Api, make_user

RQ_NAME = "web1-1"  # <inventory host>-<unit instance>, as pink-worker@.service names it
BIG_MIB = 256  # random, so neither compression nor a cache makes its copy quick


@pytest.fixture
def big_archive(docker_client, tmp_path):
    """An image with one layer of BIG_MIB random MiB: its copy lasts long enough to be caught
    midway. Fresh for each test (Docker caches the layer): no runner holds it yet."""
    return images.fresh_archive(
        docker_client, "big", tmp_path / "big.tar",
        f"RUN dd if=/dev/urandom of=/blob bs=1M count={BIG_MIB} 2>/dev/null\n"
        'CMD ["sh", "-c", "echo survived > /out.txt"]\n')


@pytest.fixture
def redis(pink_config):
    client = Redis.from_url(pink_config.redis_url)
    yield client
    client.close()


def start_named_worker(pink_processes, name: str = RQ_NAME, config_path: str | None = None) -> str:
    """Start pink-worker under the RQ name `name`; returns its process name.
    start_pink fails if it exits in its first second, as RQ's refusal of a
    taken name would make it."""
    proc = f"{pink_processes.tag}-worker-{name}"
    if proc not in pink_processes.started:
        pink_processes.started.append(proc)  # stopped with the test's other processes
    pink_processes.cluster.start_pink(proc, "pink-worker", config_path or pink_processes.config.path,
                                      ("--name", name))
    return proc


def wait_registered(redis: Redis, pid: int, name: str = RQ_NAME, timeout: float = 10) -> None:
    """Until the worker key under `name` is the process `pid`'s."""
    key = Worker.redis_worker_namespace_prefix + name
    deadline = time.monotonic() + timeout
    while redis.hget(key, "pid") != str(pid).encode():
        assert time.monotonic() < deadline, f"pid {pid} never registered as {name}: {redis.hgetall(key)}"
        time.sleep(0.05)


MID_COPY = 16 * 2**20  # bytes only the big layer's part file reaches (the base layer is ~2 MiB)


def _big_part(spool: Path) -> bool:
    """A part file of the big layer (not of the config, whose copy ends at once)."""
    for part in spool.glob("incoming/*.part"):
        try:
            if part.stat().st_size >= MID_COPY:
                return True
        except FileNotFoundError:  # renamed meanwhile: complete
            pass
    return False


def wait_mid_copy(redis: Redis, spool: Path, jid: str, timeout: float = 120) -> None:
    """Until the transfer job runs and the big layer's part file is in the runner's spool."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            started = Job.fetch(jid, connection=redis).get_status() == JobStatus.STARTED
        except NoSuchJobError:  # not enqueued yet
            started = False
        if started and _big_part(spool):
            return
        assert time.monotonic() < deadline, "the transfer never started copying"
        time.sleep(0.01)


def test_a_killed_workers_name_is_taken_over_at_once(pink_processes, config_variant, redis):
    # A lease far longer than a start: registering in time proves the name was taken over.
    lease = 30
    path = config_variant("long-lease", node_ttl=lease)
    cluster = pink_processes.cluster
    first = start_named_worker(pink_processes, config_path=path)
    wait_registered(redis, cluster.pid(first))
    assert 0 < redis.ttl(Worker.redis_worker_namespace_prefix + RQ_NAME) <= lease  # not 6 h
    pink_processes.kill(first)
    second = start_named_worker(pink_processes, config_path=path)
    wait_registered(redis, cluster.pid(second))
    assert "took the name over" in pink_processes.log(second)


def test_a_killed_workers_key_expires_within_the_lease(pink_config, pink_processes, redis):
    worker = start_named_worker(pink_processes)
    wait_registered(redis, pink_processes.cluster.pid(worker))
    pink_processes.kill(worker)
    killed = time.monotonic()
    key = Worker.redis_worker_namespace_prefix + RQ_NAME
    while redis.exists(key):
        assert time.monotonic() - killed < pink_config.node_ttl + 1, "the dead worker still looks alive"
        time.sleep(0.05)


@pytest.mark.parametrize("name, lease, delay", [
    # At once, well inside a 10 s lease (the default) even on a busy machine:
    # it takes the name over and fails the dead worker's job itself.
    (RQ_NAME, 10, 0.0),
    # After the dead worker's key expired: job_status sees a worker born after the job started.
    (RQ_NAME, 3, 3.5),
    # Under another name: job_status finds no worker under the job's name.
    ("web1-2", 3, 0.0),
], ids=["same-name-at-once", "same-name-after-lease", "other-name"])
def test_worker_killed_mid_copy_is_replaced_and_the_task_finishes(pink_config, config_variant, pink_processes,
                                                                  redis, big_archive, name, lease, delay):
    c = pink_config
    cluster = pink_processes.cluster
    workers = config_variant("workers", node_ttl=lease)
    pink_processes.web()
    pink_processes.leader()
    pink_processes.runner()
    worker = start_named_worker(pink_processes, config_path=workers)
    api = Api(c, make_user(c, "alice"))
    r = api.submit(big_archive, output="/out.txt")  # not the whole 256 MiB filesystem
    assert r.status_code == 201, r.text
    task_id = r.json()["task"]["id"]
    spool = cluster.spool_dir("run1")
    wait_mid_copy(redis, spool, job_id(task_id, "transfer", 1))

    pink_processes.kill(worker)  # SIGKILL to its process group: its second SFTP stream too
    killed = time.monotonic()
    assert any(spool.glob("incoming/*.part")), "the copy ended before the kill"
    time.sleep(delay)
    replacement = start_named_worker(pink_processes, name, config_path=workers)
    wait_registered(redis, cluster.pid(replacement), name)

    task = api.wait(task_id, timeout=lease + 30 - (time.monotonic() - killed))
    assert task["state"] == "succeeded", task
    took_over = "took the name over" in pink_processes.log(replacement)
    assert took_over == (delay == 0.0 and name == RQ_NAME), pink_processes.log(replacement)[-3000:]


def test_a_sweep_a_dead_worker_took_is_queued_again(redis):
    """A worker takes a job id off its queue before it marks the job started; killed in
    between, a sweep would stay `queued` in no queue and block every later sweep."""
    assert enqueue_sweep(redis, "host-a", taken_after=3)
    assert not enqueue_sweep(redis, "host-a", taken_after=3)  # one at a time
    queue = f"rq:queue:{transfer_queue('host-a')}"
    assert redis.lrem(queue, 0, "sweep-host-a") == 1  # what the dead worker's BLPOP did
    assert not enqueue_sweep(redis, "host-a", taken_after=3)  # a live worker may be about to start it
    time.sleep(3.5)
    assert enqueue_sweep(redis, "host-a", taken_after=3)
    assert redis.lrange(queue, 0, -1) == [b"sweep-host-a"]
    time.sleep(3.5)
    assert not enqueue_sweep(redis, "host-a", taken_after=3)  # waiting in its queue: left there
    assert redis.lrange(queue, 0, -1) == [b"sweep-host-a"]
