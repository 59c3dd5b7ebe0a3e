"""Trivial tasks per second through PINK with two runners, against a loop of
raw `docker run --rm` at the same concurrency, in the same run (issue 3),
and where the CPU goes in each.

Both sides run the same one-line busybox image; PINK's concurrency is two
runners times their container slots, the raw loop uses that many threads.
PINK's tasks are submitted and timed as 7. times its batches (to the last
task archived, read from MariaDB once a second): polling each task over
HTTPS would load the web node being measured.

CPU: the machine's busy time (/proc/stat) over each phase, divided by the
tasks, and PINK's share by process (utime + stime from /proc/<pid>/stat of
the processes alive at both ends); what no long-lived process accounts for
is the containers' short-lived ones (runc, shims, the docker CLI) and the
benchmark's own client. Both sides share the machine's cores, so CPU per
task is what bounds tasks per second here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import subprocess
import time

from bench.drain import batch
from bench.measure import hello_image

TARGET = 0.8  # PINK's tasks per second as a fraction of raw docker run's
GROUPS = {  # process groups by the start of their command line
    "pink-web": "pink-web", "pink-worker": "pink-worker", "pink-leader": "pink-leader",
    "pink-runner": "pink-runner", "etcd": "etcd", "mariadbd": "mariadb", "redis-server": "redis",
    "dockerd": "dockerd", "containerd-shim": None, "containerd": "containerd", "sshd": "sshd",
}
TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float:
    fields = list(map(int, open("/proc/stat").readline().split()[1:]))
    return (sum(fields) - fields[3] - fields[4]) / TICK  # all but idle and iowait


def _by_pid() -> dict[str, tuple[str, float]]:
    """CPU seconds so far of each process of a group: pid -> (group, seconds)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        words = [os.path.basename(a.decode(errors="replace")) for a in argv[:2] if a]
        group = next((g for w in words for prefix, g in GROUPS.items() if w.startswith(prefix)), None)  # shims: None
        if group:
            out[pid] = (group, (int(stat[11]) + int(stat[12])) / TICK)
    return out


def _cpu(run) -> tuple[float, float, dict[str, float]]:
    """Run `run`; returns its result, the machine's busy CPU seconds and each
    group's, counting the processes alive at both ends."""
    busy, before = _machine_busy(), _by_pid()
    result = run()
    after, groups = _by_pid(), collections.Counter()
    for pid, (group, seconds) in after.items():
        if pid in before and before[pid][0] == group:
            groups[group] += seconds - before[pid][1]
    return result, _machine_busy() - busy, dict(groups)


def measure(api, client, workdir, config, tasks: int, concurrency: int, log) -> dict:
    tag, archive = hello_image(client, workdir)
    try:
        def raw_loop() -> float:
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(lambda _: subprocess.run(["docker", "run", "--rm", tag], check=True,
                                                       capture_output=True), range(tasks)))
            return tasks / (time.perf_counter() - started)

        raw, raw_cpu, raw_groups = _cpu(raw_loop)
        log(f"raw docker run x{concurrency}: {raw:.2f} tasks/s, {raw_cpu / tasks:.3f} CPU s per task")
        api.wait(api.submit(archive).json()["task"]["id"])  # one task first: the image is then cached
        pink, pink_cpu, groups = _cpu(lambda: batch(api, config, archive, tasks, log)["rate"])
        log(f"PINK, two runners: {pink:.2f} tasks/s, {pink_cpu / tasks:.3f} CPU s per task")
    finally:
        client.images.remove(tag, force=True)
    return {"tasks": tasks, "concurrency": concurrency, "raw": raw, "pink": pink,
            "raw_cpu": raw_cpu / tasks, "pink_cpu": pink_cpu / tasks,
            "groups": {g: s / tasks for g, s in sorted(groups.items(), key=lambda kv: -kv[1])},
            "raw_groups": {g: s / tasks for g, s in raw_groups.items()}}


def report(r: dict) -> list[str]:
    out = [f"### 5. Throughput: {r['tasks']} trivial tasks, concurrency {r['concurrency']}", "",
           "| what | tasks/s | x raw | target | machine CPU s per task |", "|---|---|---|---|---|",
           f"| raw `docker run --rm`, {r['concurrency']} threads | {r['raw']:.2f} | 1.00 | | "
           f"{r.get('raw_cpu', float('nan')):.3f} |",
           f"| PINK, two runners | {r['pink']:.2f} | {r['pink'] / r['raw']:.2f} | {TARGET} | "
           f"{r.get('pink_cpu', float('nan')):.3f} |", ""]
    if "groups" in r:
        raw_groups = r.get("raw_groups", {})
        out += ["CPU seconds per task by process (the rest: containers' short-lived processes, "
                "the docker CLI, kernel threads, the benchmark's client):", "",
                "| process | raw loop | PINK |", "|---|---|---|"]
        out += [f"| {g} | {raw_groups.get(g, 0.0):.3f} | {s:.3f} |" for g, s in r["groups"].items()]
        out += [f"| the rest | {r['raw_cpu'] - sum(raw_groups.values()):.3f} | "
                f"{r['pink_cpu'] - sum(r['groups'].values()):.3f} |", ""]
    return out
