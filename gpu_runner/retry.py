"""Waiting out a control-plane blip while the runner's lease still holds.

pyetcd does not retry: one etcd member restarting, or etcd out of reach for
a few seconds, fails a call with `Unavailable`. A runner that gave up there
would fail (or silently drop) work that is done. Until the lease is known
lost nobody else may act for this node, so the write is simply tried again.
Used by execution (reports) and the agent (its node record).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from pink.errors import Unavailable

log = logging.getLogger("pink.runner")

FIRST_DELAY = 0.2  # seconds before the first retry; doubled each time
MAX_DELAY = 2.0  # seconds: the longest wait between two tries

T = TypeVar("T")


class LeaseLost(Exception):
    """The runner's lease (or this execution's epoch) is gone: stop without writing."""


def while_leased(action: Callable[[], T], lease_lost: Callable[[], bool], what: str) -> T:
    """`action()`'s result, retried with backoff while it raises `Unavailable`.

    Raises `LeaseLost` once `lease_lost()` says so: from then on the leader
    has (or will have) re-queued this node's tasks, and a late write could
    only be refused by the fence or, unfenced, mislead.
    """
    delay = FIRST_DELAY
    while True:
        if lease_lost():
            raise LeaseLost()
        try:
            return action()
        except Unavailable as exc:
            log.warning("could not %s (%s); trying again in %.1fs", what, exc.message, delay)
        time.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)
