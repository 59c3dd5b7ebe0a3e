"""One task on this runner: from its assignment to its export.

assigned -> running (CAS fenced by our epoch) -> docker load/run with the
reserved GPUs -> wait for exit, deadline or cancel -> export -> exported
(CAS fenced again, which also releases the reservation and the assignment).
The reservation's GPUs go back as soon as the container exits, before the
export; its slot stays until the report.
A runner process that stopped (a restart) leaves the task to the next one
of its epoch, which carries it on (`inherit`): it adopts the container
wherever it was (running, or exited and waiting for its export), writes its
log again from Docker's start, and goes on; if none was started yet, it
starts one, under the same attempt.
If the runner's lease is lost at any point the task is abandoned: the leader
has re-queued it, and the fence would refuse our report anyway. Until then an
etcd blip only delays the report (`retry.while_leased`): a finished task is
never failed, nor run again, for want of a control plane. Log and export are
written into the outbox through `outbox`, never through a name the transfer
account could have replaced.
"""

from __future__ import annotations

import errno
import logging
import os
import tarfile
import threading
import time

import requests
import zstandard
from docker.errors import APIError, DockerException, NotFound

from gpu_runner import export, images, outbox, retry, sizing, tasklog, usage
from pink import fate, lifecycle
from pink.errors import Conflict, Unavailable
from pink.fate import Ending
from pink.store import Record
from pink.tasks import State, Task, now

log = logging.getLogger("pink.runner")

POLL = 0.5  # seconds between checks of the container, the deadline and cancel
# Seconds the log may take to drain once the container has exited: Docker hands
# a log back one line per frame (about 1 MiB/s of short lines), so a chatty
# task's backlog takes a while; past this the rest of the log is cut.
LOG_DRAIN = 120
# Docker did not answer, or dropped the connection: dockerd stopped or is
# restarting. With live-restore the container runs on, so what was asked of
# it (wait, stop, kill, export) is asked again once dockerd is back.
UNANSWERED = (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)
EXPORT_TRIES = 3  # exports made in all when dockerd's restarts cut them
DOCKER_BACK = 120  # seconds an export waits for a restarting dockerd to answer again


class Abandoned(retry.LeaseLost):
    """Our lease (epoch) is gone: stop without reporting."""


