"""`make bench`: PINK against the tools it replaces, measured in one run.

1. latency: submit-to-finished of a one-line busybox task (cold and warm) vs
   `docker run --rm` of the same image; where the time goes, from the task's
   timings.
2. transfer: a 1 GiB image archive to the runner's transfer account over a
   veth link into a network namespace, pink.sftp vs OpenSSH `scp -s`.
3. memory: pink-web's RSS during a 1 GiB HTTPS upload vs its idle RSS.
4. placement: one pass of the planner over 10,000 tasks and 1,000 runners.
5. throughput: trivial tasks per second vs raw `docker run` loops.
6. loaded: a warm task with 10,000 archived and 1,000 waiting tasks vs none.
7. drain: a queue of 2,000 trivial tasks (500 by default) vs one of 50.
8. placement-live: placements per second through etcd, the queue workers and
   the leader, with 1,000 runner records and 10,000 waiting tasks.
9. layers: image B = image A (a 512 MiB base) + a new 4 MiB layer, after A:
   bytes received by the web node and sent to the runner x the new layer.
10. changes: `--output changes` x `full` for a task writing 1 MiB into a
   512 MiB image: output bytes and time.
11. sweep: one sweep of 200 indexes (20 with --quick) vs as many separate
   warm tasks: the submit's answer time and the time to finish.
12. slurm: the same trivial task through a one-node Slurm on this machine
   (`sbatch --wrap 'docker run ...'`, bench/slurm.py), warm and a burst of
   200 (48 with --quick) from 8 threads, at PINK's slots and at Slurm's default.
And etcd's database size at each step, then once its history is compacted.

Starts its own cluster under /var/lib/pink-bench (devcluster.local) and
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

from bench import drain, etcdsize, layers, loaded, measure, placement, slurm, sweep, throughput  # noqa: E402
from bench.hosts import RunnerHost  # noqa: E402
from pink import config as pink_config, users  # noqa: E402
from devcluster.cluster import Cluster  # noqa: E402
from gpu_runner import sizing  # noqa: E402
from tests import images  # noqa: E402
from tests.helpers import Api  # noqa: E402

BASE = Path("/var/lib/pink-bench")  # not /tmp: sshd's chroot needs root-owned parents
RUNNERS = ("run1", "run2")  # the throughput figure needs two; the others use whichever is placed
NAMES = ["latency", "transfer", "memory", "placement", "throughput", "loaded", "drain", "placement-live",
         "compaction", "layers", "changes", "sweep", "slurm"]
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
                        help="smoke check: 128 MiB instead of 1 GiB, fewer repeats, smaller queues")
    parser.add_argument("--only", action="append", choices=NAMES,
                        help="run only this measurement (repeatable)")
    parser.add_argument("--skip", action="append", choices=NAMES, default=[],
                        help="leave this measurement out (repeatable)")
    parser.add_argument("--repeats", type=int,
                        help="repeats per figure (default 10, quick 3; transfer and throughput rounds 3, quick 1)")
    parser.add_argument("--archived", type=int, help="loaded: archived tasks (default 10000, quick 1000)")
    parser.add_argument("--waiting", type=int, help="loaded: waiting tasks (default 1000, quick 100)")
    parser.add_argument("--drain-tasks", type=int,
                        help="drain: the long queue (default 500, quick 100; the issue's figure is 2000)")
    parser.add_argument("--drain-baseline", type=int, help="drain: the short queue (default 50, quick 20)")
    parser.add_argument("--placement-runners", type=int,
                        help="placement-live: runner records (default 1000, quick 100)")
    parser.add_argument("--placement-tasks", type=int,
                        help="placement-live: waiting tasks (default 10000, quick 1000)")
    parser.add_argument("--placement-seconds", type=float,
                        help="placement-live: longest wait for the placements (default 60, quick 20)")
    parser.add_argument("--placement-workers", type=int, default=2,
                        help="placement-live: queue workers (default %(default)s, as the cluster runs)")
    parser.add_argument("--sweep-indexes", type=int, help="sweep: indexes and separate tasks (default 200, quick 20)")
    parser.add_argument("--base", default=str(BASE), help="cluster directory (default %(default)s)")
    parser.add_argument("--markdown", metavar="PATH",
                        help="also write the results as a Markdown section to PATH")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    parser.add_argument("--keep", action="store_true", help="leave the cluster and images in place")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the benchmark needs root (sshd chroot, network namespace)", file=sys.stderr)
        return 2
    only = [name for name in (args.only or NAMES) if name not in args.skip]
    quick = args.quick
    repeats = args.repeats or (3 if quick else 10)
    rounds = args.repeats or (1 if quick else 3)
    big_mib = 128 if quick else 1024
    sizes = {"archived": args.archived or (1000 if quick else 10000),
             "waiting": args.waiting or (100 if quick else 1000),
             "drain_tasks": args.drain_tasks or (100 if quick else 500),
             "drain_baseline": args.drain_baseline or (20 if quick else 50),
             "placement_runners": args.placement_runners or (100 if quick else 1000),
             "placement_tasks": args.placement_tasks or (1000 if quick else 10000),
             "placement_seconds": args.placement_seconds or (20 if quick else 60),
             "sweep_indexes": args.sweep_indexes or (20 if quick else 200)}
    results = {"machine": machine(), "command": " ".join(["bench/run.py", *(argv or sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d %H:%M %Z"), "quick": quick, "sizes": sizes}
    cluster = Cluster(args.base, ssl_dir=Path(args.base) / "ssl", ssl_db_dir=Path(args.base) / "ssl_db")
    host = RunnerHost(cluster)
    client = docker.from_env()
    work = cluster.base / "bench"
    work.mkdir(exist_ok=True)
    started = time.monotonic()
    points = results["etcd"] = []
    try:
        log(f"starting the cluster in {cluster.base}")
        config_path = cluster.up(with_pink=True, runners=RUNNERS)
        cluster.start_worker(2, config_path)  # a second queue worker, as a web node would run
        config = pink_config.load(config_path)
        user = users.create_user(config, f"bench{int(time.time())}")
        api = Api(config, user["token"])

        def checkpoint(label: str) -> None:
            points.append(etcdsize.checkpoint(cluster, label, config))

        checkpoint("cluster started")

        def measured(key: str, name: str, fn) -> None:
            """Run one measurement; one that fails is reported, and the others still run."""
            try:
                results[key] = fn()
            except Exception as exc:  # noqa: BLE001 - e.g. a pipeline broken mid-change
                log(f"{name} failed: {type(exc).__name__}: {exc}")
                results.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"

        # Task runs first, so that etcd compacts their history while the
        # measurements that hardly touch etcd (2, 3, 4) run.
        if "latency" in only:
            log("1. latency")
            measured("latency", "latency", lambda: measure.latency(api, client, work, repeats, log))
            checkpoint("after 1. latency")
        if "throughput" in only:
            log("5. throughput")
            slots = len(RUNNERS) * (config.runner.max_containers or sizing.NO_GPU_SLOTS)  # no GPUs here
            measured("throughput", "throughput", lambda: throughput.measure(
                api, client, work, config, 12 if quick else 48, slots, rounds, log))
            checkpoint("after 5. throughput")
        if "slurm" in only:
            log("12. Slurm beside PINK")
            slots = len(RUNNERS) * (config.runner.max_containers or sizing.NO_GPU_SLOTS)
            measured("slurm", "slurm", lambda: slurm.compare(
                api, client, work, config, slots, repeats, 48 if quick else 200, log))
            checkpoint("after 12. slurm")
        if "loaded" in only:
            log("6. warm task on a loaded cluster")
            measured("loaded", "loaded", lambda: loaded.measure(
                api, user["name"], client, work, config, sizes["archived"], sizes["waiting"], repeats, log))
            checkpoint("after 6. loaded")
        if "drain" in only:
            log("7. drain")
            measured("drain", "drain", lambda: drain.measure(
                api, client, work, config, sizes["drain_tasks"], sizes["drain_baseline"], log,
                cluster.etcd_status))
            checkpoint("after 7. drain")
        if "sweep" in only:
            log("11. sweep")
            measured("sweep", "sweep", lambda: sweep.measure(api, client, work, config, sizes["sweep_indexes"], log))
            checkpoint("after 11. sweep")
        base_mib = 64 if quick else 512
        if "layers" in only:
            log("9. layers")
            measured("layers", "layers", lambda: layers.measure_layers(api, client, work, base_mib, log))
        if "changes" in only:
            log("10. output=changes")
            measured("changes", "changes", lambda: layers.measure_changes(api, client, work, base_mib, log))
        tasks_done = etcdsize.mark(cluster)
        big = None
        if {"transfer", "memory"} & set(only):
            log(f"building a {big_mib} MiB image")
            _, big = measure.big_image(client, work, big_mib)
        if "transfer" in only:
            log("2. transfer")
            host.up()

            def transfer() -> dict:
                out = measure.transfer(host, config.ssh, big, rounds, log, with_default=not quick)
                out["verified"] = measure.verify_put(host, config.ssh, big)
                log("2b. transfer of a layer of shared libraries")
                out["libraries"] = measure.transfer_libraries(host, config.ssh, measure.libraries_archive(work),
                                                              rounds, log)
                return out

            measured("transfer", "transfer", transfer)
        if "memory" in only:
            log("3. memory")
            measured("memory", "memory", lambda: measure.memory(api, cluster.pid("web"), big, log))
        if "placement" in only:
            log("4. placement")
            measured("placement", "placement", placement.measure)
        if "compaction" in only:
            measured("etcd_settled", "compaction", lambda: etcdsize.settle(cluster, tasks_done, log))
            checkpoint("history compacted")
        if "placement-live" in only:  # last: its 10,000 records in etcd would swamp the figures above
            log("8. placement end to end")
            measured("placement_live", "placement-live", lambda: placement.live(
                cluster, sizes["placement_runners"], sizes["placement_tasks"], args.placement_workers,
                sizes["placement_seconds"], log))
    finally:
        host.down()
        if not args.keep:
            log("tearing down")
            cluster.down()
            images.remove_built(client)  # what the run built, and the runners' tags on it
            shutil.rmtree(cluster.base, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started)
    text = report(results)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


def _speed_table(rounds: dict[str, list[float]]) -> list[str]:
    """Each contender's median MB/s, its rounds, and its ratio to the best scp."""
    speeds = {k: measure.median(v) for k, v in rounds.items()}
    scp_best = max(v for k, v in speeds.items() if k.startswith("scp"))
    return ["| what | MB/s | all rounds | x best scp |", "|---|---|---|---|",
            *(f"| {k} | {v:.0f} | {', '.join(f'{x:.0f}' for x in rounds[k])} | {v / scp_best:.2f} |"
              for k, v in speeds.items()), ""]


