"""11. sweep: one upload of N indexes against N separate warm tasks, in the same run (issue 21).

A trivial busybox image is run once first (so both sides find it cached
on the runner), then N separate tasks are submitted back to back over the
HTTPS API (`drain.batch`, the baseline), then one sweep of N indexes (a
grid over one variable). Each side is timed from its first submit to its
last task archived; the sweep's submit is timed on its own (one request
creating N tasks). Completion is read from the archive (the sweep through
its `sweep_id` index), once a second.
"""

from __future__ import annotations

import json
import time

from bench.drain import batch, wait_archived
from bench.measure import forget_image, hello_image, pink_once

TARGET_SUBMIT = 2.0  # seconds for the sweep's submit to answer, at most
TARGET_RATIO = 1.1  # the sweep's time to finish as a multiple of N separate tasks', at most


def run_sweep(api, config, archive, count: int, log) -> dict:
    """Submit one sweep of `count` indexes; time the submit and the run to the last index archived."""
    spec = {"grid": {"I": [str(i) for i in range(count)]}}
    started = time.time()
    r = api.submit(archive, sweep=json.dumps(spec, separators=(",", ":")))
    submitted = time.time()
    if r.status_code != 201:
        raise RuntimeError(f"the sweep's submit answered {r.status_code}: {r.text}")
    sweep_id = r.json()["sweep"]["id"]
    log(f"  sweep of {count} submitted in {submitted - started:.2f}s")
    finished = _wait_archived(config, sweep_id, count, log)
    seconds = finished - started
    log(f"  sweep of {count}: {seconds:.1f}s")
    return {"tasks": count, "submit_seconds": submitted - started, "seconds": seconds}


def _wait_archived(config, sweep_id: str, count: int, log) -> float:
    """When the sweep's last index was archived; raises if one did not succeed or none moves."""
    rows = wait_archived(config, "sweep_id", sweep_id, count, log)[0]
    states = {row["state"]: row["n"] for row in rows}
    if set(states) != {"succeeded"}:
        raise RuntimeError(f"the sweep's indexes ended {states}")
    return max(row["last"] for row in rows)


def measure(api, client, workdir, config, count: int, log) -> dict:
    tag, archive = hello_image(client, workdir)
    try:
        pink_once(api, archive)  # warm: both sides find the image on the runner
        log(f"{count} separate tasks")
        separate = batch(api, config, archive, count, log)
        log(f"one sweep of {count}")
        sweep = run_sweep(api, config, archive, count, log)
    finally:
        forget_image(client, tag, archive)
    return {"separate": separate, "sweep": sweep}


def rows(r: dict) -> list[tuple[str, str, str]]:
    sep, sw = r["separate"], r["sweep"]
    return [(f"11. sweep of {sw['tasks']}: submit answered in s", f"{sw['submit_seconds']:.2f}", f"< {TARGET_SUBMIT}"),
            (f"11. sweep of {sw['tasks']} to finished x {sep['tasks']} separate warm tasks",
             f"{sw['seconds'] / sep['seconds']:.2f}", f"<= {TARGET_RATIO}")]


def report(r: dict) -> list[str]:
    sep, sw = r["separate"], r["sweep"]
    return [f"### 11. Sweep of {sw['tasks']} indexes vs {sep['tasks']} separate warm tasks", "",
            "Both timed from the first submit to the last task archived; the image cached on the runner.", "",
            "| what | submitting took s | finished in s | x separate | target |", "|---|---|---|---|---|",
            f"| {sep['tasks']} separate tasks | {sep['submit_seconds']:.2f} | {sep['seconds']:.1f} | 1.00 | |",
            f"| one sweep of {sw['tasks']} | {sw['submit_seconds']:.2f} (target < {TARGET_SUBMIT}) | "
            f"{sw['seconds']:.1f} | {sw['seconds'] / sep['seconds']:.2f} | {TARGET_RATIO} |", ""]
