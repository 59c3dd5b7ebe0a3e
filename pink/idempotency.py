"""The rules of the `Idempotency-Key` header on the doors that create a task.

A client that got 502, 503 or 504 (or nothing) for a submit cannot tell
whether the task was made. Sending the same key again is safe: within a day
the same user's key answers the task it made first (200, the same body as
the first 201) and never makes a second; the same key with other parameters
is refused (422), as the IETF draft "The Idempotency-Key HTTP Header Field"
and Stripe do. The key is kept in etcd (`pink.store.Keys.idempotency`),
written in the same transaction as the task record, so a crash can never
leave one without the other (`pink.control.create`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from pink.errors import BadRequest, PinkError

HEADER = "Idempotency-Key"
TTL = 24 * 3600  # seconds a key is remembered (the lease of its etcd key)
MAX_CHARS = 255
_KEY = re.compile(r"[\x20-\x7e]{1,%d}" % MAX_CHARS)  # printable ASCII


@dataclass(frozen=True)
class Claim:
    """A request's key and the fingerprint of what it asks for."""

    key: str
    fingerprint: str  # sha256 of the door and its parameters

    @property
    def digest(self) -> str:
        """The key's name in etcd: fixed length, whatever characters the client chose."""
        return hashlib.sha256(self.key.encode()).hexdigest()

    def entry(self, task_id: str) -> dict:
        return {"task": task_id, "fingerprint": self.fingerprint}


def claim(header: str | None, door: str, **parameters: Any) -> Claim | None:
    """The request's claim (None without the header); BadRequest for a malformed key.

    `door` and `parameters` (the task's parameters, and what the door builds
    the task from: the upload session, the task rerun) make the fingerprint.
    """
    if header is None:
        return None
    if not _KEY.fullmatch(header):
        raise BadRequest(f"{HEADER} must be 1 to {MAX_CHARS} printable ASCII characters "
                         f"(got {len(header)} characters); a random UUID is a good key",
                         code="bad_idempotency_key")
    canonical = json.dumps({"door": door, **parameters}, sort_keys=True, separators=(",", ":"), default=str)
    return Claim(key=header, fingerprint=hashlib.sha256(canonical.encode()).hexdigest())


def first_task(claim: Claim, entry: dict) -> str:
    """The task a key already made; 422 when this request asks for something else."""
    if entry.get("fingerprint") != claim.fingerprint:
        raise PinkError(f"{HEADER} {claim.key[:80]!r} was already used with other parameters (for task "
                        f"{entry.get('task')}); use a new key for a new request",
                        code="idempotency_key_reused", status=422)
    return entry["task"]