Row = tuple[str, str, str]  # a summary row: figure, measured, target


def _latency_rows(lat: dict) -> list[Row]:
    return [("1. warm trivial task, x `docker run --rm --network none`",
             f"{measure.median(lat['warm']) / measure.median(lat['docker']):.2f}", f"<= {TARGETS['latency']}")]


def _transfer_rows(tr: dict) -> list[Row]:
    speeds = {k: measure.median(v) for k, v in tr["speeds"].items()}
    best_pink = max(v for k, v in speeds.items() if k.startswith("pink"))
    best_scp = max(v for k, v in speeds.items() if k.startswith("scp"))
    rows = [("2. image transfer, best PINK x best scp", f"{best_pink / best_scp:.2f}", f">= {TARGETS['transfer']}")]
    if "libraries" in tr:
        lib = {k: measure.median(v) for k, v in tr["libraries"]["speeds"].items()}
        pink = max(v for k, v in lib.items() if k.startswith("PINK"))
        rows.append(("2b. a layer of shared libraries, PINK x best scp (with or without -C)",
                     f"{pink / max(v for k, v in lib.items() if k.startswith('scp')):.2f}",
                     f">= {TARGETS['transfer']}"))
    return rows


def _memory_rows(mem: dict) -> list[Row]:
    return [("3. pink-web worker during a big upload, peak MiB", f"{mem['peak_handler'] / 1024:.1f}",
             f"< {TARGETS['memory']}")]


