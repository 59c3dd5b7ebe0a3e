"""Long CPU work gives way inside pink-web's gevent workers (pink.cooperative):
a big layer being hashed or a password being checked in one request must not
hold up the other requests of its process. Each check runs in a child
process patched as gunicorn's gevent worker patches itself."""

from __future__ import annotations

import subprocess
import sys

TICKER = """
from gevent import monkey; monkey.patch_all()
import gevent, gzip, io, os
from pink import blob_store, users

ticks = []
def tick():
    while True:
        ticks.append(1)
        gevent.sleep(0.001)

def work():
{work}

ticker = gevent.spawn(tick)
gevent.sleep(0)  # the ticker starts
before = len(ticks)
gevent.spawn(work).join()
ticker.kill()
print(len(ticks) - before)
"""

HASH = """
    data = gzip.compress(os.urandom(1 << 20) * 48, compresslevel=1)
    blob_store._hash_decompressed(io.BytesIO(data), "gzip", "0" * 64)
"""
SCRYPT = """
    for _ in range(3):
        users.verify_password("secret", users.hash_password("secret"))
"""


def _ticks_during(work: str) -> int:
    """How often another greenlet ran while `work` ran."""
    out = subprocess.run([sys.executable, "-c", TICKER.format(work=work)], capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_hashing_a_big_layer_lets_other_requests_run():
    """48 MiB of gzip decompressed and hashed: other greenlets run between its chunks."""
    assert _ticks_during(HASH) >= 5


def test_a_password_check_runs_off_the_event_loop():
    """Six 16 MiB scrypts (three hashes, three checks): other greenlets run meanwhile."""
    assert _ticks_during(SCRYPT) >= 5