class Execution:
    def __init__(self, agent, task_id: str, attempt: int):
        self.agent = agent
        self.store = agent.store
        self.config = agent.config.runner
        self.task_id = task_id
        self.attempt = attempt
        self.base = f"{task_id}-{attempt}"
        self.container = None
        self._log = None  # the log file, written only through the descriptor we created
        self._log_done = threading.Event()  # set: the follower stops, whatever it has not read
        # This execution belongs to the incarnation that started it: a runner
        # that re-registers gets a new epoch, and this thread must not act for it.
        self.epoch = agent.epoch
        self.lease = agent.lease

    # paths on this host, and as the SFTP account sees them
    def _local(self, suffix: str) -> str:
        return os.path.join(self.config.outbox_dir, self.base + suffix)

    def _remote(self, suffix: str) -> str:
        return f"{self.config.ssh_outbox}/{self.base}{suffix}"

    def _fence(self):
        return (self.store.keys.node(self.config.name), self.epoch)

    def _rules(self) -> fate.Rules:
        return fate.Rules.of(self.agent.config)

    def _lease_lost(self) -> bool:
        return self.lease is None or self.lease.lost.is_set() or self.agent.epoch != self.epoch

    def run(self) -> None:
        rec = None
        try:
            rec = self._start()
            if rec is not None:
                self._report_until_done(rec, *self._execute(rec.value))
        except retry.LeaseLost:
            log.warning("task %s abandoned: this runner's epoch ended", self.task_id)
        except Exception as exc:  # noqa: BLE001 - a task must never be left running silently
            log.exception("task %s: unexpected error", self.task_id)
            if rec is not None:
                self._report_quietly(rec, Ending.BROKEN, {"error": f"runner error: {exc}", "cause": "runner_error",
                                                         **self._export_info()})
        finally:
            self._log_done.set()
            self.agent.sampler.finish(self.task_id)  # tracked no more, whatever ended the run
            self._remove_container()
            if self._log is not None:
                self._log.close()
            self.agent.finished(self.task_id)

    def _start(self) -> Record | None:
        rec = self.store.get(self.store.keys.task(self.task_id))
        if rec is None:
            return None
        task = rec.value
        if task.attempt != self.attempt or task.node != self.config.name or task.epoch != self.epoch:
            return None
        if task.state == State.RUNNING and self.agent.inherit(self.task_id):
            return rec  # an earlier process of this epoch ran it: carry on
        if task.state == State.RUNNING:
            # Ours, yet no thread runs it (a report or a read failed after it
            # started): nobody will finish it here, so it goes back to the queue.
            event = fate.RunnerLost(f"runner {self.config.name} lost track of it", counts=False)
            lifecycle.apply(self.store, rec, event, self._rules(), fence=self._fence())
            return None
        if task.state != State.ASSIGNED:
            return None
        logfile = {"ssh": self.agent.ssh_endpoint(), "path": self._remote(".log")}
        if not lifecycle.apply(self.store, rec, fate.Started(self.config.name, logfile), fence=self._fence()):
            return None
        # Running now, and ours alone to finish: losing this read to a blip would
        # leave it for the next poll to re-queue as if this runner had lost track.
        return retry.while_leased(lambda: self.store.get(rec.key), self._lease_lost,
                                  f"read task {self.task_id}")

    def _execute(self, task: Task) -> tuple[Outcome, dict]:
        """Run the container; returns how it ended (or that it must run
        elsewhere) and the facts to report."""
        client = self.agent.docker
        log_fd = outbox.create(self._local(".log"), self.agent.outbox_owner())
        self._log = os.fdopen(log_fd, "ab", buffering=0)
        try:
            if self._lease_lost():
                raise Abandoned()
            self.agent.images_in_use[self.task_id] = task.image["sha256"]
            self.container = self._adoptable(client)
            load_seconds = None  # an adopted container's load was timed by the process before
            if self.container is None:
                load_seconds = self._load(client, task)
                self.container = self.agent.create_container(self._container_args(task))
        except images.BlobMissing as exc:
            try:
                self.agent.images_changed()  # Docker lacks the image too: the node record must stop listing it
            except DockerException as docker_exc:
                log.warning("task %s: could not list this node's images again: %s", self.task_id, docker_exc)
            return fate.RunnerLost(f"{exc}: copying it again"), {}
        except images.ImageRefused as exc:
            return Ending.BROKEN, {"error": str(exc), "cause": "image_refused", **self._export_info()}
        except (RuntimeError, DockerException) as exc:
            return Ending.BROKEN, {"error": _docker_message(exc), "cause": "image_load", **self._export_info()}
        follower = threading.Thread(target=self._follow_logs, daemon=True)
        if self._lease_lost():  # a long docker load may outlive our epoch
            raise Abandoned()
        try:
            if self.container.status == "created":
                self.container.start()
        except APIError as exc:
            result, fields = Ending.BROKEN, {"error": _docker_message(exc), "cause": "start_failed"}
        else:
            follower.start()
            result, fields = self._wait(task)
            if isinstance(result, Ending):
                fields["exited"] = now()
                fields["gpu_usage"] = self.agent.sampler.finish(self.task_id)
                if task.gpus:
                    self._free_gpus(fields["exited"])
            follower.join(timeout=LOG_DRAIN)
            if follower.is_alive():
                self._log_done.set()
                log.warning("task %s: its log did not drain in %ds; the rest is cut", self.task_id, LOG_DRAIN)
        if isinstance(result, Ending):
            export_fields, cause = self._export(task)
            fields.update(export_fields)
            if cause == "output_too_big":  # the task wrote more than it may keep: it failed, whatever its exit
                result = Ending.BROKEN
                fields.update(error=export_fields["export_error"], cause=cause)
            elif cause == "disk_full" and result == Ending.EXITED and fields.get("exit_code") == 0:
                # a run that went well, its output lost to this server's disk: run it again elsewhere
                result = Ending.BROKEN
                fields.update(error=f"saving its output failed: {export_fields['export_error']}", cause=cause)
        fields["image_load_seconds"] = load_seconds
        return result, fields

    def _load(self, client, task: Task) -> float:
        """Load the task's image if Docker lacks it; the seconds it took (0: cached)."""
        started = time.time()
        with self.agent.image_lock(task.image["sha256"]):
            loaded = images.ensure_loaded(client, task.image, self.agent.blobs)
        seconds = round(time.time() - started, 3) if loaded else 0.0
        if loaded:
            self.agent.images_changed()
        return seconds

    def _adoptable(self, client):
        """This attempt's container, left by an earlier process of this epoch
        and started (running or exited); None if it has none. One that was
        created but never started is removed: it is made again."""
        try:
            container = client.containers.get(f"pink-{self.base}")
        except NotFound:
            return None
        labels = container.labels
        if labels.get("pink.epoch") != str(self.epoch) or labels.get("pink.task") != self.task_id:
            return None
        if container.status == "created":
            container.remove(force=True, v=True)
            return None
        log.info("task %s: carrying on with container %s (%s)", self.task_id, container.name, container.status)
        return container

    def _cpus(self, wanted: float | None = None) -> float:
        """The CPU limit (`wanted`: the configured one, or auto's share of the
        cores), or all the cores where there are fewer: Docker refuses a limit
        above the cores its daemon sees (read when the runner started), and a
        local daemon's may have been narrowed since along with the runner's
        (a cpuset, `taskset`)."""
        wanted = sizing.of(self.agent).cpus if wanted is None else wanted
        cpus = min(wanted, sizing.usable_cores(self.agent))
        if cpus < wanted and self.agent.cpu_cap != cpus:  # said once, not for every task
            self.agent.cpu_cap = cpus
            log.warning("CPU limit %.2f, not %.2f: the host has fewer cores", cpus, wanted)
        return cpus

    def _container_args(self, task: Task) -> dict:
        params = task.params
        env = dict(params.env)
        share = sizing.of(self.agent)  # memory, CPUs and /dev/shm: configured, or auto's share of the host
        args = {
            "image": task.image["image_id"], "name": f"pink-{self.base}",
            "labels": {**self.agent.labels(), "pink.task": self.task_id, "pink.attempt": str(self.attempt),
                       "pink.epoch": str(self.epoch)},
            "detach": True, "network_mode": self.config.network,
            "mem_limit": share.memory, "nano_cpus": int(self._cpus(share.cpus) * 1e9),
            "shm_size": share.shm, "pids_limit": self.config.pids, "cap_drop": ["ALL"],
            "cap_add": ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "KILL"],
            "security_opt": ["no-new-privileges"], "privileged": False,
        }
        if params.cmd:
            args["command"] = params.cmd
        if params.entrypoint:
            args["entrypoint"] = params.entrypoint
        args.update(self.agent.gpus.container_args(task.gpus, env))
        args["environment"] = env
        return args

    def _follow_logs(self) -> None:
        """The whole log into the outbox file, from Docker's start (an adopted
        container's too), across dockerd restarts (see tasklog)."""
        try:
            tasklog.follow(self.container, self._log, self._log_done)
        except (DockerException, OSError) as exc:  # a thread's error would go unseen
            log.warning("task %s: log stream ended: %s", self.task_id, exc)

    def _limits(self, task: Task) -> tuple[float, float, float]:
        """(allowed seconds, grace, deadline). The task's timeout is capped by
        the runner's maximum; the grace never exceeds half the allowed time."""
        allowed = min(task.params.timeout, self.config.max_run_seconds)
        grace = min(self.config.stop_grace, allowed / 2)
        return allowed, grace, task.timings["running"] + allowed

    def _wait(self, task: Task) -> tuple[Outcome, dict]:
        """Wait for the exit; SIGTERM at deadline - grace, SIGKILL at the deadline."""
        allowed, grace, deadline = self._limits(task)
        # None: its GPUs are not measured. The counters go beside the attempt's outbox files, so a
        # restarted runner adopting the container counts on (the outbox sweep removes leftovers).
        gpu_use = self.agent.sampler.watch(self.task_id, task.gpus, self._local(".gpu-usage.json"))
        while True:
            status = self._exit_status()
            if status is not None:
                break
            task_now = self._read(task)
            if self._lease_lost() or _moved_on(task_now, self.attempt):
                # Docker not answering: a lost lease gives up (the next epoch's sweep
                # removes the container), a task moved on tries again next round.
                if self._docker_answers(self.container.kill) or self._lease_lost():
                    raise Abandoned()
            elif time.time() >= deadline - grace:
                if self._stop(max(0.0, deadline - time.time())):
                    return Ending.TIMED_OUT, {"exit_code": self._exit_status(),
                                             "error": f"timed out after {allowed:g}s"}
            elif task_now is None or task_now.cancel_requested:
                if self._stop(grace):
                    return Ending.CANCELLED, {"exit_code": self._exit_status(), "error": "cancelled"}
            elif self.agent.stopping:
                if self._stop(grace):
                    why = f"node {self.config.name} stopped by an operator"
                    return fate.RunnerLost(why, counts=False), {}
            elif self._idle_too_long(gpu_use):
                if self._stop(grace):
                    why = self.agent.sampler.policy.reason()
                    return Ending.BROKEN, {"exit_code": self._exit_status(), "error": why, "cause": "gpu_idle"}
        return Ending.EXITED, {"exit_code": status, **self._oom_killed(status)}

    def _idle_too_long(self, gpu_use: usage.Tracker | None) -> bool:
        """The idle policy's word (`gpu_runner.usage`): a warning goes into the task's log as it
        comes; True once the task is to be stopped."""
        action = gpu_use.take() if gpu_use is not None else None
        if action is usage.Action.WARN:
            try:
                self._log.write(self.agent.sampler.policy.warning().encode())
            except OSError as exc:  # a full outbox disk must not fail the task; unwarned, it is not stopped
                log.warning("task %s: could not write the idle warning to its log: %s", self.task_id, exc)
            else:
                gpu_use.delivered()  # in the log: the stop may follow after the grace
        return action is usage.Action.STOP

    def _oom_killed(self, status: int) -> dict:
        """{"cause": "oom_killed"} when the kernel killed the container for its
        memory (Docker's State.OOMKilled): the exit code alone (137) reads like
        any SIGKILL."""
        if status == 0:
            return {}
        try:
            self.container.reload()
        except (DockerException, requests.exceptions.RequestException):
            return {}  # dockerd gone meanwhile: the exit code still says it failed
        return {"cause": "oom_killed"} if self.container.attrs.get("State", {}).get("OOMKilled") else {}

    def _stop(self, grace: float) -> bool:
        """SIGTERM, then SIGKILL after `grace` seconds (Docker's stop does both);
        False if dockerd did not answer, for the next round to try again."""
        return self._docker_answers(self.container.stop, timeout=max(0, round(grace)))

    def _docker_answers(self, call, **kwargs) -> bool:
        """Make a call that stops the container; False if dockerd did not
        answer. A restarting dockerd must neither fail the task (its container
        runs on, holding its GPUs) nor let it run past its deadline: the wait
        loop tries again each round until dockerd is back."""
        try:
            call(**kwargs)
            return True
        except UNANSWERED as exc:
            log.warning("task %s: Docker does not answer (%s); trying again", self.task_id, exc)
            return False

    def _exit_status(self) -> int | None:
        """The exit code; None after POLL seconds while the container runs, or
        while dockerd does not answer (it fails at once then: the wait loop
        must not read etcd as fast as it can through a dockerd restart)."""
        started = time.monotonic()
        try:
            return self.container.wait(timeout=POLL)["StatusCode"]
        except (requests.exceptions.ConnectionError, requests.exceptions.ReadTimeout):
            time.sleep(max(0.0, POLL - (time.monotonic() - started)))
            return None

    def _read(self, started: Task) -> Task | None:
        """The task's record now (None: removed); the last one seen, or the
        one it `started` with, when etcd cannot answer (cut off from etcd, the
        lease check decides whether we go on)."""
        try:
            rec = self.store.get(self.store.keys.task(self.task_id))
            self._seen = rec.value if rec else None
        except Unavailable:
            pass
        return getattr(self, "_seen", started)

    def _free_gpus(self, exited: float) -> None:
        """The container has exited: give its GPUs back before the log drains and the export runs.

        Exporting a 10 GB filesystem is minutes of disk work that needs no
        GPU. The slot stays reserved (the exited container and its export
        still use this runner's disk) and the task stays running, ours and
        fenced, until the export is reported; `timings.exited` says when the
        container ended (usage counts run time to it; tasks without GPUs get
        it with the report). Best effort: if etcd cannot take it now, the
        report releases the whole reservation.
        """
        try:
            rec = self.store.get(self.store.keys.task(self.task_id))
            if rec is None or _moved_on(rec.value, self.attempt):
                return
            lifecycle.apply(self.store, rec, fate.Exited(self.attempt, exited), fence=self._fence())
        except Unavailable as exc:
            log.warning("task %s: its GPUs go back with the report instead: %s", self.task_id, exc)

    def _export_info(self) -> dict:
        return {"export": {"ssh": self.agent.ssh_endpoint(), "path": None, "log": self._remote(".log"),
                           "size": None}}

    def _export(self, task: Task) -> tuple[dict, str | None]:
        """The export's fields to record, and the failure cause when it failed
        for the task's size (`output_too_big`) or this server's disk (`disk_full`)."""
        fields = self._export_info()
        info = fields["export"]
        if self.container is None:
            return fields, None
        suffix = ".tar.gz" if task.params.compression == "gzip" else ".tar.zst"
        started = time.time()
        try:
            size = self._export_through_restarts(task, self._local(suffix))
        except (ValueError, OSError, DockerException, tarfile.TarError, zstandard.ZstdError) as exc:
            cause = "output_too_big" if isinstance(exc, export.TooBig) else \
                "disk_full" if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
            return {**fields, "export_error": str(exc)}, cause
        info.update(path=self._remote(suffix), size=size)
        return {**fields, "export_seconds": round(time.time() - started, 3)}, None

    def _export_through_restarts(self, task: Task, path: str) -> int:
        """export.export, made again (EXPORT_TRIES in all) when a dockerd
        restart cut it: the exited container is still there once dockerd is back."""
        def once() -> int:
            return export.export(self.container, task.params.output, task.params.compression, path,
                                 self.agent.outbox_owner(), self.agent.config.limits.output_bytes_per_task)

        for _ in range(EXPORT_TRIES - 1):
            try:
                return once()
            except UNANSWERED as exc:
                log.warning("task %s: Docker cut the export (%s); exporting again when it answers",
                            self.task_id, exc)
                self._await_docker()
        return once()

    def _await_docker(self) -> None:
        """Until dockerd answers again, DOCKER_BACK seconds at most (the next try reports it)."""
        deadline = time.monotonic() + DOCKER_BACK
        while time.monotonic() < deadline:
            try:
                self.agent.docker.ping()
                return
            except (DockerException, requests.exceptions.RequestException):
                time.sleep(POLL)

    def _report_until_done(self, rec: Record, result: Outcome, fields: dict) -> None:
        """Report, waiting out etcd being unreachable for as long as our lease holds."""
        retry.while_leased(lambda: self._report(rec, result, fields), self._lease_lost,
                           f"report task {self.task_id}")

    def _report(self, rec: Record, result: Outcome, fields: dict) -> None:
        """One try at recording the result. Safe to repeat: `fields` is not
        changed, and a try whose commit got through though its answer was
        lost finds the task already exported by this attempt."""
        if self._lease_lost():
            raise Abandoned()
        fields = dict(fields)
        current = self.store.get(rec.key)
        if current is not None and self._reported(current.value, fields):
            return
        if current is None or current.value.state != State.RUNNING or current.value.attempt != self.attempt:
            log.warning("task %s moved while it ran; discarding its result", self.task_id)
            return
        if isinstance(result, fate.RunnerLost):  # elsewhere, or here again
            lifecycle.apply(self.store, current, result, self._rules(), fence=self._fence())
            return
        timings = {k: fields.pop(k) for k in TIMING_FIELDS if k in fields}
        event = fate.Reported(result, attempt=self.attempt, timings=timings, **fields)
        try:
            reported = lifecycle.apply(self.store, current, event, self._rules(), fence=self._fence())
        except Conflict as exc:  # the record kept changing: a result must never be dropped for that
            raise Unavailable(str(exc)) from None
        if not reported:
            log.warning("task %s moved while it ran; discarding its result", self.task_id)

    def _reported(self, task: Task, fields: dict) -> bool:
        """An earlier try committed this very result, though its answer was lost."""
        return task.attempt == self.attempt and task.state == State.EXPORTED and \
            task.export == fields.get("export")

    def _report_quietly(self, rec: Record, result: Outcome, fields: dict) -> None:
        try:
            self._report_until_done(rec, result, fields)
        except Exception:  # noqa: BLE001 - the leader re-queues it if this fails too
            log.exception("task %s: could not report the failure", self.task_id)

    def _remove_container(self) -> None:
        if self.container is not None:
            try:
                self.container.remove(force=True, v=True)
            except NotFound:
                pass
            except (DockerException, requests.exceptions.RequestException) as exc:
                # dockerd down: the sweep of leftovers at the runner's next start removes it
                log.warning("task %s: could not remove container %s: %s", self.task_id,
                            self.container.name, exc)


def _docker_message(exc: Exception) -> str:
    if isinstance(exc, APIError):
        return f"docker: {exc.explanation or exc}"
    return str(exc)


TIMING_FIELDS = ("image_load_seconds", "export_seconds", "exited")  # reported with the result, kept in `timings`
Outcome = Ending | fate.RunnerLost  # how a run ended, or that it must run elsewhere


def _moved_on(task: Task | None, attempt: int) -> bool:
    """The record no longer says this attempt runs: somebody re-queued it."""
    return task is not None and (task.state != State.RUNNING or task.attempt != attempt)
