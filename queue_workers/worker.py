"""`pink-worker`: an RQ worker serving this web node's queues.

It listens to the shared finalize and run queues and to this host's own
transfer queue (uploads live on this host); with `--queues notify`, to
notifications alone (`NotifyWorker`: separate processes and systemd units,
so a slow webhook receiver never occupies a pipeline worker). Jobs run in the worker process
itself (RQ's SimpleWorker): no fork per job keeps a trivial task's latency
low, and the etcd client is opened once, after start, never across a fork.

Liveness: RQ keeps a SimpleWorker's key `rq:worker:<name>` alive for the
whole job timeout plus 60 s (6 h for a transfer), so a worker killed mid-job
would look alive for hours and its fixed name (the systemd unit's) could not
be registered again. `PinkWorker` keeps that key under a lease of
`node_ttl` seconds, refreshed by a thread, and on start takes the name over
from a dead predecessor. `queues.job_status` reads the key to tell a dead
worker's started job from a live one.

Redis: the worker dequeues on its own connection (`redisconn.connect(...,
blocking=True)`), whose socket timeout outlasts the BLPOP by a reply's wait.
RQ would raise any shorter timeout to 415 s (its `connection_timeout`, from
`worker_ttl`): a master gone silent without closing its sockets would then
hold the worker for minutes. `PinkWorker` dequeues for DEQUEUE_TIMEOUT at a
time instead, so RQ keeps our timeout and notices a silent master within two
socket timeouts (it logs "could not connect to Redis instance" and goes on
trying, asking the sentinels again). Jobs keep their own connection
(`context.redis()`, shorter timeouts).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

import click
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, worker_registration
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.utils import now, utcparse

from pink import redisconn
from queue_workers import context, notify
from queue_workers.queues import notify_queues, queues_for

log = logging.getLogger("pink.worker")

BEATS_PER_LEASE = 3  # key refreshes per lease: one lost beat (a slow Redis reply) does not expire it
STALE_LEASES = 2  # a holder silent this many leases is dead even if its pid cannot be checked
CLAIM_POLL = 0.5  # seconds between looks at a live-looking holder's key while waiting for it to expire


class PinkWorker(SimpleWorker):
    """A SimpleWorker whose key expires `lease_ttl` seconds after it dies."""

    def __init__(self, *args, lease_ttl: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.lease_ttl = max(1, int(lease_ttl))  # Redis EXPIRE takes whole seconds
        self._stop_beats = threading.Event()
        self._beats: threading.Thread | None = None

    # -- Redis timeouts ---------------------------------------------------------

    @property
    def dequeue_timeout(self) -> int:
        """RQ's is worker_ttl - 15 s (405 s): a BLPOP that long needs a socket
        timeout that long, which leaves a silent master unnoticed for minutes."""
        return redisconn.DEQUEUE_TIMEOUT

    @property
    def connection_timeout(self) -> int:
        """The socket timeout RQ requires of our connection (it raises a shorter one)."""
        return int(redisconn.BLOCKING_SOCKET_TIMEOUT)

    # -- the lease ------------------------------------------------------------

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        """RQ asks for worker_ttl + 60 s when idle and job timeout + 60 s when a
        job starts; the beat thread keeps the key alive instead, so every
        extension is the lease: a killed worker's key is gone a lease later."""
        super().heartbeat(self.lease_ttl, pipeline=pipeline)

    def register_birth(self) -> None:
        """Claim the name (see `_claim_name`), register, then start beating at
        once: RQ's registration itself sets a TTL of worker_ttl + 60 s."""
        self._claim_name()
        super().register_birth()
        self._beat()
        self._stop_beats.clear()
        self._beats = threading.Thread(target=self._beat_forever, name="pink-worker-lease", daemon=True)
        self._beats.start()

    def register_death(self) -> None:
        """Stop beating before RQ marks the key dead, or a beat could outlive it.

        A stop that interrupted the blocking dequeue leaves that command's
        reply unread on its connection, and redis-py's Sentinel connections
        are not dropped on an interrupted read: the next command would read
        the stale reply or wait for it (minutes). Closing the pool's
        connections first gives RQ's last writes a clean one. RQ's command
        channel (a pubsub with a thread reading it) is closed before that:
        closed under it, its thread and RQ's later unsubscribe would both
        reconnect on one connection and read each other's replies.
        """
        self._stop_beats.set()
        if self._beats is not None:
            self._beats.join(timeout=5)
        self.unsubscribe()
        self.pubsub_thread = None  # RQ's teardown unsubscribes again, after us
        self.connection.connection_pool.disconnect()
        super().register_death()

    def _beat_forever(self) -> None:
        """Runs beside the job (SimpleWorker runs jobs in the main thread)."""
        while not self._stop_beats.wait(self.lease_ttl / BEATS_PER_LEASE):
            try:
                self._beat()
            except RedisError as exc:  # the next beat may get through before the lease ends
                log.warning("worker %s: heartbeat failed: %s", self.name, exc)

    def _beat(self) -> None:
        with self.connection.pipeline() as pipe:
            self.heartbeat(pipeline=pipe)
            created = pipe.execute()[0]
        if created:
            self._register_again()

    def _register_again(self) -> None:
        """The key had expired while we lived (Redis unreachable, or the
        process stalled, for a whole lease): our running job may already be
        counted as failed and retried, which jobs tolerate (they begin with a
        compare-and-swap). Write the registration back so that we are not a
        worker without a name; birth is kept, so our job counts as ours again."""
        log.warning("worker %s: lease had expired; registering again", self.name)
        with self.connection.pipeline() as pipe:
            pipe.hset(self.key, mapping={**self.serialize(), "state": self.get_state()})
            worker_registration.register(self, pipe)
            pipe.expire(self.key, self.lease_ttl)
            pipe.execute()

    # -- taking a dead predecessor's name -----------------------------------------

    def _claim_name(self) -> None:
        """Free our name if the worker registered under it is dead.

        RQ refuses a name whose key exists. A holder on this host whose pid is
        gone (or is ours: a container's restart reuses pids) or one silent for
        STALE_LEASES leases is dead: its registration is removed and its
        started jobs failed, so the leader retries them now. Any other holder
        may be alive: wait one lease for its key to expire, then let RQ decide.
        """
        deadline = time.monotonic() + self.lease_ttl + 1
        while (holder := self._holder()) is not None:
            if self._is_dead(holder):
                self._retire(holder)
                return
            if time.monotonic() > deadline:
                return
            time.sleep(CLAIM_POLL)

    def _holder(self) -> dict | None:
        """The live-looking registration under our name, if any (RQ lets a
        name marked with `death` be reused)."""
        data = {k.decode(): v.decode() for k, v in self.connection.hgetall(self.key).items()}
        return data if data and "death" not in data else None

    def _is_dead(self, holder: dict) -> bool:
        beat = holder.get("last_heartbeat")
        if beat and now() - utcparse(beat) > timedelta(seconds=STALE_LEASES * self.lease_ttl):
            return True
        if holder.get("hostname") != self.hostname or not holder.get("pid"):
            return False
        pid = int(holder["pid"])
        return pid == os.getpid() or not _pid_alive(pid)

    def _retire(self, holder: dict) -> None:
        why = (f"worker {self.name} (pid {holder.get('pid')} on {holder.get('hostname')}) died "
               f"while running this job; a new worker took its name over")
        failed = [self._fail(job, execution_id, why) for job, execution_id in self._orphans()]
        with self.connection.pipeline() as pipe:
            worker_registration.unregister(self, pipe)
            pipe.delete(self.key, self.executions_key)
            pipe.execute()
        log.warning("worker %s: took the name over from dead pid %s on %s; failed its jobs %s",
                    self.name, holder.get("pid"), holder.get("hostname"), failed or "(none)")

    def _orphans(self) -> list[tuple[Job, str]]:
        """The jobs our queues' started registries hold for a worker of our name."""
        orphans = []
        for queue in self.queues:
            registry = queue.started_job_registry
            for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
                try:
                    job = Job.fetch(job_id, connection=self.connection, serializer=self.serializer)
                except NoSuchJobError:
                    continue
                if job.get_status(refresh=False) == JobStatus.STARTED and job.worker_name == self.name:
                    orphans.append((job, execution_id))
        return orphans

    def _fail(self, job: Job, execution_id: str, why: str) -> str:
        """Fail a dead worker's job as RQ fails an abandoned one, removing its
        execution first: deleting a job reads each execution it still lists.
        `ended_at` lets the leader's retry back off from now."""
        execution = Execution(execution_id, job.id, connection=self.connection, worker_name=self.name)
        job.ended_at = now()  # saved by record_job_failure, which rewrites the job's hash
        with self.connection.pipeline() as pipe:
            execution.delete(job, pipe)
            record_job_failure(job, why, pipe)
            pipe.execute()
        return job.id


