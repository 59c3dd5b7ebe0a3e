"""`pink-runner`: the agent on a processing server.

It registers `/pink/nodes/<name>` under a lease it keeps alive; the key's
create_revision is this incarnation's *epoch*. It acts only on assignments
(`/pink/assign/<name>/<task>`) carrying that epoch, and every report it
makes is fenced by it. If the lease is lost it stops its containers (their
tasks have been or will be re-queued) and registers again with a new epoch.
A new incarnation first removes containers any earlier one left behind.

A restart is not a new incarnation. Like slurmd and Nomad's client, a
runner that stops (SIGTERM: an upgrade, `systemctl restart`) leaves its
containers running and its lease alive for one more TTL, and the process
that starts next takes both over (`register`): the same epoch, the same
assignments, each running container adopted (its log written again from
Docker's start, its deadline and cancel watched, its export made). A process
killed without a word is taken over the same way while its lease lasts.
Only `pink node drain` moves work off a node; a runner that stays down
longer than `node_ttl` is a lost node, and its tasks are re-queued.
An etcd blip is waited out while the lease holds (`retry`); registering
again would abandon every running task. It also sweeps its spool and outbox
of files no reservation or live task of this node needs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import click
import docker
import requests
from docker.errors import APIError, DockerException

from gpu_runner import images, outbox, retry, sizing, usage
from gpu_runner.execution import Execution
from gpu_runner.gpus import GPUs
from pink import config as pink_config
from pink import blob_store, nodes, platforms, recipes
from pink.errors import PinkError, Unavailable, outlive_failure
from pink.store import LeaseGone, Store

log = logging.getLogger("pink.runner")

POLL = 1.0  # seconds between reads of the assignments (a watch event may be lost) and of the control key
SPOOL_REPORT_BYTES = 64 * 2**20  # a change in free spool space worth telling the schedulers
SPOOL_SWEEP_INTERVAL = 30.0  # seconds between sweeps of archives no reservation needs
GPU_STATS_INTERVAL = 15.0  # seconds between NVML readings published in the node record
OUTBOX_SWEEP_INTERVAL = 60.0  # seconds between sweeps of outbox files no live task needs
OUTBOX_GRACE = blob_store.SWEEP_GRACE  # seconds an outbox file no task needs may stay (it may be being written)


class Agent:
    def __init__(self, config: pink_config.Config):
        self.config = config
        self.store = Store.from_config(config)
        self.lease = None
        self.epoch: int | None = None
        # Running tasks an earlier process of this epoch left to carry on: task id -> attempt.
        self.inherited: dict[str, int] = {}
        self._take_over()  # first: the last process's lease lasts one TTL, the setup below takes seconds
        self.docker = docker.DockerClient(base_url=config.runner.docker_url) if config.runner.docker_url \
            else docker.from_env()
        self.gpus = GPUs(config.runner.gpus, config.runner.cuda)
        self.sampler = usage.Sampler.of(config.runner, self.gpus.mode, self.gpus.uuids)  # its tasks' GPU usage
        info = self.docker.info()
        self.docker_cpus = info["NCPU"]  # the cores the daemon sees (it refuses limits above)
        self.platform = platforms.platform_of(info.get("OSType"), info.get("Architecture"))  # what images it runs
        self.cpu_cap: float | None = None  # the CPU limit last capped to (see Execution._cpus)
        r = config.runner
        self.blobs = images.RunnerBlobs(r.spool_dir, r.blob_root, r.blob_budget_bytes)
        self.blobs.sync_markers()
        self._settled = False  # this epoch's record published and leftover containers removed
        self.running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._record: dict = {}
        self.stopping = False  # an operator stopped this node: running tasks go elsewhere
        self._control_read = float("-inf")  # when the operator's control key was last read
        self.images_in_use: dict[str, str] = {}  # task id -> archive digest it runs (never evicted)
        self.disk_limits: bool | None = None  # does the storage driver take a container disk size?
        self._image_locks: dict[str, threading.Lock] = {}
        self._swept = 0.0
        self._outbox_swept: float | None = None  # None: sweep at the first refresh
        self._read_gpus = float("-inf")

    # -- registration ----------------------------------------------------------

    def ssh_endpoint(self) -> dict:
        r = self.config.runner
        return {"name": r.name, "ssh_host": r.ssh_host, "ssh_port": r.ssh_port, "ssh_user": r.ssh_user}

    def register(self) -> None:
        """A new epoch: after a lease lost, or when no earlier process left one to take over."""
        self._register_anew()
        self._save_incarnation()

    def _record_now(self) -> dict:
        r = self.config.runner
        return {**self.ssh_endpoint(), "ssh_spool": r.ssh_spool, "ssh_outbox": r.ssh_outbox,
                "gpus": self.gpus.uuids, "gpu_mode": self.gpus.mode, "platform": self.platform, **self.gpus.driver,
                "gpu_inventory": self.gpus.inventory, "max_containers": self._slots(),
                "max_spool_images": r.max_spool_images, **self._spool(),
                "images": images.cached(self.docker), "disk_limits": self.disk_limits,
                "started_at": time.time()}

    def _take_over(self) -> None:
        """Carry on the epoch and lease the last process saved, if the node
        key still holds both; its running tasks become `inherited`. An etcd
        that does not answer is tried again while that lease may last."""
        r = self.config.runner
        try:
            with open(r.incarnation_file) as fh:
                saved = json.load(fh)
            epoch, lease_id = int(saved["epoch"]), int(saved["lease"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        deadline = time.monotonic() + self.config.node_ttl
        while True:
            try:
                rec = self.store.get(self.store.keys.node(r.name))
                if rec is None or rec.create_revision != epoch or rec.lease != lease_id:
                    return
                inherited = {a.value["task"]: a.value.get("attempt")
                             for a in self.store.list(self.store.keys.assignments(r.name))
                             if a.value.get("epoch") == epoch}
                self.lease = self.store.lease(self.config.node_ttl, lease_id)
                break
            except LeaseGone:
                return
            except Unavailable as exc:
                if time.monotonic() > deadline:
                    log.warning("could not take %s over (%s): registering anew", r.name, exc.message)
                    return
                time.sleep(0.5)
        self.epoch, self.inherited = epoch, inherited
        log.info("took over %s at epoch %d from the last process, with %d tasks", r.name, epoch, len(inherited))

    def _save_incarnation(self) -> None:
        """Written whole (rename) for the next process of this epoch to find."""
        path = self.config.runner.incarnation_file
        with open(path + ".tmp", "w") as fh:
            json.dump({"epoch": self.epoch, "lease": self.lease.id}, fh)
        os.replace(path + ".tmp", path)

    def inherit(self, task_id: str) -> bool:
        """Whether `task_id`, found running, was left by an earlier process of
        this epoch to carry on (asked once per task)."""
        with self._lock:
            return self.inherited.pop(task_id, None) is not None

    def _register_anew(self) -> None:
        r = self.config.runner
        self.epoch, self.inherited = None, {}  # until the new key is made, whatever fails
        self._record = self._record_now()
        key = self.store.keys.node(r.name)
        self.lease = self.store.lease(self.config.node_ttl)
        # A fresh key (not an overwrite) gives a new create_revision: a new epoch.
        self.store.delete(key)
        if not self.store.create(key, self._record, self.lease.id):
            raise PinkError(f"another runner registered as {r.name} at the same moment")
        self.epoch = self.store.get(key).create_revision
        log.info("registered %s with epoch %d (%s GPUs: %s)", r.name, self.epoch, self.gpus.mode,
                 ", ".join(self.gpus.uuids) or "none")

    def _slots(self) -> int:
        """Containers at once: the configured maximum (auto: one per GPU), or
        fewer if memory runs out first (gpu_runner/sizing.py)."""
        return sizing.of(self).slots

    def _spool(self) -> dict:
        """Free bytes in the spool and archives waiting there to be loaded."""
        spool = self.config.runner.spool_dir
        st = os.statvfs(spool)
        waiting = sum(1 for name in os.listdir(spool) if name.endswith(".tar"))
        return {"spool_free": st.f_bavail * st.f_frsize, "spool_images": waiting}

    def refresh(self) -> None:
        """Publish the spool's state when it changed (images arrive and are loaded),
        and real GPUs' readings every GPU_STATS_INTERVAL."""
        if time.monotonic() - self._swept > SPOOL_SWEEP_INTERVAL:
            self._sweep_spool()
        if self._outbox_swept is None or time.monotonic() - self._outbox_swept > OUTBOX_SWEEP_INTERVAL:
            self._sweep_outbox()
        spool = self._spool()
        changed = spool["spool_images"] != self._record.get("spool_images") or \
            abs(spool["spool_free"] - self._record.get("spool_free", 0)) > SPOOL_REPORT_BYTES
        if changed:
            self._record.update(spool)
        if time.monotonic() - self._read_gpus > GPU_STATS_INTERVAL:
            self._read_gpus = time.monotonic()
            stats = self.gpus.readings()
            changed = changed or bool(stats)
            self._record["gpu_stats"] = stats
        if changed:
            self._publish()

    def _sweep_spool(self) -> None:
        self._swept = time.monotonic()
        keep = self._reserved_images()
        for name in images.sweep_spool(self.config.runner.spool_dir, keep, self.config.runner.spool_grace):
            log.info("removed %s from the spool: no task here needs it", name)
        gone = self.blobs.collect(self._reserved_blobs(), self.config.runner.spool_grace)
        if gone:
            log.info("collected %d image blobs no task here needs (over the budget)", len(gone))

    def _reserved_blobs(self) -> set[str]:
        """Blobs of the images of tasks reserved here (their records name them)."""
        alloc = self.store.get(self.store.keys.alloc(self.config.runner.name))
        keep: set[str] = set()
        for task_id in (alloc.value if alloc else {}):
            rec = self.store.get(self.store.keys.task(task_id))
            if rec is not None:
                keep |= recipes.image_blobs(rec.value.image)
        return keep

    def _reserved_images(self) -> set[str]:
        """Archive digests of every task with a reservation here, started or not.

        Each reservation names its image; one written before they did (by an
        older worker) is looked up in its task record.
        """
        alloc = self.store.get(self.store.keys.alloc(self.config.runner.name))
        reserved = set()
        for task_id, entry in (alloc.value if alloc else {}).items():
            sha = entry.get("image") if isinstance(entry, dict) else None
            if sha is None:
                rec = self.store.get(self.store.keys.task(task_id))
                sha = rec.value.image["sha256"] if rec is not None else None
            if sha:
                reserved.add(sha)
        return reserved

    def _sweep_outbox(self) -> None:
        """Remove old outbox files of attempts neither assigned here nor still
        recorded as this node's (an export waiting for its finalize). Only this
        node's assignments are listed; a task record is read only for old files."""
        self._outbox_swept = time.monotonic()
        assigned = {(r.value["task"], r.value["attempt"])
                    for r in self.store.list(self.store.keys.assignments(self.config.runner.name))}

        def referenced(task_id: str, attempt: int) -> bool:
            return (task_id, attempt) in assigned or self._recorded_here(task_id, attempt)

        for name in outbox.sweep(self.config.runner.outbox_dir, referenced, OUTBOX_GRACE):
            log.info("removed %s from the outbox: no live task refers to it", name)

    def _recorded_here(self, task_id: str, attempt: int) -> bool:
        rec = self.store.get(self.store.keys.task(task_id))
        return rec is not None and rec.value.attempt == attempt and rec.value.node == self.config.runner.name

    def _publish(self) -> None:
        key = self.store.keys.node(self.config.runner.name)
        self.store.txn().fence(key, self.epoch).put(key, self._record, self.lease.id).commit()

    def images_changed(self) -> None:
        """After a load (or an image found gone): keep the cache within its budget, then advertise it.

        Both need etcd (the reservations to spare, the record to publish): a
        blip is waited out while the lease holds; `retry.LeaseLost` after.
        """
        retry.while_leased(self._evict, self.lease_lost, "read this node's reservations")
        self._record["images"] = images.cached(self.docker)
        self._record.update(self._spool())
        retry.while_leased(self._publish, self.lease_lost, "publish this node's images")

    def _evict(self) -> None:
        """Untag cached images beyond the budget, sparing those of tasks started
        here and of every reservation: a task placed here because the node record
        listed its image was sent no archive, and needs the cached one."""
        if not self.config.runner.image_cache_bytes:
            return
        spared = self._reserved_images()
        with self._lock:
            spared |= set(self.images_in_use.values())
        for sha in images.evict(self.docker, self.config.runner.image_cache_bytes, spared):
            log.info("evicted image %s from the cache", sha[:12])

    def image_lock(self, sha: str) -> threading.Lock:
        with self._lock:
            return self._image_locks.setdefault(sha, threading.Lock())

    def create_container(self, args: dict):
        """Create a container, with a disk size limit when the storage driver allows one.

        Docker only enforces `size` on some drivers (overlay2 on xfs with pquota,
        btrfs, zfs, devicemapper); elsewhere it refuses the option. Then the
        runner says so once, in its log and node record, and runs without it.
        """
        disk = self.config.runner.container_disk
        if disk and self.disk_limits is not False:
            try:
                container = self.docker.containers.create(**args, storage_opt={"size": disk})
                self.disk_limits = True
                return container
            except APIError as exc:
                if "storage-opt" not in str(exc) and "storage opt" not in str(exc).lower():
                    raise
                log.warning("this storage driver cannot limit container disk size (%s): running "
                            "containers without a disk limit", exc.explanation or exc)
                self.disk_limits = False
                self._record["disk_limits"] = False
                retry.while_leased(self._publish, self.lease_lost, "publish this node's disk limits")
        return self.docker.containers.create(**args)

    def lease_lost(self) -> bool:
        return self.lease is None or self.lease.lost.is_set()

    def outbox_owner(self) -> tuple[int, int]:
        """(uid, gid) of the SFTP account that owns the outbox: its files are handed to it."""
        return outbox.owner(self.config.runner.outbox_dir)

    # -- containers from earlier incarnations ----------------------------------

    def labels(self) -> dict:
        """Labels naming this runner's containers. The cluster (its etcd prefix)
        is part of the name: clusters may share a Docker engine."""
        return {"pink.cluster": self.config.etcd.prefix, "pink.node": self.config.runner.name}

    def _containers(self, **kwargs) -> list:
        return self.docker.containers.list(
            filters={"label": [f"{k}={v}" for k, v in self.labels().items()]}, **kwargs)

    def remove_leftovers(self) -> None:
        """Remove containers no task of this epoch carries on: all an earlier
        incarnation left, and those of this epoch's tasks reported meanwhile."""
        for container in self._containers(all=True):
            labels = container.labels
            carried_on = labels.get("pink.epoch") == str(self.epoch) and \
                str(self.inherited.get(labels.get("pink.task"))) == labels.get("pink.attempt")
            if not carried_on:
                log.info("removing container %s that no task of this epoch runs", container.name)
                try:
                    container.remove(force=True, v=True)
                except DockerException as exc:
                    log.warning("could not remove %s: %s", container.name, exc)

    # -- assignments -------------------------------------------------------------

    def poll_assignments(self) -> None:
        """Start the threads of new assignments. Woken by each new one, the
        round reads only them: the operator's control key, which changes a few
        times a year, is read once a POLL."""
        if time.monotonic() - self._control_read >= POLL:
            self.stopping = nodes.control_state(self.store, self.config.runner.name) == nodes.STOPPED
            self._control_read = time.monotonic()
        if self.stopping:
            nodes.move_waiting_off(self.store, self.config.runner.name)
            return
        for rec in self.store.list(self.store.keys.assignments(self.config.runner.name)):
            a = rec.value
            if a.get("epoch") != self.epoch:
                continue
            with self._lock:
                if a["task"] in self.running:
                    continue
                thread = threading.Thread(target=Execution(self, a["task"], a["attempt"]).run,
                                          name=f"task-{a['task']}", daemon=True)
                self.running[a["task"]] = thread
            thread.start()

    def finished(self, task_id: str) -> None:
        with self._lock:
            self.running.pop(task_id, None)
            self.images_in_use.pop(task_id, None)

    def serve(self, stop: threading.Event) -> None:
        self.sampler.start(stop)
        while not stop.is_set():
            with outlive_failure(log, "runner", "trying again", stop):
                if self.epoch is None or self.lease_lost():
                    self.register()
                    self._settled = False
                if not self._settled:  # retried until done, the epoch kept: a blip must not cost its tasks
                    self._settle()
                cancel = self.store.watch_prefix(self.store.keys.assignments(self.config.runner.name),
                                                 self._wake.set, deletes=False)
                try:
                    while not stop.is_set() and not self.lease_lost():
                        self._wake.clear()
                        self._tend()
                        self._wake.wait(POLL)
                finally:
                    cancel()
            if self.lease_lost() and not stop.is_set():
                log.warning("lease lost: stopping this epoch's containers and registering again")
                self.stop_containers()
        self.shutdown()

    def _settle(self) -> None:
        """Publish this epoch's record and remove the containers no task of it runs."""
        self._record = self._record_now()
        self._publish()
        self.remove_leftovers()
        self._settled = True

    def _tend(self) -> None:
        """One round: start new assignments, publish and sweep. An etcd blip
        ends the round, not the epoch: registering again would abandon every
        running task, and only the lease says when this node is given up."""
        try:
            self.poll_assignments()
            self.refresh()
        except Unavailable as exc:
            log.warning("runner: %s; trying again while the lease holds", exc.message)

    def stop_containers(self) -> None:
        """Kill this runner's containers (the lease is lost). Docker not
        answering (dockerd restarting) must not end the serve loop: the
        next epoch's `remove_leftovers` removes them once it answers."""
        try:
            containers = self._containers()
        except (DockerException, requests.exceptions.RequestException) as exc:
            log.warning("could not list this runner's containers to stop them: %s", exc)
            return
        for container in containers:
            try:
                container.kill()
            except (DockerException, requests.exceptions.RequestException):
                pass

    def shutdown(self) -> None:
        """A planned stop (a restart, an upgrade): the containers keep running
        and the lease lasts one more TTL, for the next process to take over."""
        if self.lease is not None and not self.lease_lost():
            self.lease.hand_over()
            log.info("stopped; the containers run on, and the next process has %ds to take them over",
                     self.lease.ttl)


