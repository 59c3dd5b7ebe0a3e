"""How fast a long queue of trivial tasks drains, against a short one, in the
same run (issue 3).

`baseline` and then `tasks` one-line busybox tasks are submitted back to back
over the HTTPS API (so the queue builds up: uploads are much faster than the
runners), and each batch is timed from its first submit to the last task
archived. Completion is read from MariaDB's archive, one query a second,
rather than by polling every task over HTTPS, which would load the web node
whose throughput is being measured.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid

from bench.measure import forget_image, hello_image, pink_once
from pink import db

TARGET = 0.9  # the long queue's tasks per second as a fraction of the short one's, at least
STALL_TIMEOUT = 180.0  # seconds without a task finishing before the batch is declared stuck
POLL = 1.0  # seconds between two reads of the archive


def batch(api, config, archive, count: int, log, etcd_status=None, threads: int = 1) -> dict:
    """Submit `count` tasks back to back (from `threads` threads at once: a burst);
    time them to the last one archived (also 5.'s and the Slurm comparison's PINK side)."""
    name = f"bench-drain-{uuid.uuid4().hex[:8]}"  # every task of the batch, for the archive query

    def submit(_: int) -> None:
        r = api.submit(archive, name=name)
        if r.status_code != 201:
            raise RuntimeError(f"submit answered {r.status_code}: {r.text}")

    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(submit, range(count)))
    submitted = time.time()
    log(f"  {count} tasks submitted in {submitted - started:.1f}s")
    rows, samples = wait_archived(config, "name", name, count, log, etcd_status)
    states = {row["state"]: row["n"] for row in rows}
    if set(states) != {"succeeded"}:
        raise RuntimeError(f"tasks ended {states}; errors: {_errors(config, name)}")
    finished = max(row["last"] for row in rows)
    seconds = finished - started
    log(f"  {count} tasks: {seconds:.1f}s, {count / seconds:.2f} tasks/s")
    return {"tasks": count, "submit_seconds": submitted - started, "seconds": seconds,
            "rate": count / seconds, "etcd": _quarters(samples, count)}


WHERE = {"name": "name = %s", "sweep_id": "sweep_id = %s"}  # the archive columns a batch is found by


def wait_archived(config, column: str, value: str, count: int, log, etcd_status=None) -> tuple[list[dict], list]:
    """Wait until `count` tasks whose `column` is `value` are archived; their
    (state, n, last finish) rows, and etcd's status once a second (with
    `etcd_status`). Read from MariaDB, one query a second, so as not to load
    the web node being measured; raises when none finishes for STALL_TIMEOUT."""
    conn = db.connect(config.db)
    samples = []  # (tasks finished, etcd's status) once a second
    try:
        done, progress_at, logged = 0, time.monotonic(), time.monotonic()
        while True:
            conn.rollback()  # a fresh snapshot: InnoDB's repeatable read would keep the old one
            with conn.cursor() as cur:
                cur.execute("SELECT state, COUNT(*) AS n, MAX(finished_at) AS last FROM tasks "
                            f"WHERE {WHERE[column]} GROUP BY state", (value,))
                rows = cur.fetchall()
            total = sum(row["n"] for row in rows)
            if total > done:
                done, progress_at = total, time.monotonic()
            if etcd_status:
                samples.append((done, etcd_status()))
            if done >= count:
                return list(rows), samples
            if time.monotonic() - progress_at > STALL_TIMEOUT:
                raise RuntimeError(f"{count - done} of {count} tasks not finished and none "
                                   f"finished for {STALL_TIMEOUT:.0f}s")
            if time.monotonic() - logged > 30:
                log(f"  {done}/{count} finished")
                logged = time.monotonic()
            time.sleep(POLL)
    finally:
        conn.close()


def _quarters(samples: list, count: int) -> list[dict]:
    """etcd's status when the first quarter, half, ... of the batch had finished."""
    out = []
    for share in (0.25, 0.5, 0.75, 1.0):
        at = next(((done, status) for done, status in samples if done >= share * count), None)
        if at:
            out.append({"share": share, "done": at[0], **at[1]})
    return out


def _errors(config, name: str) -> dict:
    conn = db.connect(config.db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT error, COUNT(*) AS n FROM tasks WHERE name = %s AND state <> 'succeeded' "
                        "GROUP BY error", (name,))
            return {row["error"]: row["n"] for row in cur.fetchall()}
    finally:
        conn.close()


def measure(api, client, workdir, config, tasks: int, baseline: int, log, etcd_status=None) -> dict:
    """`etcd_status`: called once a second while the long queue drains (devcluster.local's)."""
    tag, archive = hello_image(client, workdir)
    try:
        pink_once(api, archive)  # one task first, so that both batches find the image cached
        log(f"{baseline} queued tasks")
        short = batch(api, config, archive, baseline, log)
        log(f"{tasks} queued tasks")
        long = batch(api, config, archive, tasks, log, etcd_status)
    finally:
        forget_image(client, tag, archive)
    return {"short": short, "long": long}


def report(r: dict) -> list[str]:
    short, long = r["short"], r["long"]
    return [f"### 7. Drain: {long['tasks']:,} queued trivial tasks vs {short['tasks']}", "",
            "Each batch submitted back to back over HTTPS, timed from its first submit to its "
            "last task archived.", "",
            "| queue | submitting took s | drained in s | tasks/s | x short queue | target |",
            "|---|---|---|---|---|---|",
            f"| {short['tasks']} tasks | {short['submit_seconds']:.1f} | {short['seconds']:.1f} | "
            f"{short['rate']:.2f} | 1.00 | |",
            f"| {long['tasks']:,} tasks | {long['submit_seconds']:.1f} | {long['seconds']:.1f} | "
            f"{long['rate']:.2f} | {long['rate'] / short['rate']:.2f} | {TARGET} |", "",
            *etcd_report(long)]


def etcd_report(batch: dict) -> list[str]:
    points = batch.get("etcd") or []
    if len(points) < 2:
        return []
    half = next(p for p in points if p["share"] == 0.5)
    out = [f"etcd's database while the {batch['tasks']:,} tasks drained (file: its size on disk; "
           "in use: the pages holding data, the rest being free pages reused before the file grows):", "",
           "| tasks finished | revision | file MiB | x at half | in use MiB |", "|---|---|---|---|---|"]
    out += [f"| {p['done']:,} | {p['revision']:,} | {p['db_size'] / 2**20:.2f} | "
            f"{p['db_size'] / half['db_size']:.2f} | {p['db_size_in_use'] / 2**20:.2f} |" for p in points]
    return out + [""]


def etcd_flat(r: dict) -> float | None:
    """The file's size when the long queue had drained, as a multiple of its size at half way."""
    points = {p["share"]: p for p in r["long"].get("etcd") or []}
    if 0.5 in points and 1.0 in points:
        return points[1.0]["db_size"] / points[0.5]["db_size"]
    return None
