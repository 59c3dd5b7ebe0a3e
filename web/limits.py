"""Per-user limits as users see them: each limit, the user's current use, and
what it caps, for `GET /api/v1/usage` (and so `pink usage`) and the account
page. A refusal names the limit it hit; this is where a user looks it up.

The values and the use come from `pink.control.limits_of` (one read of the
user's index, not of the history); the words live here, once.
"""

from __future__ import annotations

from pink import control
from web.resources import res

CAPS = {
    "live_tasks_per_user": "your tasks not yet archived, queued to exported (each is an etcd record)",
    "queued_per_user": "your tasks waiting for a GPU; more are refused",
    "gpus_per_user": "GPUs your tasks hold at once; more wait",
    "upload_bytes_per_user": "bytes of the images your live tasks and open uploads hold",
    "upload_sessions_per_user": "layer-upload sessions you hold open at once",
    "output_bytes_per_task": "bytes of one task's output; a bigger export fails the task",
    "log_streams_per_user": "logs you follow at once on one web node",
    "log_streams_per_node": "logs one web node streams at once, for everyone",
    "record_bytes": "bytes of one task's parameters (name, env, command, entrypoint)",
    "max_output_bytes_per_user": "bytes of your stored outputs; beyond it the oldest expire",
    "max_log_bytes": "bytes of one task's log kept after it ends (its end is kept)",
}


def of(user: str) -> dict[str, dict]:
    """{limit name: {"limit", "used", "caps"}}; a limit of 0 means none, a use of None is not counted here."""
    found = control.limits_of(res().store, res().config, user)
    return {name: {**entry, "caps": CAPS.get(name, "")} for name, entry in found.items()}

