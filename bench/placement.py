"""Placements per second: PINK's queue planner alone, and the whole
production path with a thousand runners registered in etcd (issue 3).

`measure`: 1,000 simulated runners with 8 GPUs each and 10,000 waiting tasks
from 50 users with mixed GPU counts; one `placement.plan` pass over the
whole queue, pure logic, no services.

`live`: the same shapes, for real. In a namespace of its own (etcd prefix,
Redis database) the tasks are records written as pink-web's submit writes
them, and a leader and queue workers run. Once the leader lists every task
as waiting, the runners register: node records under a lease the benchmark
keeps alive (GPU inventories, no runner processes; every runner already
holds every image, so no copy is attempted). Production then places them:
the leader reads the queue and the runners from etcd, plans, commits the
placements runner by runner and enqueues their transfer jobs, which the
workers run. The clock stops when the leader publishes the queue it has
left after its last commit; the tasks' states are counted afterwards.

Nomad's two-million-container run placed about 1,500 per second; the
target is 2,000.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter

from redis import Redis

from pink import config as pink_config, scheduler
from pink.placement import plan
from pink.store import Store
from pink.nodes import NodeView
from pink.tasks import Params, Task, new_record
from queue_workers.placing import PUBLISHED_POSITIONS

TARGET = 2000  # placements per second
GPUS_PER_RUNNER = 8
IMAGES = 40  # distinct images among the tasks
LIVE_PREFIX = "/pink-bench-place"  # the live measurement's etcd namespace
LIVE_REDIS_DB = 2  # and its Redis database (the cluster's own is 0)
TXN_PUTS = 64  # records per etcd transaction when writing (etcd allows 128 operations)
LEASE_TTL = 60  # seconds: the simulated runners' lease, kept alive while the benchmark runs


def _snapshot(store: Store) -> scheduler.Snapshot:
    """Read straight from etcd, as the leader's mirror does once at its start:
    tasks first, so any epoch a task carries exists when runners are read."""
    keys = store.keys
    parts = {prefix: store.list(prefix) for prefix in (keys.tasks, keys.nodes, keys.allocs, keys.controls,
                                                       keys.webs)}
    return scheduler.Snapshot.of(keys, parts)

def simulated(runners: int, tasks: int, seed: int = 1) -> tuple[list[NodeView], list[Task]]:
    rng = random.Random(seed)
    nodes = [NodeView(name=f"n{i}", epoch=i + 1, gpus=[f"n{i}-g{j}" for j in range(GPUS_PER_RUNNER)],
                      max_containers=8, images=[str(rng.randrange(IMAGES)) for _ in range(3)])
             for i in range(runners)]
    queued = []
    for i in range(tasks):
        image = {"sha256": str(rng.randrange(IMAGES)), "size": 2**30}
        params = Params(gpus=rng.choice([0, 1, 1, 2, 4]), priority=rng.choice([0, 0, 0, 1]))
        task = new_record(f"t{i}", f"u{i % 50}", params, image, "bench")
        task.created_at = float(i)
        queued.append(task)
    return nodes, queued


def measure(runners: int = 1000, tasks: int = 10000, repeats: int = 3) -> dict:
    nodes, queued = simulated(runners, tasks)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = plan(queued, nodes, {}, {})
        times.append(time.perf_counter() - started)
    best = min(times)
    return {"runners": runners, "tasks": tasks, "placed": len(result.choices),
            "waiting": len(result.waiting), "seconds": best,
            "placements_per_second": len(result.choices) / best, "tasks_per_second": tasks / best}


def report(r: dict) -> list[str]:
    return [f"### 4. Placement: {r['runners']} runners, {r['tasks']} waiting tasks", "",
            "| what | value | target |", "|---|---|---|",
            f"| one pass over the queue | {r['seconds']:.2f} s | |",
            f"| placements made | {r['placed']} (others wait: cluster full) | |",
            f"| placements per second | {r['placements_per_second']:.0f} | {TARGET} |",
            f"| tasks considered per second | {r['tasks_per_second']:.0f} | |", ""]


# ---------------------------------------------------------------- the production path

def _sha(n: int) -> str:
    return f"{n:064x}"


def _runner_record(i: int, images: list[str]) -> dict:
    """A node record shaped like the one gpu_runner.agent registers."""
    gpus = [{"index": j, "uuid": f"GPU-bench-{i:04d}-{j}", "model": "declared", "memory": None}
            for j in range(GPUS_PER_RUNNER)]
    return {"name": f"sim{i:04d}", "ssh_host": "192.0.2.1", "ssh_port": 22,  # TEST-NET: never dialled
            "ssh_user": "pink-xfer", "ssh_spool": "/spool", "ssh_outbox": "/outbox",
            "gpus": [g["uuid"] for g in gpus], "gpu_mode": "declared", "gpu_inventory": gpus,
            "max_containers": 8, "max_spool_images": 8, "spool_free": 2**40, "spool_images": 0,
            "images": images, "disk_limits": None, "started_at": time.time()}


def _put_all(store: Store, records: list[tuple[str, dict]], lease: int = 0) -> None:
    for start in range(0, len(records), TXN_PUTS):
        txn = store.txn()
        for key, value in records[start:start + TXN_PUTS]:
            txn.put(key, value, lease)
        txn.commit()


def _runners(store: Store, runners: int, lease: int) -> None:
    """Runner records under `lease`, as gpu_runner.agent registers them."""
    images = [_sha(n) for n in range(IMAGES)]
    _put_all(store, [(store.keys.node(f"sim{i:04d}"), _runner_record(i, images)) for i in range(runners)],
             lease)


def _tasks(store: Store, config, tasks: int, seed: int) -> list[str]:
    """Task records as pink-web's submit writes them; returns their ids."""
    rng = random.Random(seed)
    records = []
    for i in range(tasks):
        image = {"sha256": _sha(rng.randrange(IMAGES)), "size": 2**30, "image_id": "sha256:" + "0" * 64,
                 "repo_tags": [], "layout": "docker"}
        params = Params(gpus=rng.choice([0, 1, 1, 2, 4]), priority=rng.choice([0, 0, 0, 1]))
        records.append(new_record(uuid.uuid4().hex[:12], f"u{i % 50}", params, image, config.host))
    _put_all(store, [(store.keys.task(r.id), r) for r in records])
    return [r.id for r in records]


