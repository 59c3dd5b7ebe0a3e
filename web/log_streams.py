"""Followed logs (`GET /api/v1/tasks/<id>/logs?follow=1`): how many a web node
serves at once, and how it notices that the client of one has left.

A follow of a silent task holds no thread (pink-web's workers are gevent's,
a greenlet per connection), but it does hold an SSH session to its task's
runner and reads the task from etcd twice a second, so two things bound what
followers can take from everyone else:

**Caps, counted as flock'ed slot files.** A follow holds one of
`log_streams_per_user` slots named after its user and one of
`log_streams_per_node` slots of the node, each an exclusive `flock` on a file
in `<web spool's parent>/log-streams/`. flock is shared by every gunicorn
worker process of the node and is released by the kernel when its holder
closes the file or dies, so a killed worker leaks nothing and nothing (not
Redis, which may be down for a while) has to be reachable or swept. Taking a
slot tries at most the cap's worth of files; nothing grows with history.

**Noticing a gone client without heartbeats in the log.** `curl -N` and
`pink logs -f` print exactly the log's bytes, so nothing may be written
into a `text/plain` log that the task did not write (as `kubectl logs -f`
and `docker logs -f` write nothing either). Instead, while the task is
silent the follow waits on the client's socket rather than sleeping: during
a streamed response an HTTP/1.1 client has nothing to send, so a readable
socket means it closed (FIN, RST, or TLS close_notify) or spoke out of turn,
and the follow ends within one poll (`POLL`, 0.5 s). For a client that
vanished without a word (a laptop closing, a cut network), TCP keepalive
probes on the connection are the heartbeat: unanswered, the kernel errors the
socket after about `KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL`
seconds, which makes it readable too. A follow also ends after
`log_follow_seconds` (1 h shipped); the CLI and the page then resume from
their offset if the task is still live, so a client gone in a way no probe
sees (a proxy in between that keeps its side open) holds a slot an hour at most.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import IO

from pink.config import Config
from pink.errors import TooManyRequests

POLL = 0.5  # seconds a silent follow waits (on its client's socket) between reads of the log
KEEPALIVE_IDLE = 15  # seconds of a silent connection before the first keepalive probe
KEEPALIVE_INTERVAL = 5  # seconds between unanswered probes
KEEPALIVE_COUNT = 3  # unanswered probes after which the kernel drops the connection
RUN_DIR = "log-streams"  # beside the web spool: the slot files


def run_dir(config: Config) -> str:
    return os.path.join(os.path.dirname(config.web.spool_dir.rstrip("/")), RUN_DIR)


@dataclass
class Slots:
    """The slot files one follow holds locked; `release` is idempotent."""

    held: list[IO] = field(default_factory=list)

    def release(self) -> None:
        while self.held:
            self.held.pop().close()  # closing the file releases its flock


def _take_one(directory: str, name: str, cap: int) -> IO | None:
    """A locked slot file `<name>-<i>` for some i < cap, or None when all are held."""
    for i in range(cap):
        fh = open(os.path.join(directory, f"{name}-{i}"), "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            fh.close()
    return None


def _user_slot_name(user: str) -> str:
    """A file name for any user name (which may hold characters a path must not)."""
    return "user-" + hashlib.sha256(user.encode()).hexdigest()[:24]


def acquire(config: Config, user: str) -> Slots:
    """The slots for one more follow by `user`, or 429 naming the cap that is full."""
    limits = config.limits
    directory = run_dir(config)
    os.makedirs(directory, exist_ok=True)
    slots = Slots()
    try:
        if limits.log_streams_per_user:
            _take(slots, directory, _user_slot_name(user), limits.log_streams_per_user, "log_streams_per_user",
                  f"user limit: you follow {limits.log_streams_per_user} logs on this web node already "
                  f"(log_streams_per_user = {limits.log_streams_per_user}); close another follow "
                  "(a `pink logs -f` or a task page), or read the log without follow")
        if limits.log_streams_per_node:
            _take(slots, directory, "node", limits.log_streams_per_node, "log_streams_per_node",
                  f"node limit: this web node serves {limits.log_streams_per_node} followed logs already "
                  f"(log_streams_per_node = {limits.log_streams_per_node}); try again in a while, or read "
                  "the log without follow")
    except BaseException:
        slots.release()
        raise
    return slots


def _take(slots: Slots, directory: str, name: str, cap: int, limit: str, refusal: str) -> None:
    fh = _take_one(directory, name, cap)
    if fh is None:
        raise TooManyRequests(refusal, code=limit)
    slots.held.append(fh)


def open_streams(config: Config) -> int:
    """How many follows this node serves now (node slots held), for tests and operators."""
    directory = run_dir(config)
    held = 0
    for i in range(config.limits.log_streams_per_node):
        path = os.path.join(directory, f"node-{i}")
        if not os.path.exists(path):
            continue
        with open(path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held += 1
    return held


class Client:
    """The follower's connection, as far as a silent follow needs it: is it still there?"""

    def __init__(self, environ: dict, stopping=lambda: False):
        self.stopping = stopping
        self.sock = environ.get("gunicorn.socket")
        if self.sock is not None:
            _keepalive(self.sock)

    def wait(self, seconds: float) -> bool:
        """Wait up to `seconds`; False as soon as the client has left (or spoke
        out of turn), or the server is stopping (the client resumes elsewhere)."""
        if self.stopping():
            return False
        if self.sock is None:  # not under gunicorn (a test client): nothing to watch
            time.sleep(seconds)
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], seconds)
        except (OSError, ValueError):  # closed under us
            return False
        return not readable


def _keepalive(sock: socket.socket) -> None:
    """Probe a silent connection so that a peer gone without a word errors the socket."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except (OSError, AttributeError):  # not TCP (a unix socket): closes are still seen
        pass
