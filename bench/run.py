"""`make bench`: PINK against the tools it replaces, measured in one run.

1. latency: submit-to-finished of a one-line busybox task (cold and warm) vs
   `docker run --rm` of the same image; where the time goes, from the task's
   timings.
2. transfer: a 1 GiB image archive to the runner's transfer account over a
   veth link into a network namespace, pink.sftp vs OpenSSH `scp -s`.
3. memory: pink-web's RSS during a 1 GiB HTTPS upload vs its idle RSS.

Starts its own cluster under /var/lib/pink-bench (pink.localcluster) and
removes it, the namespace and the images it built at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import docker  # noqa: E402

from bench import measure, placement, throughput  # noqa: E402
from bench.hosts import RunnerHost  # noqa: E402
from pink import config as pink_config, users  # noqa: E402
from pink.localcluster import Cluster  # noqa: E402
from tests.helpers import Api  # noqa: E402

BASE = Path("/var/lib/pink-bench")  # not /tmp: sshd's chroot needs root-owned parents
RUNNERS = ("run1", "run2")  # the throughput figure needs two; the others use whichever is placed
NAMES = ["latency", "transfer", "memory", "placement", "throughput"]
TARGETS = {"latency": 1.3, "transfer": 1.0, "memory": 100}  # x docker run; x scp; MiB


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")))
    return {"cpus": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "load": os.getloadavg()[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 128 MiB instead of 1 GiB, fewer repeats")
    parser.add_argument("--only", action="append", choices=NAMES,
                        help="run only this measurement (repeatable)")
    parser.add_argument("--repeats", type=int, help="repeats per figure (default 10, quick 3; transfer rounds 3, quick 1)")
    parser.add_argument("--base", default=str(BASE), help="cluster directory (default %(default)s)")
    parser.add_argument("--markdown", metavar="PATH",
                        help="also write the results as a Markdown section to PATH")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    parser.add_argument("--keep", action="store_true", help="leave the cluster and images in place")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the benchmark needs root (sshd chroot, network namespace)", file=sys.stderr)
        return 2
    only = args.only or NAMES
    repeats = args.repeats or (3 if args.quick else 10)
    rounds = args.repeats or (1 if args.quick else 3)
    big_mib = 128 if args.quick else 1024
    results = {"machine": machine(), "command": " ".join(["bench/run.py", *(argv or sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d %H:%M %Z"), "quick": args.quick}
    cluster = Cluster(args.base, ssl_dir=Path(args.base) / "ssl", ssl_db_dir=Path(args.base) / "ssl_db")
    host = RunnerHost(cluster)
    client = docker.from_env()
    work = cluster.base / "bench"
    work.mkdir(exist_ok=True)
    built = []
    started = time.monotonic()
    try:
        log(f"starting the cluster in {cluster.base}")
        config_path = cluster.up(with_pink=True, runners=RUNNERS)
        cluster.start_worker(2, config_path)  # a second queue worker, as a web node would run
        config = pink_config.load(config_path)
        api = Api(config, users.create_user(config, f"bench{int(time.time())}")["token"])
        big = None
        if {"transfer", "memory"} & set(only):
            log(f"building a {big_mib} MiB image")
            tag, big = measure.big_image(client, work, big_mib)
            built.append(tag)
        if "latency" in only:
            log("1. latency")
            results["latency"] = measure.latency(api, client, work, repeats, log)
        if "transfer" in only:
            log("2. transfer")
            host.up()
            results["transfer"] = measure.transfer(host, config.ssh, big, rounds, log,
                                                   with_default=not args.quick)
            results["transfer"]["verified"] = measure.verify_put(host, config.ssh, big)
        if "memory" in only:
            log("3. memory")
            results["memory"] = measure.memory(api, cluster.pid("web"), big, log)
        if "placement" in only:
            log("4. placement")
            results["placement"] = placement.measure()
        if "throughput" in only:
            log("5. throughput")
            slots = len(RUNNERS) * config.runner.max_containers
            results["throughput"] = throughput.measure(api, client, work, 12 if args.quick else 48,
                                                       slots, log)
    finally:
        host.down()
        if not args.keep:
            log("tearing down")
            cluster.down()
            for tag in built:
                client.images.remove(tag, force=True)
            shutil.rmtree(cluster.base, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started)
    text = report(results)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


def report(r: dict) -> str:
    m = r["machine"]
    out = [f"## Results ({r['date']}, `{r['command']}`, {r['seconds']} s)", "",
           f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, kernel {m['kernel']}, "
           f"Python {m['python']}; load average {m['load']:.2f} at the start.", ""]
    if "latency" in r:
        lat = r["latency"]
        docker_s = measure.median(lat["docker"])
        warm = measure.median(lat["warm"])
        out += ["### 1. Trivial task, submit to finished", "",
                "| what | seconds | x docker run | target |", "|---|---|---|---|",
                f"| `docker run --rm` (median of {lat['repeats']}) | {docker_s:.3f} | 1.00 | |",
                f"| PINK warm, image cached on the runner (median of {lat['repeats']}) | {warm:.3f} | "
                f"{warm / docker_s:.2f} | {TARGETS['latency']} |",
                f"| PINK cold, first submit of a new image | {lat['cold']:.3f} | {lat['cold'] / docker_s:.2f} | |",
                "", "Where the time goes (seconds; warm = median per stage):", "",
                "| stage | warm | cold |", "|---|---|---|"]
        out += [f"| {k} | {lat['warm_stages'][k]:.3f} | {lat['cold_stages'].get(k, float('nan')):.3f} |"
                for k in lat["warm_stages"]]
        out.append("")
    if "transfer" in r:
        tr = r["transfer"]
        speeds = {k: measure.median(v) for k, v in tr["speeds"].items()}
        scp_best = max(v for k, v in speeds.items() if k.startswith("scp"))
        out += [f"### 2. Transfer of a {tr['bytes'] / 2**20:.0f} MiB image archive over a veth link", "",
                f"Median of {tr['repeats']} interleaved round(s); MB/s = 10^6 bytes/s, login included. "
                f"PINK's cipher: {tr['cipher']}. Bytes verified identical: {tr['verified']}.", "",
                "| what | MB/s | all rounds | x best scp |", "|---|---|---|---|"]
        out += [f"| {k} | {v:.0f} | {', '.join(f'{x:.0f}' for x in tr['speeds'][k])} | {v / scp_best:.2f} |"
                for k, v in speeds.items()]
        out.append("")
    if "memory" in r:
        mem = r["memory"]
        out += [f"### 3. pink-web memory during a {mem['bytes'] / 2**20:.0f} MiB HTTPS upload", "",
                f"Upload took {mem['seconds']:.1f} s. RSS polled every {measure.RSS_POLL * 1000:.0f} ms.", "",
                "| what | idle MiB | peak MiB | growth MiB |", "|---|---|---|---|",
                f"| worker that took the upload (pid {mem['handler']}) | {mem['idle_handler'] / 1024:.1f} | "
                f"{mem['peak_handler'] / 1024:.1f} | {(mem['peak_handler'] - mem['idle_handler']) / 1024:.1f} |",
                f"| all pink-web processes ({len(mem['pids'])}) | {mem['idle_total'] / 1024:.1f} | "
                f"{mem['peak_total'] / 1024:.1f} | {(mem['peak_total'] - mem['idle_total']) / 1024:.1f} |",
                "", f"Target: the worker under {TARGETS['memory']} MiB and flat "
                f"(its VmHWM afterwards: {mem['hwm_handler'] / 1024:.1f} MiB).", ""]
    if "placement" in r:
        out += placement.report(r["placement"])
    if "throughput" in r:
        out += throughput.report(r["throughput"])
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
