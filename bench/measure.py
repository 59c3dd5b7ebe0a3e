"""The three measurements of `make bench`, each with its baseline taken in
the same run: task latency vs `docker run`, SFTP throughput vs OpenSSH scp,
and pink-web's memory during a large upload vs its idle size.

Each function returns a dict of results that bench/run.py prints and writes
to docs/benchmarks.md; none of them starts or stops the cluster.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import zstandard

from pink import sftp, wire
from tests import images
from tests.helpers import Api

STAGES = ["submitted", "placed", "transferred", "assigned", "running", "exported", "succeeded"]
POLL = 0.02  # seconds between task reads while waiting for the end (adds at most this)
RSS_POLL = 0.02  # seconds between reads of pink-web's /proc/<pid>/status


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- images

def hello_image(client, workdir: Path) -> tuple[str, Path]:
    """A busybox image that prints one line, new for every run (so the first
    PINK submit is cold: its archive digest is not in any runner's cache)."""
    tag = f"pink/bench-hello:{uuid.uuid4().hex[:12]}"
    images.build_image(client, tag, f'LABEL pink.bench.nonce="{tag}"\nCMD ["echo", "hello from the benchmark"]\n')
    path = workdir / "hello.tar"
    images.save_image(client, tag, path)
    return tag, path


def big_image(client, workdir: Path, mib: int) -> tuple[str, Path]:
    """A busybox image with one layer of `mib` MiB of random bytes, saved."""
    tag = f"pink/bench-big:{mib}m"
    if not images._has_image(client, tag):
        images.build_image(client, tag, f"RUN dd if=/dev/urandom of=/blob bs=1M count={mib} 2>/dev/null\n")
    path = workdir / f"big-{mib}m.tar"
    if not path.exists():
        images.save_image(client, tag, path)
    return tag, path


# ---------------------------------------------------------------- 1. latency

def _parse(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def pink_once(api: Api, archive: Path, timeout: float = 180) -> dict:
    start = time.time()
    r = api.submit(archive)
    if r.status_code != 201:
        raise RuntimeError(f"submit answered {r.status_code}: {r.text}")
    task_id = r.json()["task"]["id"]
    uploaded = time.time()
    deadline = time.monotonic() + timeout
    while True:
        task = api.task(task_id)
        if task["state"] in {"succeeded", "failed", "timed_out", "cancelled"}:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"task {task_id} stuck in {task['state']}")
        time.sleep(POLL)
    seen = time.time()
    if task["state"] != "succeeded":
        raise RuntimeError(f"task {task_id} ended {task['state']}: {task.get('error') or task}")
    stamps = {k: _parse(v) for k, v in task["timings"].items() if isinstance(v, str) and k in STAGES}
    return {"id": task_id, "total": seen - start, "upload": uploaded - start,
            "stamps": stamps, "start": start, "seen": seen,
            "transfer_bytes": task["timings"].get("transfer_bytes")}


def stage_split(run: dict) -> dict:
    """Seconds spent reaching each state, plus the client's ends."""
    s = run["stamps"]
    out = {"request (upload, inspect, record)": s["submitted"] - run["start"]}
    for a, b in zip(STAGES, STAGES[1:]):
        if a in s and b in s:
            out[f"{a} -> {b}"] = s[b] - s[a]
    out["succeeded -> client saw it"] = run["seen"] - s["succeeded"]
    return out


def latency(api: Api, client, workdir: Path, repeats: int, log) -> dict:
    tag, archive = hello_image(client, workdir)
    try:
        docker = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run(["docker", "run", "--rm", "--network", "none", tag], check=True,
                           capture_output=True)  # PINK's default network: a bridge costs ~0.3 s more here
            docker.append(time.perf_counter() - t)
        log(f"docker run --rm --network none: median {median(docker):.3f}s of {repeats}")
        cold = pink_once(api, archive)
        log(f"PINK cold: {cold['total']:.3f}s (copied {cold['transfer_bytes']} bytes)")
        warm = []
        for _ in range(repeats):
            warm.append(pink_once(api, archive))
        log(f"PINK warm: median {median([w['total'] for w in warm]):.3f}s of {repeats}")
    finally:
        forget_image(client, tag, archive)
    stages = {k: median([stage_split(w)[k] for w in warm]) for k in stage_split(warm[0])}
    return {"archive_bytes": archive.stat().st_size if archive.exists() else None,
            "docker": docker, "cold": cold["total"], "cold_stages": stage_split(cold),
            "warm": [w["total"] for w in warm], "warm_stages": stages, "repeats": repeats}


def forget_image(client, tag: str, archive: Path) -> None:
    """Remove the run's image and the runner's cached copy of it."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest() if archive.exists() else None
    for ref in (tag, f"pink/cache:{digest}" if digest else None):
        if ref:
            subprocess.run(["docker", "rmi", "-f", ref], capture_output=True)
    archive.unlink(missing_ok=True)


# ---------------------------------------------------------------- 2. transfer

CIPHERS = ["aes128-gcm@openssh.com", "aes128-ctr"]


def _scp(archive: Path, host, cipher: str, remote: str, compress: bool = False) -> float:
    t = time.perf_counter()
    subprocess.run(["scp", "-q", "-s", "-c", cipher, "-i", str(host.cluster.ssh_key),
                    "-o", f"UserKnownHostsFile={host.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                    "-o", "BatchMode=yes", "-o", f"Compression={'yes' if compress else 'no'}",
                    str(archive), f"pink-xfer@{host.node['ssh_host']}:{remote}"], check=True)
    return time.perf_counter() - t


def _pink_put(archive: Path, ssh_config, node: dict, remote: str) -> float:
    t = time.perf_counter()  # the login is part of a transfer job too
    with sftp.session(ssh_config, node) as conn:
        sftp.put(conn, sftp.local_file(str(archive)), remote)
    return time.perf_counter() - t


def _pink_parallel(archive: Path, ssh_config, node: dict, remote: str, streams: int = 2) -> float:
    t = time.perf_counter()  # as the transfer job does it: one session, a second stream beside it
    with sftp.session(ssh_config, node) as conn:
        sftp.put_parallel(conn, ssh_config, node, sftp.local_file(str(archive)), remote, streams)
    return time.perf_counter() - t


def _paramiko_default(archive: Path, ssh_config, node: dict, remote: str) -> float:
    """paramiko's own SFTPClient.put with the same connection (what PINK did before)."""
    t = time.perf_counter()
    with sftp.session(ssh_config, node) as conn:
        conn.put(str(archive), remote, confirm=False)
    return time.perf_counter() - t


def transfer(host, ssh_config, archive: Path, repeats: int, log, with_default: bool = True) -> dict:
    """Interleaved rounds (noise hits every contender alike); MB/s = 10^6 bytes/s."""
    size = archive.stat().st_size
    spool = host.cluster.spool_dir(host.runner)
    config = replace(ssh_config, known_hosts=str(host.known_hosts))
    contenders = {f"scp -s -c {c}": (lambda c=c: _scp(archive, host, c, "/spool/bench-scp.bin")) for c in CIPHERS}
    contenders["pink.sftp.put (1 connection)"] = lambda: _pink_put(archive, config, host.node, "/spool/bench-put.bin")
    contenders["pink.sftp.put_parallel (2 streams)"] = lambda: _pink_parallel(
        archive, config, host.node, "/spool/bench-par.bin")
    if with_default:
        contenders["paramiko SFTPClient.put (= put before this change)"] = lambda: _paramiko_default(
            archive, config, host.node, "/spool/bench-default.bin")
    speeds = {name: [] for name in contenders}
    for round_ in range(repeats):
        for name, run in contenders.items():
            seconds = run()
            speeds[name].append(size / seconds / 1e6)
            for leftover in spool.glob("bench-*"):
                leftover.unlink()
            log(f"round {round_ + 1}: {name}: {speeds[name][-1]:.0f} MB/s")
    return {"bytes": size, "speeds": speeds, "repeats": repeats, "cipher": ssh_config.cipher}


LIBRARIES = "/usr/lib/x86_64-linux-gnu"  # what a CUDA or PyTorch layer is mostly made of: shared libraries


def libraries_archive(workdir: Path) -> Path:
    """A tar of this machine's shared libraries: a layer as compressible as real GPU images' ones."""
    path = workdir / "libraries.tar"
    if not path.exists():
        subprocess.run(["tar", "-cf", str(path), "-C", os.path.dirname(LIBRARIES), os.path.basename(LIBRARIES)],
                       check=True)
    return path


def _pink_blob(archive: Path, ssh_config, node: dict, remote: str, rates: wire.LinkRates) -> float:
    """What the transfer job does with one blob: zstd when a sample says it pays
    at the link rate `rates` last saw (pink.wire), else as it is, which is timed."""
    t = time.perf_counter()
    with sftp.session(ssh_config, node) as conn:
        wire.send(conn, ssh_config, node, str(archive), remote, rates)
    return time.perf_counter() - t


def transfer_libraries(host, ssh_config, archive: Path, repeats: int, log) -> dict:
    """2b: a compressible layer; scp with and without its own (zlib) compression, and PINK's blob path."""
    size = archive.stat().st_size
    spool = host.cluster.spool_dir(host.runner)
    config = replace(ssh_config, known_hosts=str(host.known_hosts))
    contenders = {
        "scp -s -c aes128-gcm@openssh.com": lambda: _scp(archive, host, CIPHERS[0], "/spool/bench-scp.bin"),
        "scp -s -C -c aes128-gcm@openssh.com (zlib)": lambda: _scp(archive, host, CIPHERS[0], "/spool/bench-scpc.bin",
                                                                  compress=True),
        "PINK's blob copy, link rate unknown (as it is)": lambda: _pink_blob(
            archive, config, host.node, "/spool/bench-raw.bin", wire.LinkRates()),
        "PINK's blob copy, link rate seen (zstd if it pays: pink.wire)": lambda: _pink_blob(
            archive, config, host.node, "/spool/bench-blob.bin", rates),
    }
    rates = wire.LinkRates()
    compressed = []
    speeds = {name: [] for name in contenders}
    verified = None
    for round_ in range(repeats):
        for name, run in contenders.items():
            seconds = run()
            speeds[name].append(size / seconds / 1e6)
            if name.startswith("PINK") and "seen" in name:
                landed = spool / f"bench-blob.bin{wire.SUFFIX}"
                compressed.append(landed.exists())
                if landed.exists() and verified is None:
                    verified = _unpacks_to(landed, archive)
            for leftover in spool.glob("bench-*"):
                leftover.unlink()
            log(f"round {round_ + 1}: {name}: {speeds[name][-1]:.0f} MB/s")
    return {"bytes": size, "speeds": speeds, "repeats": repeats, "verified": verified,
            "compressed": compressed, "link_rate": rates.get(host.node["name"])}


def _unpacks_to(landed: Path, original: Path) -> bool:
    def sha(stream) -> str:
        digest = hashlib.sha256()
        while block := stream.read(1 << 20):
            digest.update(block)
        return digest.hexdigest()

    with open(landed, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as unpacked, \
            open(original, "rb") as orig:
        return sha(unpacked) == sha(orig)


def verify_put(host, ssh_config, archive: Path) -> bool:
    """Both PINK paths deliver the same bytes (a parallel offset bug would not be fast, just wrong)."""
    config = replace(ssh_config, known_hosts=str(host.known_hosts))
    spool = host.cluster.spool_dir(host.runner)
    ok = True
    for name, fn in (("put", _pink_put), ("parallel", _pink_parallel)):
        fn(archive, config, host.node, f"/spool/bench-verify-{name}.bin")
        landed = spool / f"bench-verify-{name}.bin"
        ok &= subprocess.run(["cmp", "-s", str(archive), str(landed)]).returncode == 0
        landed.unlink()
    return ok


# ---------------------------------------------------------------- 3. memory

def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def process_tree(root: int) -> list[int]:
    """`root` and its descendants (gunicorn's master and workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def memory(api: Api, web_pid: int, archive: Path, log) -> dict:
    """Poll VmRSS of every pink-web process while uploading `archive` over HTTPS."""
    pids = process_tree(web_pid)
    idle = {pid: _rss_kib(pid) for pid in pids}
    peak = dict(idle)
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            for pid in pids:
                peak[pid] = max(peak[pid], _rss_kib(pid))
            total = sum(_rss_kib(pid) for pid in pids)
            peak["total"] = max(peak.get("total", 0), total)
            stop.wait(RSS_POLL)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t = time.perf_counter()
    try:
        r = api.submit(archive)
    finally:
        stop.set()
        poller.join()
    seconds = time.perf_counter() - t
    if r.status_code != 201:
        raise RuntimeError(f"upload answered {r.status_code}: {r.text}")
    task_id = r.json()["task"]["id"]
    api("DELETE", f"/tasks/{task_id}")  # cancel: running a 1 GiB image is not what is measured
    growth = {pid: peak[pid] - idle[pid] for pid in pids}
    handler = max(growth, key=growth.get)
    log(f"upload {archive.stat().st_size / 2**20:.0f} MiB in {seconds:.1f}s; "
        f"worker {handler}: idle {idle[handler] / 1024:.1f} MiB, peak {peak[handler] / 1024:.1f} MiB")
    return {"bytes": archive.stat().st_size, "seconds": seconds, "pids": pids, "handler": handler,
            "idle_handler": idle[handler], "peak_handler": peak[handler],
            "hwm_handler": _rss_kib(handler, "VmHWM"),
            "idle_total": sum(idle[p] for p in pids), "peak_total": peak["total"]}
