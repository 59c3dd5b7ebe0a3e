"""Configuration of every PINK process, read from one TOML file.

Each process (pink-web, pink-worker, pink-leader, pink-runner, `pink admin`)
is started with `--config PATH` (or `PINK_CONFIG`); the sections it does not
use are simply ignored, so one file can describe a whole one-machine cluster.
Every setting's default is beside its field here, with its unit and meaning;
nothing here has a default secret. Code that needs a default outside a Config
reads it from the class (`LimitsConfig.record_bytes`, `Config.max_attempts`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from pink.compat import tomllib
from pink.errors import ConfigError

CONFIG_ENV = "PINK_CONFIG"


@dataclass
class EtcdConfig:
    endpoints: list[str] = field(default_factory=lambda: ["127.0.0.1:2379"])
    prefix: str = "/pink"  # root of every key PINK writes to etcd
    # TLS: the CA of etcd's members, and this host's client certificate and
    # key, whose CN etcd takes as the user's name. Empty: plain HTTP (the
    # one-machine dev cluster, on loopback).
    ca: str = ""
    cert: str = ""
    key: str = ""


@dataclass
class DatabaseConfig:
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "pink"
    password: str = ""
    database: str = "pink"
    ca: str = ""  # CA that signed MariaDB's certificate; empty disables TLS


@dataclass
class WebConfig:
    spool_dir: str = ""  # uploads land here before their transfer job
    output_dir: str = ""  # finalized exports live here
    secret_key: str = ""  # Flask session signing key
    max_upload_bytes: int = 64 * 2**30  # bytes: largest image archive accepted
    url: str = ""  # this node's own base URL, for peers streaming outputs
    certfile: str = ""
    keyfile: str = ""
    ca: str = ""  # CA to verify peer web nodes when streaming an output they hold
    bind: str = "127.0.0.1:8443"
    workers: int = 4
    dashboard: bool = True  # mount rq-dashboard under /rq for admins
    trusted_proxies: list[str] = field(default_factory=list)  # routers whose X-Real-IP names the client
    blob_dir: str = ""  # image blobs (pink.blob_store); "" means `blobs` beside spool_dir
    blob_budget_bytes: int = 200 * 2**30  # bytes of image blobs a web node keeps for dedup (those in use stay)

    @property
    def blob_root(self) -> str:
        return self.blob_dir or os.path.join(os.path.dirname(self.spool_dir.rstrip("/")), "blobs")


@dataclass
class SSHConfig:
    """How queue workers and web nodes reach runners' transfer accounts."""

    key: str = ""  # private key file (key auth only)
    known_hosts: str = ""  # pinned host keys; unknown hosts are refused
    cipher: str = "aes128-gcm@openssh.com"  # fastest cipher paramiko speaks here


