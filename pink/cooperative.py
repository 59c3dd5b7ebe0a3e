"""Long CPU work inside pink-web's gevent workers.

pink-web serves each process's requests as greenlets on one thread
(`web/serve.py`), so that an idle followed log or long poll costs no thread.
The price is that a request computing for a long time without touching the
network holds up every other request of its process: hashing a multi-GB
layer, or a 16 MiB scrypt at each password login. Loops over big data give
way between chunks (`give_way`), and a single long C call runs on the gevent
hub's thread pool (`off_the_loop`; hashlib releases the GIL). Outside a
gevent process (queue workers, runners, tests) work runs as it always did.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from gevent import get_hub, monkey

T = TypeVar("T")


PAUSE = 0.0001  # seconds: a timer, so that gevent's loop polls its sockets (sleep(0) runs only ready greenlets)


def give_way() -> None:
    """Let the process's other requests run (nothing without gevent)."""
    if monkey.is_module_patched("time"):
        time.sleep(PAUSE)


def off_the_loop(fn: Callable[..., T], *args) -> T:
    """`fn(*args)`, on a real thread when this process runs gevent's hub."""
    if monkey.is_module_patched("threading"):
        return get_hub().threadpool.apply(fn, args)
    return fn(*args)
