"""PINK's exceptions: each carries a stable code and a message for people.

The web layer turns a PinkError into `{"error": code, "message": text}` with
its HTTP status; the CLI prints the message and exits 1.

Each kind names its code and status in its class line
(`class NotFound(PinkError, code="not_found", status=404)`), so this module
reads as the table it is: one line per kind, and what it means below it.
A daemon's loop (the leader's election, a runner's epoch) logs a PinkError's
message, or any other failure with its traceback, and goes on
(`outlive_failure`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class PinkError(Exception):
    code = "error"
    status = 500

    def __init_subclass__(cls, code: str | None = None, status: int | None = None, **kwargs):
        """Take a subclass's code and status from its class line; one left out
        is inherited (a subclass may also set them as class attributes)."""
        super().__init_subclass__(**kwargs)
        if code:
            cls.code = code
        if status:
            cls.status = status

    def __init__(self, message: str, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status


class ConfigError(PinkError, code="bad_config"):
    """A config or settings file that is missing, unreadable or wrong."""


class BadRequest(PinkError, code="bad_request", status=400):
    """A request (or argument) that can never succeed as it is."""


class ArchiveError(BadRequest, code="bad_archive"):
    """An uploaded image archive that cannot be trusted or used."""


class TooLarge(PinkError, code="too_large", status=413):
    """An image upload over the size the server accepts."""


class Unauthorized(PinkError, code="unauthorized", status=401):
    """No credentials, or ones the server does not accept: log in (again)."""


class Forbidden(PinkError, code="forbidden", status=403):
    """Who is asking is known, and may not do this."""


class NotFound(PinkError, code="not_found", status=404):
    """No such task, user, node, upload or blob (the code says which)."""


class Conflict(PinkError, code="conflict", status=409):
    """A compare-and-swap lost: somebody else moved the record first."""


class Gone(PinkError, code="gone", status=410):
    """It existed, and was removed on purpose (an expired output or log)."""


class TooManyRequests(PinkError, code="user_limit", status=429):
    """A per-user limit refuses this request now; it may succeed later."""


class Unavailable(PinkError, code="unavailable", status=503):
    """A service PINK depends on (etcd, MariaDB, a runner) cannot be reached."""


@contextmanager
def outlive_failure(log: logging.Logger, who: str, then: str, stop: threading.Event) -> Iterator[None]:
    """Let a daemon's loop outlive any one failure of the round run in the
    block: a PinkError is logged by its message, anything else with its
    traceback and what the loop does `then`; either way the loop pauses a
    second (or until `stop`) before its next round."""
    try:
        yield
    except PinkError as exc:
        log.warning("%s: %s", who, exc.message)
        stop.wait(1.0)
    except Exception:  # noqa: BLE001 - a daemon must outlive any one failure
        log.exception("%s: unexpected error; %s", who, then)
        stop.wait(1.0)