def _placement_rows(pl: dict) -> list[Row]:
    return [(f"4. planner alone, placements/s ({pl['runners']:,} runners, {pl['tasks']:,} tasks)",
             f"{pl['placements_per_second']:.0f}", f">= {placement.TARGET}")]


def _throughput_rows(t: dict) -> list[Row]:
    return [("5. trivial tasks/s, x raw `docker run` loop (median of rounds)", f"{t['ratio']:.2f}",
             f">= {throughput.TARGET}"),
            ("5. the same, runner host apart from the control plane", f"{t['apart_ratio']:.2f}",
             f">= {throughput.TARGET}"),
            ("5. x raw `docker run` + `docker export` (shared / apart)",
             f"{t['export_ratio']:.2f} / {t['apart_export_ratio']:.2f}", "")]


def _loaded_rows(lo: dict) -> list[Row]:
    return [(f"6. warm task with {lo['archived']:,} archived + {lo['waiting']:,} waiting, x empty",
             f"{measure.median(lo['loaded']) / measure.median(lo['empty']):.2f}", f"<= {loaded.TARGET}")]


def _drain_rows(d: dict) -> list[Row]:
    return [(f"7. drain rate, {d['long']['tasks']:,} queued x {d['short']['tasks']} queued",
             f"{d['long']['rate'] / d['short']['rate']:.2f}", f">= {drain.TARGET}")]


def _placement_live_rows(p: dict) -> list[Row]:
    return [(f"8. placements/s end to end ({p['runners']:,} runners, {p['tasks']:,} tasks)",
             f"{p['per_second']:.0f}", f">= {placement.TARGET}")]


