"""PINK's exceptions: each carries a stable code and a message for people.

The web layer turns a PinkError into `{"error": code, "message": text}` with
its HTTP status; the CLI prints the message and exits 1.
"""


class PinkError(Exception):
    code = "error"
    status = 500

    def __init__(self, message: str, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status


class ConfigError(PinkError):
    code = "bad_config"


class BadRequest(PinkError):
    code = "bad_request"
    status = 400


class ArchiveError(BadRequest):
    """An uploaded image archive that cannot be trusted or used."""

    code = "bad_archive"


class TooLarge(PinkError):
    code = "too_large"
    status = 413


class Unauthorized(PinkError):
    code = "unauthorized"
    status = 401


class Forbidden(PinkError):
    code = "forbidden"
    status = 403


class NotFound(PinkError):
    code = "not_found"
    status = 404


class Conflict(PinkError):
    """A compare-and-swap lost: somebody else moved the record first."""

    code = "conflict"
    status = 409


class Gone(PinkError):
    """It existed, and was removed on purpose (an expired output or log)."""

    code = "gone"
    status = 410


class TooManyRequests(PinkError):
    """A per-user limit refuses this request now; it may succeed later."""

    code = "user_limit"
    status = 429


class Unavailable(PinkError):
    """A service PINK depends on (etcd, MariaDB, a runner) cannot be reached."""

    code = "unavailable"
    status = 503