@dataclass
class RunnerConfig:
    name: str = ""
    spool_dir: str = ""  # where images arrive over SFTP (local path)
    outbox_dir: str = ""  # exports and logs, fetched over SFTP (local path)
    ssh_host: str = "127.0.0.1"
    ssh_port: int = 22
    ssh_user: str = "pink-xfer"
    ssh_spool: str = "/spool"  # the spool as the SFTP account sees it
    ssh_outbox: str = "/outbox"
    docker_url: str = ""  # empty: the environment's Docker (DOCKER_HOST or the socket)
    gpus: list[str] = field(default_factory=list)  # declared GPU UUIDs
    cuda: str = ""  # declared GPUs: the newest CUDA their driver supports, e.g. "12.2" (NVML reports it)
    network: str = "none"
    # Each container's share of the host; the auto values are derived at start
    # (gpu_runner/sizing.py): one slot per GPU (4 without GPUs), the memory
    # less a reserve and the cores split evenly among the slots.
    memory: str = "auto"  # each container's memory limit, e.g. "64g"; "auto": (RAM - reserve) / slots
    cpus: float = 0.0  # each container's CPU limit; 0: the cores / slots (at least 1)
    shm_size: str = "auto"  # each container's /dev/shm, e.g. "16g"; "auto": half its memory limit
    pids: int = 1024
    stop_grace: float = 10.0  # seconds between SIGTERM and SIGKILL at a deadline or cancel
    max_run_seconds: int = 7 * 24 * 3600  # seconds: this runner's cap on any task's timeout
    max_containers: int = 0  # containers at once; 0: one per GPU, 4 without GPUs
    image_cache_bytes: int = 0  # disk budget of loaded images; 0: keep every image
    max_spool_images: int = 8  # archives waiting in the spool to be loaded; 0: no limit
    spool_grace: float = 600.0  # seconds an archive no task here needs stays before it is swept
    container_disk: str = ""  # e.g. "20g": writable layer size, where the storage driver allows
    blob_dir: str = ""  # verified image blobs, outside the SFTP chroot; "" means `blobs` beside it
    blob_budget_bytes: int = 200 * 2**30  # bytes of verified image blobs a runner keeps (reserved ones stay)
    # GPU usage (gpu_runner/usage.py): real GPUs are sampled through NVML; declared GPUs are not measured.
    gpu_sample_seconds: float = 5.0  # seconds between two readings of every GPU (one thread per runner)
    idle_gpu_percent: float = 5.0  # a GPU under this utilisation is idle (idle minutes, the idle policy)
    idle_minutes: float = 0.0  # the idle policy: warn a task whose GPUs all stay idle this long; 0: off
    idle_grace_minutes: float = 10.0  # then stop it (failure `gpu_idle`, output kept) if they stay idle this long
    gpu_samples_file: str = ""  # test hook: replay readings from this file (JSON lines) instead of NVML

    def __post_init__(self):
        """The GPU-usage settings, refused when the config is read: a zero period would sample in a
        tight loop, and an idle limit shorter than two readings stops a task on one idle reading."""
        for name in ("gpu_sample_seconds", "idle_gpu_percent", "idle_minutes", "idle_grace_minutes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ConfigError(f"[runner] {name} must be a number, got {value!r}")
        period = self.gpu_sample_seconds / 60  # in minutes, as the idle settings are
        if not self.gpu_sample_seconds > 0:
            raise ConfigError(f"[runner] gpu_sample_seconds must be above 0, got {self.gpu_sample_seconds!r}")
        if not 0 < self.idle_gpu_percent <= 100:
            raise ConfigError(f"[runner] idle_gpu_percent must be above 0 and at most 100, "
                              f"got {self.idle_gpu_percent!r}")
        if self.idle_minutes and self.idle_minutes < 2 * period:
            raise ConfigError(f"[runner] idle_minutes must be 0 (off) or at least two gpu_sample_seconds "
                              f"({2 * period:g} minutes), got {self.idle_minutes!r}")
        if self.idle_minutes and self.idle_grace_minutes < period:
            raise ConfigError(f"[runner] idle_grace_minutes must be at least one gpu_sample_seconds "
                              f"({period:g} minutes) while idle_minutes is on, got {self.idle_grace_minutes!r}")
        if self.gpu_samples_file and not self.gpus:
            # the test hook stands in for NVML on declared GPUs; on real ones it would hide their readings
            raise ConfigError("[runner] gpu_samples_file is a test hook for declared GPUs: set [runner] gpus too")

    @property
    def blob_root(self) -> str:
        chroot = os.path.dirname(self.spool_dir.rstrip("/"))
        return self.blob_dir or os.path.join(os.path.dirname(chroot), "blobs")

    @property
    def incarnation_file(self) -> str:
        """Where the runner keeps its epoch and lease for the next process to
        take over: beside its blob store, outside the SFTP chroot."""
        return os.path.join(os.path.dirname(self.blob_root.rstrip("/")), f"runner-{self.name}.json")


@dataclass
class LimitsConfig:
    """Per-user limits, each with a default that keeps one user from filling a
    shared resource (etcd, disks, web threads); 0 means no limit."""

    gpus_per_user: int = 0  # GPUs one user's tasks may hold at once (others wait)
    queued_per_user: int = 0  # tasks one user may have waiting (more are refused)
    live_tasks_per_user: int = 500  # tasks one user may have in etcd, queued to exported (not yet archived)
    upload_bytes_per_user: int = 500 * 2**30  # bytes of images held by a user's live tasks and open upload sessions
    upload_sessions_per_user: int = 16  # layer-upload sessions one user may hold open at once
    output_bytes_per_task: int = 100 * 2**30  # bytes of one task's export; more fails the task
    log_streams_per_user: int = 8  # followed logs one user may hold open at once on one web node
    log_streams_per_node: int = 32  # followed logs one web node serves at once (half its threads)
    log_follow_seconds: int = 3600  # seconds one follow of a log lasts; the CLI and page then resume it
    record_bytes: int = 64 * 2**10  # bytes of a task's parameters (name, env, command, entrypoint) as stored
    sweep_indexes: int = 500  # indexes (tasks) one sweep may have; each counts in live_tasks_per_user

    def __post_init__(self):
        if isinstance(self.sweep_indexes, bool) or not isinstance(self.sweep_indexes, int) \
                or self.sweep_indexes < 1:
            raise ConfigError(f"[limits] sweep_indexes must be a whole number, 1 or more, "
                              f"got {self.sweep_indexes!r}")


@dataclass
class RetentionConfig:
    """How long the past is kept; 0 means no limit."""

    output_days: float = 14.0  # days an output and its logs are kept after the task ends
    max_output_bytes_per_user: int = 500 * 2**30  # bytes of one user's stored outputs; beyond, their oldest expire
    max_log_bytes: int = 8 * 2**20  # bytes of a log archived (its end); MariaDB's max_allowed_packet is 16 MiB
    sweep_interval: float = 60.0  # seconds between the leader's retention sweeps


@dataclass
class NotificationsConfig:
    """Webhooks and e-mail when a task ends or starts (`pink.notifications`); every limit has a default."""

    give_up_after: float = 86400.0  # seconds after its first try a delivery is given up
    first_retry: float = 30.0  # seconds before the first retry; each next waits twice as long
    max_retry_interval: float = 3600.0  # seconds: the longest wait between two tries
    max_attempts: int = 40  # tries of one delivery at most, whatever give_up_after leaves
    connect_timeout: float = 5.0  # seconds to connect to a receiver (or the SMTP relay)
    read_timeout: float = 10.0  # seconds a receiver (or the relay) has, once connected, to answer in all
    max_response_bytes: int = 64 * 2**10  # bytes of a receiver's answer read (the rest is dropped)
    allow_private: list[str] = field(default_factory=list)  # networks (CIDR) receivers may be in though private
    keep_days: float = 14.0  # days a delivery's record is kept (as [retention] output_days keeps logs)
    public_url: str = ""  # where people open PINK (the router), for task links; "": [web] url
    smtp_host: str = ""  # the relay e-mail goes through; "": no e-mail
    smtp_port: int = 587
    smtp_from: str = ""  # the sender's address; "": pink@<this host>
    smtp_starttls: bool = True  # STARTTLS before anything is sent (the relay must offer it)
    smtp_user: str = ""  # log in as this user ("": no login)
    smtp_password_file: str = ""  # a file holding the login's password (not the password itself)

    def __post_init__(self):
        """A zero or negative wait, timeout or count would retry in a tight loop, never
        connect, or prune at once: refused when the config is read, naming the setting."""
        for name in ("give_up_after", "first_retry", "max_retry_interval", "connect_timeout", "read_timeout",
                     "keep_days", "max_attempts", "max_response_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"[notifications] {name} must be a number above 0, got {value!r}")
        if isinstance(self.smtp_port, bool) or not isinstance(self.smtp_port, int) or not 0 < self.smtp_port < 65536:
            raise ConfigError(f"[notifications] smtp_port must be from 1 to 65535, got {self.smtp_port!r}")
        if self.max_retry_interval < self.first_retry:
            raise ConfigError("[notifications] max_retry_interval must be at least first_retry")
        if self.keep_days * 86400 < self.give_up_after:
            raise ConfigError("[notifications] keep_days must outlast give_up_after (a pending delivery "
                              "would be pruned before it is given up)")


@dataclass
class Config:
    host: str = ""  # this web node's name: its transfer queue is named after it
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_sentinels: list[str] = field(default_factory=list)  # host:port of Redis Sentinels; empty: none
    redis_master: str = "pink"  # the master's name the sentinels monitor
    node_ttl: int = 10  # seconds: a runner's lease; its record vanishes this long after it dies
    leader_ttl: int = 10  # seconds: the queue leader's lease on the leader key
    reconcile_interval: float = 2.0  # seconds between two passes of the leader over all tasks
    max_attempts: int = 3  # a task lost this many times ends `failed`
    max_job_failures: int = 8  # a transfer job failing this often fails its task (~8 min of backoff)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    db: DatabaseConfig = field(default_factory=DatabaseConfig)
    web: WebConfig = field(default_factory=WebConfig)
    ssh: SSHConfig = field(default_factory=SSHConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    path: str = ""


_SECTIONS = {"etcd": EtcdConfig, "db": DatabaseConfig, "web": WebConfig,
             "ssh": SSHConfig, "runner": RunnerConfig, "limits": LimitsConfig,
             "retention": RetentionConfig, "notifications": NotificationsConfig}


def _build(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(sorted(unknown))}")
    return cls(**data)


def from_mapping(data: dict, path: str = "") -> Config:
    """Build a Config from parsed TOML, refusing settings we do not know."""
    data = dict(data)
    sections = {name: _build(cls, data.pop(name, {}), f"[{name}]")
                for name, cls in _SECTIONS.items()}
    config = _build(Config, data, "the top level")
    for name, value in sections.items():
        setattr(config, name, value)
    config.path = path
    _check_dirs(config.web)
    return config


def _check_dirs(web: WebConfig) -> None:
    """The sweep deletes files no task owns in each of these: they must differ."""
    if web.spool_dir and web.output_dir and os.path.realpath(web.spool_dir) == os.path.realpath(web.output_dir):
        raise ConfigError("[web] spool_dir and output_dir must be different directories")


def load(path: str | os.PathLike | None = None) -> Config:
    """Read the config file named by `path` or by $PINK_CONFIG."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"no config file: pass --config or set {CONFIG_ENV}")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return from_mapping(data, str(Path(path).resolve()))