def _published(store: Store) -> int:
    """How many tasks the leader's last published queue lists as waiting (-1: none yet)."""
    rec = store.get(store.keys.queue)
    return len(rec.value["tasks"]) if rec else -1


def listed(count: int) -> int:
    """How many of `count` waiting tasks the leader's queue lists (it publishes the first few thousand)."""
    return min(count, PUBLISHED_POSITIONS)


def live(cluster, runners: int, tasks: int, workers: int, seconds: float, log, seed: int = 1) -> dict:
    """The queue is written first, with no runner registered, and the leader
    and workers started; once the leader lists every task as waiting, the
    runners register at once, and the clock runs from then until the last
    task that fits is placed (or `seconds` pass)."""
    path = cluster.write_config(path=cluster.base / "pink-placement.toml",
                                redis_url=cluster.redis_url(LIVE_REDIS_DB), etcd={"prefix": LIVE_PREFIX})
    config = pink_config.load(path)
    store = Store.from_config(config)
    redis = Redis.from_url(config.redis_url)
    if redis.dbsize() or store.list(LIVE_PREFIX + "/"):
        raise RuntimeError(f"Redis database {LIVE_REDIS_DB} or etcd prefix {LIVE_PREFIX} holds data")
    names = ["place-leader", *(f"place-worker-{n}" for n in range(1, workers + 1))]
    r = {"runners": runners, "tasks": tasks, "workers": workers}
    lease = None
    try:
        started = time.perf_counter()
        _tasks(store, config, tasks, seed)
        r["write_seconds"] = time.perf_counter() - started
        # What the leader does on each pass before it can commit, timed apart
        # (with the runners registered for the moment, then gone again).
        probe = store.lease(LEASE_TTL)
        _runners(store, runners, probe.id)
        r["etcd_mib"] = cluster.etcd_status()["db_size"] / 2**20
        started = time.perf_counter()
        snap = _snapshot(store)
        r["snapshot_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        r["placeable"] = len(scheduler.plan(config, snap).choices)
        r["plan_seconds"] = time.perf_counter() - started
        probe.revoke()
        log(f"{tasks} tasks written in {r['write_seconds']:.1f}s (etcd's database: {r['etcd_mib']:.1f} MiB); "
            f"one snapshot read {r['snapshot_seconds']:.2f}s, one plan {r['plan_seconds']:.2f}s, "
            f"{r['placeable']} placeable")
        try:
            cluster.start_leader(path, name=names[0])
            for n in range(1, workers + 1):
                cluster.start_worker(n, path, name=f"place-worker-{n}")
            started = time.monotonic()
            while _published(store) != listed(tasks):
                if time.monotonic() - started > 300:
                    raise RuntimeError(f"the leader lists {_published(store)} of {tasks} tasks after 300s")
                time.sleep(0.5)
            log(f"the leader lists the {tasks} tasks as waiting; registering {runners} runners")
            window_start = time.time()
            window_end = window_start + seconds
            lease = store.lease(LEASE_TTL)
            _runners(store, runners, lease.id)
            r["register_seconds"] = time.time() - window_start
            # The leader publishes its queue after committing a pass's placements.
            while time.time() < window_end and _published(store) > listed(tasks - r["placeable"]):
                time.sleep(0.1)
            done = time.time()
        finally:
            for name in names:
                cluster.stop(name)
        states = Counter(rec.value.state.value for rec in store.list(store.keys.tasks))
    finally:
        if lease is not None:
            lease.revoke()  # the runner records, and the assignments under their lease, go with it
        cluster.etcd_delete_prefix(LIVE_PREFIX + "/")
        redis.flushdb()
        redis.close()
        store.close()
    placed = tasks - states.get("queued", 0)  # placed, or already further on
    r.update(window=seconds, placed=placed, states=dict(states), seconds=done - window_start,
             per_second=placed / (done - window_start), finished=done < window_end)
    log(f"{placed} placed {r['seconds']:.2f}s after the runners began to register "
        f"({', '.join(f'{n} {s}' for s, n in states.items())})")
    return r


def report_live(r: dict) -> list[str]:
    took = f"{r['seconds']:.2f} s" if r["finished"] else f"not all within {r['window']:.0f} s"
    return [f"### 8. Placement end to end: {r['runners']:,} runners in etcd, {r['tasks']:,} waiting tasks", "",
            f"A leader and {r['workers']} queue workers run with the tasks waiting and no runner; then "
            f"the runners register (their records written in {r['register_seconds']:.2f} s) and the leader "
            "reads the queue and the runners from etcd, plans, commits the placements runner by runner "
            "and enqueues their transfer jobs, which the workers run (no copy: every runner holds every "
            "image). Timed from the first runner record written until the leader publishes a queue "
            "no longer than what cannot fit (polled every 0.1 s).", "",
            "| what | value | target |", "|---|---|---|",
            f"| placements made | {r['placed']:,} (of {r['placeable']:,} that fit) | |",
            f"| time to place them | {took} | |",
            f"| placements per second | {r['per_second']:.0f} | {TARGET} |",
            f"| one snapshot of etcd (tasks, runners, reservations), timed apart | {r['snapshot_seconds']:.2f} s | |",
            f"| one plan over that snapshot, timed apart | {r['plan_seconds']:.2f} s | |", "",
            f"Setting up: the tasks were written in {r['write_seconds']:.1f} s (etcd's database then "
            f"{r['etcd_mib']:.1f} MiB with the runners).", ""]


if __name__ == "__main__":
    print("\n".join(report(measure())))
