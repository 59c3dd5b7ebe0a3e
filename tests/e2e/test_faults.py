"""Losing a runner mid-task, or Redis' data, loses no task and duplicates none."""

from __future__ import annotations

import os
import shutil
import time

from redis import Redis

from pink import archive, db, recipes
from pink.image_archive import inspect
from pink.store import Store
from pink.tasks import State, advance
from queue_workers.queues import transfer_queue
from tests import images
from tests.helpers import Api, make_user, wait_requeued


def test_runner_killed_mid_task_is_retried(control_plane, pink_processes, slow_archive, docker_client):
    runner = pink_processes.runner()
    task_id = control_plane.submit(slow_archive).json()["task"]["id"]
    control_plane.wait(task_id, states={"running"})
    followed = control_plane("GET", f"/tasks/{task_id}/logs", params={"follow": 1}, stream=True)
    lines = followed.iter_lines()
    assert next(lines) == b"start"  # attempt 1 is running
    pink_processes.kill(runner)
    store = Store.from_config(control_plane.config)
    wait_requeued(store, task_id)  # the lease expires (node_ttl=3 s) and the leader sends the task back
    pink_processes.runner()  # the same runner, back with a new epoch
    task = control_plane.wait(task_id, timeout=120)
    assert task["state"] == "succeeded" and task["attempt"] == 2
    # One followed log carries on into the new attempt, from its beginning.
    assert [line for line in lines if line] == [b"[pink: attempt 2 started on run1]", b"start"]
    conn = db.connect(control_plane.config.db)
    try:
        row = archive.get_record(conn, task_id)
    finally:
        conn.close()
    states = [h[1] for h in row.history]
    assert states.count("running") == 2 and states.count("succeeded") == 1
    assert "lost" in " ".join(h[2] for h in row.history)
    # The first attempt's container was removed by the new incarnation.
    assert docker_client.containers.list(all=True, filters={"label": f"pink.task={task_id}"}) == []


def test_redis_flushed_while_tasks_wait(control_plane, pink_processes, slow_archive):
    pink_processes.stop(next(n for n in pink_processes.started if "worker" in n))
    pink_processes.runner()
    ids = [control_plane.submit(slow_archive, cmd="echo quick").json()["task"]["id"] for _ in range(3)]
    redis = Redis.from_url(control_plane.config.redis_url)
    deadline = time.monotonic() + 20
    while len(redis.keys("rq:job:*")) < 3:  # placed by the leader, their transfers wait for a worker
        assert time.monotonic() < deadline, "the leader placed nothing"
        time.sleep(0.2)
    assert redis.flushdb()  # every job is lost (the leader may enqueue again at once: its repair)
    pink_processes.worker(n=2)
    for task_id in ids:
        assert control_plane.wait(task_id, timeout=120)["state"] == "succeeded"


def test_a_job_a_dead_worker_took_before_starting_it_is_queued_again(control_plane, pink_processes,
                                                                     slow_archive):
    """A worker takes a job id off its queue before it marks the job started: killed in
    between, it leaves the job `queued` in no queue (the lab's fault matrix caught one
    waiting 13 minutes). The leader puts it back."""
    pink_processes.stop(next(n for n in pink_processes.started if "worker" in n))
    pink_processes.runner()
    task_id = control_plane.submit(slow_archive, cmd="echo quick").json()["task"]["id"]
    redis = Redis.from_url(control_plane.config.redis_url)
    jid = f"{task_id}-transfer-1"
    queue = f"rq:queue:{transfer_queue(control_plane.config.host)}"
    deadline = time.monotonic() + 20
    while not redis.lrem(queue, 0, jid):  # what the dead worker's BLPOP did
        assert time.monotonic() < deadline, "the leader placed nothing"
        time.sleep(0.1)
    assert redis.hget(f"rq:job:{jid}", "status") == b"queued"
    pink_processes.worker()
    assert control_plane.wait(task_id, timeout=120)["state"] == "succeeded"


def test_database_outage_delays_the_archive_but_loses_nothing(control_plane, pink_processes, slow_archive, cluster):
    pink_processes.runner()
    task_id = control_plane.submit(slow_archive, cmd="echo during the outage").json()["task"]["id"]
    store = Store.from_config(control_plane.config)
    state = lambda: store.get(store.keys.task(task_id)).value.state  # noqa: E731
    cluster.stop("mariadb")
    try:
        deadline = time.monotonic() + 60
        while state() not in {"exported", "succeeded"}:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(3)
        assert state() == "exported"  # finished running, but not acknowledged as archived
    finally:
        cluster.start_mariadb()
    task = control_plane.wait(task_id, timeout=120)
    assert task["state"] == "succeeded"
    conn = db.connect(control_plane.config.db)
    try:
        assert archive.get_record(conn, task_id).state == "succeeded"
        assert b"during the outage" in archive.get_logs(conn, task_id)
    finally:
        conn.close()


def test_leader_killed_another_takes_over(control_plane, pink_processes, slow_archive):
    pink_processes.leader(role="leader2")
    store = Store.from_config(control_plane.config)
    deadline = time.monotonic() + 20
    while store.get(store.keys.leader) is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first = store.get(store.keys.leader)
    holder_pid = int(first.value["holder"].rsplit("/", 1)[1])
    name = next(n for n in pink_processes.started
                if "leader" in n and pink_processes.cluster.pid(n) == holder_pid)
    pink_processes.kill(name)
    ids = [control_plane.submit(slow_archive, cmd="echo quick").json()["task"]["id"] for _ in range(2)]
    Redis.from_url(control_plane.config.redis_url).flushdb()  # only a leader can bring these jobs back
    pink_processes.runner()
    for task_id in ids:
        assert control_plane.wait(task_id, timeout=120)["state"] == "succeeded"
    second = store.get(store.keys.leader)
    assert second.create_revision != first.create_revision