class NotifyWorker(PinkWorker):
    """A PinkWorker of `pink-notify` that also moves its queue's due tries into it
    (`notify.Mover`, a thread beside the jobs), so no other process must."""

    def register_birth(self) -> None:
        super().register_birth()
        self._mover = notify.Mover(context.redis)
        self._mover.start()

    def register_death(self) -> None:
        mover = getattr(self, "_mover", None)
        if mover is not None:
            mover.stop()
        super().register_death()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, not ours to judge
        return True
    return True


@click.command()
@click.option("--config", "config_path", envvar="PINK_CONFIG", required=True,
              type=click.Path(exists=True, dir_okay=False), help="PINK config file.")
@click.option("--burst", is_flag=True, help="Stop when the queues are empty.")
@click.option("--name", default=None, help="Worker name shown in rq-dashboard.")
@click.option("--queues", "which", type=click.Choice(["pipeline", "notify"]), default="pipeline",
              show_default=True, help="pipeline: this host's transfers and finalize; notify: notifications only.")
def main(config_path: str, burst: bool, name: str | None, which: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    context.configure(config_path)
    config = context.config()
    redis = redisconn.connect(config, blocking=True)
    names, worker_class = (notify_queues(), NotifyWorker) if which == "notify" else (queues_for(config.host),
                                                                                      PinkWorker)
    queues = [Queue(q, connection=redis) for q in names]
    # The runner's lease: a dead worker is noticed as soon as a dead runner is.
    worker = worker_class(queues, connection=redis, name=name, lease_ttl=config.node_ttl)
    worker.work(burst=burst, with_scheduler=False, logging_level="INFO")


if __name__ == "__main__":
    main()