def _layers_rows(la: dict) -> list[Row]:
    rows = [(f"9. image B's bytes {what}, x its new {la['new_layer'] / 2**20:.1f} MiB layer",
             f"{la['b'][key] / la['new_layer']:.3f}", f"<= {layers.TARGET}")
            for key, what in (("upload_bytes", "received by the web node"), ("transfer_bytes", "sent to the runner"))]
    return rows + [("9. B's submit-to-finished x A's", f"{la['b']['seconds'] / la['a']['seconds']:.2f}", "")]


def _changes_rows(ch: dict) -> list[Row]:
    return [(f"10. output bytes, changes x full ({ch['base_mib']} MiB image, 1 MiB written)",
             f"{ch['changes']['bytes'] / ch['full']['bytes']:.4f}", ""),
            ("10. submit-to-finished, changes x full", f"{ch['changes']['seconds'] / ch['full']['seconds']:.2f}", "")]


# Each measurement's summary rows, in the order of the figures: (its key in the
# results, its rows from that entry). One table instead of one `if key in r`
# block per figure, so a new measurement is one entry here and one function.
_FIGURES = (("latency", _latency_rows), ("transfer", _transfer_rows), ("memory", _memory_rows),
            ("placement", _placement_rows), ("throughput", _throughput_rows), ("loaded", _loaded_rows),
            ("drain", _drain_rows), ("placement_live", _placement_live_rows), ("layers", _layers_rows),
            ("changes", _changes_rows), ("sweep", sweep.rows), ("slurm", slurm.rows))


def summary(r: dict) -> list[str]:
    """Every figure beside its target, as measured in this run."""
    rows = [row for key, rows_of in _FIGURES if key in r for row in rows_of(r[key])]
    flat = drain.etcd_flat(r["drain"]) if "drain" in r else None
    if flat is not None:
        rows.append((f"etcd database file, all {r['drain']['long']['tasks']:,} tasks of 7. drained x half of them",
                     f"{flat:.2f}", "flat (1.00)"))
    points = r.get("etcd", [])
    if "etcd_settled" in r and len(points) > 2:
        first, last = etcdsize.baseline(points), points[-1]
        rows.append((f"etcd data in use once compacted: {last['archived']:,} tasks run x "
                     f"{first['archived']:,} tasks run", f"{last['db_size_in_use'] / first['db_size_in_use']:.2f}",
                     "flat"))
    if not rows:
        return []
    return ["### Summary: each figure beside its target", "", "| figure | measured | target |",
            "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows), ""]


def report(r: dict) -> str:
    m = r["machine"]
    out = [f"## Results ({r['date']}, `{r['command']}`, {r['seconds']} s)", "",
           f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, kernel {m['kernel']}, "
           f"Python {m['python']}; load average {m['load']:.2f} at the start.", ""]
    out += summary(r)
    if "latency" in r:
        lat = r["latency"]
        docker_s = measure.median(lat["docker"])
        warm = measure.median(lat["warm"])
        out += ["### 1. Trivial task, submit to finished", "",
                "| what | seconds | x docker run | target |", "|---|---|---|---|",
                f"| `docker run --rm --network none` (median of {lat['repeats']}) | {docker_s:.3f} | 1.00 | |",
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
        out += [f"### 2. Transfer of a {tr['bytes'] / 2**20:.0f} MiB image archive over a veth link", "",
                f"Median of {tr['repeats']} interleaved round(s); MB/s = 10^6 bytes/s, login included. "
                f"PINK's cipher: {tr['cipher']}. Bytes verified identical: {tr['verified']}.", ""]
        out += _speed_table(tr["speeds"])
        if "libraries" in tr:
            lib = tr["libraries"]
            out += [f"2b. A tar of `{measure.LIBRARIES}` ({lib['bytes'] / 2**20:.0f} MiB), the stuff of GPU "
                    f"images' layers; MB/s of the file's own bytes. Link rate PINK saw: "
                    f"{(lib['link_rate'] or 0) / 1e6:.0f} MB/s; compressed in each round: {lib['compressed']}; "
                    f"unpacked to the same bytes: {lib['verified']}.", ""]
            out += _speed_table(lib["speeds"])
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
    if "loaded" in r:
        out += loaded.report(r["loaded"])
    if "drain" in r:
        out += drain.report(r["drain"])
    if "placement_live" in r:
        out += placement.report_live(r["placement_live"])
    if "layers" in r or "changes" in r:
        out += layers.report(r.get("layers"), r.get("changes"))
    if "sweep" in r:
        out += sweep.report(r["sweep"])
    if "slurm" in r:
        out += slurm.report(r["slurm"])
    if len(r.get("etcd", [])) > 2:
        out += etcdsize.report(r["etcd"], r.get("etcd_settled"))
    if r.get("failed"):
        out += ["### Not measured: these failed", ""]
        out += [f"- {name}: {why}" for name, why in r["failed"].items()]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