def check_gpus(config: pink_config.Config, expected: int) -> None:
    """Exit non-zero, saying what was found, unless the runner would offer `expected` GPUs."""
    gpus = GPUs(config.runner.gpus)
    found = ", ".join(f"{g['index']}: {g['model']} {g['uuid']}" for g in gpus.inventory) or "none"
    if len(gpus.inventory) != expected:
        raise click.ClickException(
            f"the runner finds {len(gpus.inventory)} GPUs ({gpus.mode}: {found}), not the {expected} this "
            "host should have: check the driver (`nvidia-smi`), fabricmanager on SXM servers, and "
            "pink_runner_expected_gpus in the inventory")
    click.echo(f"{len(gpus.inventory)} GPUs, as expected ({gpus.mode}: {found})")


@click.command()
@click.option("--config", "config_path", envvar="PINK_CONFIG", required=True,
              type=click.Path(exists=True, dir_okay=False), help="PINK config file.")
@click.option("--name", default=None, help="Node name (overrides [runner] name).")
@click.option("--check-gpus", "expected_gpus", type=click.IntRange(min=0), default=None,
              help="Only check that the runner finds this many GPUs (a deploy's check), and exit.")
def main(config_path: str, name: str | None, expected_gpus: int | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = pink_config.load(config_path)
    if expected_gpus is not None:
        check_gpus(config, expected_gpus)
        return
    if name:
        config.runner.name = name
    if not config.runner.name:
        raise click.UsageError("the runner needs a name: set [runner] name or pass --name")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Agent(config).serve(stop)


if __name__ == "__main__":
    main()
