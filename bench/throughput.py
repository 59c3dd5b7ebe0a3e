"""Trivial tasks per second through PINK with two runners, against a loop of
raw `docker run --rm` at the same concurrency, in the same run (issue 3).

Both sides run the same one-line busybox image; PINK's concurrency is two
runners times their container slots, the raw loop uses that many threads.
PINK's tasks are submitted and timed as 7. times its batches (to the last
task archived, read from MariaDB once a second): polling each task over
HTTPS would load the web node being measured.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import time

from bench.drain import batch
from bench.measure import hello_image

TARGET = 0.8  # PINK's tasks per second as a fraction of raw docker run's


def measure(api, client, workdir, config, tasks: int, concurrency: int, log) -> dict:
    tag, archive = hello_image(client, workdir)
    try:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda _: subprocess.run(["docker", "run", "--rm", tag], check=True,
                                                   capture_output=True), range(tasks)))
        raw = tasks / (time.perf_counter() - started)
        log(f"raw docker run x{concurrency}: {raw:.2f} tasks/s")
        api.wait(api.submit(archive).json()["task"]["id"])  # one task first: the image is then cached
        pink = batch(api, config, archive, tasks, log)["rate"]
        log(f"PINK, two runners: {pink:.2f} tasks/s")
    finally:
        client.images.remove(tag, force=True)
    return {"tasks": tasks, "concurrency": concurrency, "raw": raw, "pink": pink}


def report(r: dict) -> list[str]:
    return [f"### 5. Throughput: {r['tasks']} trivial tasks, concurrency {r['concurrency']}", "",
            "| what | tasks/s | x raw | target |", "|---|---|---|---|",
            f"| raw `docker run --rm`, {r['concurrency']} threads | {r['raw']:.2f} | 1.00 | |",
            f"| PINK, two runners | {r['pink']:.2f} | {r['pink'] / r['raw']:.2f} | {TARGET} |", ""]