def test_a_transfer_that_keeps_failing_fails_its_task(pink_processes, pink_config, config_variant,
                                                      docker_client, tmp_path):
    c = pink_config
    archive_path = images.fresh_archive(docker_client, "lost", tmp_path / "lost.tar")  # no runner holds it
    path = config_variant("gives-up", max_job_failures=2)
    pink_processes.web(path)
    control_plane = Api(c, make_user(c, "alice"))
    task_id = control_plane.submit(archive_path).json()["task"]["id"]
    pink_processes.runner(config_path=path)
    incoming = os.path.join(c.runner.spool_dir, "incoming")  # made by the runner at its start
    deadline = time.monotonic() + 20
    while not os.path.isdir(incoming):
        assert time.monotonic() < deadline, "the runner made no incoming directory"
        time.sleep(0.1)
    shutil.rmtree(incoming)
    with open(incoming, "w") as fh:  # a file where the copies go: every copy fails
        fh.write("in the way")
    for start in (pink_processes.worker, pink_processes.leader):
        start(config_path=path)
    task = control_plane.wait(task_id, timeout=60)
    assert task["state"] == "failed" and "transfer failed 2 times" in task["error"], task
    assert task["failure"]["cause"] == "transfer_failed", task
    store = Store.from_config(c)
    assert store.get(store.keys.alloc("run1")) is None  # its reservation was released


def _recipe(config, task_id: str) -> dict:
    store = Store.from_config(config)
    try:
        return store.get(store.keys.task(task_id)).value.image["recipe"]
    finally:
        store.close()


def test_an_image_whose_layers_are_gone_or_damaged_fails_at_once(pink_processes, pink_config, docker_client, tmp_path):
    """Blobs live tasks need are never collected; if one is lost or damaged anyway, the task fails saying so."""
    c = pink_config
    archive_path = images.fresh_archive(docker_client, "gone", tmp_path / "gone.tar")
    pink_processes.web()
    control_plane = Api(c, make_user(c, "alice"))
    task_id = control_plane.submit(archive_path).json()["task"]["id"]
    other = control_plane.submit(images.fresh_archive(docker_client, "damaged", tmp_path / "damaged.tar"))
    other_id = other.json()["task"]["id"]
    blob_dir = os.path.join(c.web.blob_root, "sha256")
    os.remove(os.path.join(blob_dir, _recipe(c, task_id)["layers"][-1]))
    with open(os.path.join(blob_dir, _recipe(c, other_id)["config"]), "r+b") as config:
        config.truncate(10)
    for start in (pink_processes.worker, pink_processes.leader, pink_processes.runner):
        start()
    for failed in (task_id, other_id):
        task = control_plane.wait(failed, timeout=60)
        assert task["state"] == "failed" and "missing or damaged on web node" in task["error"], task


def test_a_blob_the_runner_lost_after_the_transfer_looked_is_copied_again(pink_processes, pink_config,
                                                                        docker_client, tmp_path):
    """The runner's store collected a layer between the transfer's look (its marker said held) and the
    load: the task goes back to the queue, and the next attempt copies the layer and runs."""
    c = pink_config
    archive_path = images.fresh_archive(docker_client, "collected", tmp_path / "collected.tar",
                                        "RUN echo collected > /layer\n")
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader, pink_processes.runner):
        start()
    api = Api(c, make_user(c, "alice"))
    first = api.wait(api.submit(archive_path).json()["task"]["id"], timeout=120)
    assert first["state"] == "succeeded", first
    layer = recipes.Recipe.from_archive(archive_path, inspect(archive_path))[0].layers[-1]
    docker_client.images.remove(first["image"]["image_id"], force=True)  # the next task must load it
    os.remove(os.path.join(c.runner.blob_root, "sha256", layer))  # the marker in spool/held stays
    second = api.wait(api.submit(archive_path).json()["task"]["id"], timeout=120)
    assert second["state"] == "succeeded" and second["attempt"] == 2, second
    assert any("copying it again" in entry["detail"] for entry in second["history"]), second["history"]


def test_a_task_left_transferred_is_handed_over_by_the_leader(pink_processes, pink_config, docker_client,
                                                              tmp_path):
    """The transfer job assigns what it copied in one transaction; a task found `transferred` (as an
    earlier version left them) is assigned by the leader's repair."""
    c = pink_config
    archive_path = images.fresh_archive(docker_client, "handover", tmp_path / "handover.tar", images.WRITER)
    pink_processes.web()
    worker = pink_processes.worker()
    pink_processes.leader()
    pink_processes.runner()
    api = Api(c, make_user(c, "alice"))
    first = api.wait(api.submit(archive_path).json()["task"]["id"], timeout=120)  # the runner holds the image
    assert first["state"] == "succeeded", first
    assert [h["state"] for h in first["history"]][2:4] == ["transferred", "assigned"], first["history"]
    pink_processes.stop(worker)
    task_id = api.submit(archive_path).json()["task"]["id"]
    store = Store.from_config(c)
    try:
        deadline = time.monotonic() + 60
        while (rec := store.get(store.keys.task(task_id))).value.state != State.PLACED:
            assert time.monotonic() < deadline, rec.value
            time.sleep(0.1)
        left = advance(rec.value, State.TRANSFERRED, "left here by the test")  # as v0.2's leader wrote it
        assert store.txn().expect(rec).put(rec.key, left).commit()
    finally:
        store.close()
    pink_processes.worker()
    second = api.wait(task_id, timeout=120)
    assert second["state"] == "succeeded" and second["attempt"] == 1, second
    details = {h["state"]: h["detail"] for h in second["history"]}
    assert details["transferred"] == "left here by the test" and "epoch" in details["assigned"], details
