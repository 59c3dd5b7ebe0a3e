"""A task's log, copied from Docker into its outbox file, whole across dockerd restarts.

Docker's follow stream ends when dockerd stops, and with live-restore (on in
every deployment) the container runs on: its output waits in the shim's pipe,
and dockerd logs it once it is back. So a stream that ends is not the end of
the log. The follower asks Docker again, from where it was, until the
container has exited and Docker's last line is the last one written; while
dockerd does not answer it tries again every RETRY seconds.

"Where it was" is the timestamp Docker gives each frame (`timestamps=True`,
stripped before writing): a resumed read starts at it (`since`), and the
frames of the seam already written are skipped. Each frame is thus read
about once, and a chatty task costs the runner what it writes, never a
re-read of its whole log (the outbox file keeps it all; the archive keeps its
last `[retention] max_log_bytes`). Docker's own filtering by `since` still
scans its log file, once per dockerd restart.

Used by execution; an adopted container (a runner restart) is followed from
Docker's start, the log written again.
"""

from __future__ import annotations

import logging
import re
import threading
from calendar import timegm
from dataclasses import dataclass
from typing import BinaryIO

import requests
from docker.errors import DockerException, NotFound

log = logging.getLogger("pink.runner")

RETRY = 0.5  # seconds between tries while dockerd does not answer (restarting)
# Nanoseconds a resumed read starts before the last frame written: `since`
# goes to Docker as a float, whose rounding (about 0.2 us) must not skip a frame.
SEAM_NS = 1000
FINISHED = ("exited", "dead")  # a container in these states writes no more
_STAMP = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z")


def nanoseconds(stamp: bytes) -> int | None:
    """Docker's frame timestamp (RFC 3339 in UTC, up to nanoseconds) as
    nanoseconds since the epoch; None if it is not one."""
    found = _STAMP.fullmatch(stamp)
    if found is None:
        return None
    seconds = timegm(tuple(int(x) for x in re.split(rb"[-T:]", found[1])))
    return seconds * 10**9 + int((found[2] or b"").ljust(9, b"0"))


@dataclass
class Cursor:
    """Where the copy is in Docker's log: the timestamp of the last frame
    written and how many frames in a row bore it (Docker stamps every part
    of a long line alike), so that a read resumed there skips them."""

    stamp: bytes = b""  # as Docker sent it; b"": nothing written yet
    repeats: int = 0
    seam: int | None = None  # while a resumed read re-reads old frames: `stamp` in ns
    again: int = 0  # frames stamped `seam` met again in this read

    def since(self) -> dict:
        """Arguments of `container.logs` for a read from here."""
        ns = nanoseconds(self.stamp) if self.stamp else None
        return {} if ns is None else {"since": max(ns - SEAM_NS, 1) / 1e9}

    def resume(self) -> None:
        """A new read begins: it repeats a few frames up to `stamp`."""
        self.seam, self.again = (nanoseconds(self.stamp) if self.stamp else None), 0

    def admit(self, stamp: bytes) -> bool:
        """Whether the frame stamped `stamp` is new, and so to be written.

        Only the seam of a resumed read is compared: past its first new
        frame every frame is written, whatever its stamp (stdout and stderr
        are stamped apart, and may reach Docker's file slightly out of order).
        """
        if self.seam is not None:
            ns = nanoseconds(stamp)
            if ns is not None and ns < self.seam:
                return False
            if ns == self.seam and self.again < self.repeats:
                self.again += 1
                return False
            self.seam = None
        self.stamp, self.repeats = stamp, (self.repeats + 1 if stamp == self.stamp else 1)
        return True


def follow(container, out: BinaryIO, stop: threading.Event, retry: float = RETRY) -> None:
    """Copy the container's log into `out` until it has exited and all of it
    is written. `stop` set (the execution gave up waiting), the container
    removed or `out` closed end it sooner; dockerd not answering does not."""
    cursor, unanswered = Cursor(), False
    while not stop.is_set():
        try:
            copy(container, out, cursor)
            if complete(container, cursor):
                return
            unanswered = False
        except NotFound:
            return  # removed: nothing more to read
        except ValueError:
            return  # `out` was closed: the execution is over
        except (DockerException, requests.exceptions.RequestException) as exc:  # dockerd restarting
            if not unanswered:  # said once an outage, not every RETRY
                log.warning("log of %s: Docker does not answer (%s); following it again when it does",
                            container.name, exc)
            unanswered = True
        stop.wait(retry)


def copy(container, out: BinaryIO, cursor: Cursor) -> None:
    """Follow Docker's log from `cursor` into `out` until the stream ends
    (the container exited, or dockerd stopped)."""
    cursor.resume()
    for frame in container.logs(stream=True, follow=True, timestamps=True, **cursor.since()):
        stamp, _, line = frame.partition(b" ")
        if cursor.admit(stamp):
            out.write(line)


def complete(container, cursor: Cursor) -> bool:
    """Whether the whole log is written: the container has exited and
    Docker's last frame is no newer than the last one written (a stream
    that dockerd's stop ended looks like one that the exit ended). Not
    "the same frame": one a seam skipped for its older stamp would never be."""
    container.reload()
    if container.status not in FINISHED:
        return False
    last = container.logs(tail=1, timestamps=True).partition(b" ")[0]
    if not last or last == cursor.stamp:
        return True
    newest, written = nanoseconds(last), nanoseconds(cursor.stamp)
    return newest is not None and written is not None and newest <= written
