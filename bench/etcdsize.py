"""etcd's database through a benchmark run: its size at each checkpoint.

etcd keeps every revision of every key until it is compacted; PINK's cluster
runs it with periodic auto-compaction (devcluster.local), and a finished
task leaves etcd once archived. So the database should stay flat however
many tasks pass through: what it holds is the live state plus the last
retention period's changes. `checkpoint` reads etcd's own status (file size,
bytes in use, revision) and counts PINK's keys; `settle` waits until the
history written so far has been compacted away.
"""

from __future__ import annotations

import time
import urllib.error

from pink import db
from devcluster.etcd_service import ETCD_COMPACTION_RETENTION, b64

SETTLE_TIMEOUT = 240.0  # seconds to wait: compaction runs once per retention period (1 min here)


def checkpoint(cluster, label: str, config) -> dict:
    """etcd's status, PINK's keys in it, and how many tasks the archive holds."""
    conn = db.connect(config.db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) AS n FROM tasks")
            archived = cur.fetchone()["n"]
    finally:
        conn.close()
    return {"label": label, **cluster.etcd_status(), "keys": cluster.etcd_count(config.etcd.prefix.rstrip("/") + "/"),
            "archived": archived, "at": time.time()}


def baseline(points: list[dict]) -> dict:
    """The first checkpoint after tasks have run: a fresh etcd's file is a
    few KiB and grows by whole pages at the first writes, whatever the load."""
    return next((p for p in points if p["archived"]), points[0])


def mark(cluster) -> dict:
    """Where the work ended: the revision whose history `settle` waits to see compacted."""
    return {"revision": cluster.etcd_status()["revision"], "at": time.monotonic()}


def settle(cluster, marked: dict, log, timeout: float = SETTLE_TIMEOUT) -> float:
    """Wait until a read at the marked revision - 1 is refused as compacted;
    returns the seconds since the mark (other measurements may run meanwhile)."""
    revision = marked["revision"]
    log(f"waiting for etcd to compact revision {revision - 1} "
        f"(retention {ETCD_COMPACTION_RETENTION})")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            cluster.etcd("kv/range", {"key": b64("/"), "revision": revision - 1})
        except urllib.error.HTTPError as exc:
            if "compacted" in exc.read().decode(errors="replace"):
                _until_steady(cluster)
                return time.monotonic() - marked["at"]
            raise
        time.sleep(2)
    raise RuntimeError(f"etcd did not compact revision {revision - 1} within {timeout:.0f}s")


PROBE_KEY = "/pink-bench-probe"  # written and deleted to make etcd's database commit


def _until_steady(cluster, interval: float = 2.0, longest: float = 60.0) -> None:
    """A compacted revision is refused at once, but the old revisions are
    deleted from the database afterwards, in batches, and the pages they
    held count as free only once a later write commits (an idle cluster has
    none): write, then wait until the bytes in use stop falling."""
    deadline = time.monotonic() + longest
    last = None
    while time.monotonic() < deadline:
        cluster.etcd("kv/put", {"key": b64(PROBE_KEY), "value": b64("x")})
        cluster.etcd("kv/deleterange", {"key": b64(PROBE_KEY)})
        time.sleep(interval)
        now = cluster.etcd_status()["db_size_in_use"]
        if last is not None and now >= last:
            return
        last = now


def report(points: list[dict], settled_after: float | None) -> list[str]:
    first = baseline(points)
    out = ["### etcd's database through the run", "",
           f"Auto-compaction: periodic, retention {ETCD_COMPACTION_RETENTION}; backend quota: "
           "etcd's default (2 GiB). Size = the database file; in use = the part holding data "
           "(the rest is free pages etcd reuses before growing the file). Ratios are to "
           f"\"{first['label']}\", the first checkpoint after tasks had run.", "",
           "| checkpoint | tasks archived | revision | PINK keys | size MiB | x | in use MiB | x |",
           "|---|---|---|---|---|---|---|---|"]
    for p in points:
        out.append(f"| {p['label']} | {p['archived']:,} | {p['revision']:,} | {p['keys']:,} | "
                   f"{p['db_size'] / 2**20:.2f} | {p['db_size'] / first['db_size']:.2f} | "
                   f"{p['db_size_in_use'] / 2**20:.2f} | {p['db_size_in_use'] / first['db_size_in_use']:.2f} |")
    out.append("")
    if settled_after is not None:
        out += [f"The last row was read once etcd had compacted the history of the runs above "
                f"({settled_after:.0f} s after they ended; the transfer, memory and planner "
                "measurements ran meanwhile).", ""]
    return out
