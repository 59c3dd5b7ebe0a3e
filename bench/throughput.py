"""Trivial tasks per second through PINK with two runners, against a loop of
raw `docker run --rm` at the same concurrency, in the same run (issue 3).

Both sides run the same one-line busybox image; PINK's concurrency is two
runners times their container slots, the raw loop uses that many threads.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import time

from bench.measure import hello_image
from tests.helpers import FINAL

TARGET = 0.8  # PINK's tasks per second as a fraction of raw docker run's


def measure(api, client, workdir, tasks: int, concurrency: int, log) -> dict:
    tag, archive = hello_image(client, workdir)
    try:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda _: subprocess.run(["docker", "run", "--rm", tag], check=True,
                                                   capture_output=True), range(tasks)))
        raw = tasks / (time.perf_counter() - started)
        log(f"raw docker run x{concurrency}: {raw:.2f} tasks/s")
        api.submit(archive)  # one task first, so every runner below may find the image cached
        started = time.perf_counter()
        ids = [api.submit(archive).json()["task"]["id"] for _ in range(tasks)]
        pending = set(ids)
        while pending:
            for task_id in list(pending):
                task = api.task(task_id)
                if task["state"] in FINAL:
                    if task["state"] != "succeeded":
                        raise RuntimeError(f"task {task_id} ended {task['state']}")
                    pending.discard(task_id)
            time.sleep(0.05)
        pink = tasks / (time.perf_counter() - started)
        log(f"PINK, two runners: {pink:.2f} tasks/s")
    finally:
        client.images.remove(tag, force=True)
    return {"tasks": tasks, "concurrency": concurrency, "raw": raw, "pink": pink}


def report(r: dict) -> list[str]:
    return [f"### 5. Throughput: {r['tasks']} trivial tasks, concurrency {r['concurrency']}", "",
            "| what | tasks/s | x raw | target |", "|---|---|---|---|",
            f"| raw `docker run --rm`, {r['concurrency']} threads | {r['raw']:.2f} | 1.00 | |",
            f"| PINK, two runners | {r['pink']:.2f} | {r['pink'] / r['raw']:.2f} | {TARGET} |", ""]
