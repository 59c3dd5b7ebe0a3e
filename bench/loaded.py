"""A warm trivial task on a cluster with a long history and a long queue,
against the same task on an empty one, in the same run (issue 3).

Load: `archived` finished tasks of the benchmark's user inserted straight
into MariaDB's `tasks` table (one multi-row INSERT per batch: what finalize
would have written, without running them), and `waiting` tasks of another
user that can never be placed (each wants a GPU; the local runners have
none), recorded in etcd exactly as the web API's submit does. Once the
leader's published queue lists every one of them as waiting, the warm task
is timed again. Everything added is removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import replace

from bench.measure import forget_image, hello_image, median, pink_once, stage_split
from pink import db, image_archive
from pink.store import Store
from pink.tasks import Params, State, new_id, new_record
from queue_workers.placing import PUBLISHED_POSITIONS

TARGET = 1.2  # loaded median as a multiple of the empty cluster's, at most
WAITING_USER = "bench-waiting"  # owner of the tasks that never fit
WAITING_GPUS = 1  # GPUs each waiting task wants: more than any local runner has
INSERT_BATCH = 500  # archive rows per INSERT statement
SETTLE_TIMEOUT = 300.0  # seconds the leader may take to list every waiting task in its queue


def image_of(archive) -> dict:
    """The `image` of a task record, as the web node's upload computes it."""
    digest = hashlib.sha256()
    with open(archive, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    size = archive.stat().st_size
    return {"sha256": digest.hexdigest(), "size": size, **image_archive.inspect(str(archive)).to_dict()}


def archive_rows(config, user: str, image: dict, count: int, tag: str) -> list[str]:
    """Insert `count` finished tasks of `user` into the archive; returns their ids."""
    now = time.time()
    ids, rows = [], []
    for n in range(count):
        task_id = f"{tag}{n:06d}"
        submitted = now - 86400 * 10 + n  # spread over the last ten days
        record = replace(new_record(task_id, user, Params(), image, "web1"), name=f"archived {n}",
                         state=State.SUCCEEDED, node="run1", exit_code=0, created_at=submitted,
                         updated_at=submitted + 0.32,
                         timings={"submitted": submitted, "placed": submitted + 0.01,
                                  "running": submitted + 0.05, "exported": submitted + 0.3,
                                  "succeeded": submitted + 0.32},
                         history=[[submitted, "queued", "uploaded to web1"]]).to_json()
        rows.append((task_id, user, record["name"], "succeeded", 1, "run1", 0, None, image["sha256"],
                     image["size"], 4096, "[]", 0, submitted, submitted + 0.05, submitted + 0.3,
                     submitted + 0.32, now + 14 * 86400, json.dumps(record)))
        ids.append(task_id)
    conn = db.connect(config.db)
    try:
        db.init_schema(conn)
        with conn.cursor() as cur:
            for start in range(0, len(rows), INSERT_BATCH):
                cur.executemany(
                    "INSERT INTO tasks (id, user_name, name, state, attempt, node, exit_code, error, "
                    "image_sha256, image_size, output_size, gpus, gpu_count, submitted_at, started_at, "
                    "ended_at, finished_at, expires_at, record) "
                    "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    rows[start:start + INSERT_BATCH])
        conn.commit()
    finally:
        conn.close()
    return ids


def remove_rows(config, tag: str) -> None:
    conn = db.connect(config.db)
    try:
        with conn.cursor() as cur:
            cur.execute("DELETE FROM tasks WHERE id LIKE %s", (tag + "%",))
        conn.commit()
    finally:
        conn.close()


def add_waiting(config, store: Store, image: dict, count: int) -> list[str]:
    """Tasks that cannot be placed, recorded as pink-web's submit records them."""
    ids = []
    for _ in range(count):
        record = new_record(new_id(), WAITING_USER, Params(gpus=WAITING_GPUS), image, config.host)
        store.create(store.keys.task(record.id), record)
        ids.append(record.id)
    return ids


def wait_listed(store: Store, ids: list[str], log, timeout: float = SETTLE_TIMEOUT) -> float:
    """Seconds until the leader's published queue lists every one of `ids` as waiting."""
    started = time.monotonic()
    last_log = started
    while True:
        rec = store.get(store.keys.queue)
        listed = len(set(ids) & set(rec.value["tasks"])) if rec else 0
        if listed == min(len(ids), PUBLISHED_POSITIONS):
            return time.monotonic() - started
        now = time.monotonic()
        if now - started > timeout:
            raise RuntimeError(f"{len(ids) - listed} waiting tasks still unlisted after {timeout:.0f}s")
        if now - last_log > 15:
            log(f"  {listed}/{len(ids)} waiting tasks in the leader's queue")
            last_log = now
        time.sleep(0.5)


def measure(api, user: str, client, workdir, config, archived: int, waiting: int, repeats: int,
            log) -> dict:
    tag, archive = hello_image(client, workdir)
    image = image_of(archive)
    store = Store.from_config(config)
    row_tag = f"ba{uuid.uuid4().hex[:6]}"
    waiting_ids: list[str] = []
    try:
        pink_once(api, archive)  # cold: the image goes to a runner once
        empty = [pink_once(api, archive)["total"] for _ in range(repeats)]
        log(f"warm task, empty cluster: median {median(empty):.3f}s of {repeats}")
        started = time.perf_counter()
        archive_rows(config, user, image, archived, row_tag)
        insert_s = time.perf_counter() - started
        log(f"{archived} archived tasks inserted in {insert_s:.1f}s")
        started = time.perf_counter()
        waiting_ids = add_waiting(config, store, image, waiting)
        submit_s = time.perf_counter() - started
        log(f"{waiting} waiting tasks recorded in {submit_s:.1f}s")
        settle_s = wait_listed(store, waiting_ids, log)
        log(f"the leader listed all {waiting} as waiting {settle_s:.1f}s later")
        loaded = [pink_once(api, archive) for _ in range(repeats)]
        log(f"warm task, loaded cluster: median {median([r['total'] for r in loaded]):.3f}s")
    finally:
        for task_id in waiting_ids:
            store.delete(store.keys.task(task_id))
        remove_rows(config, row_tag)
        store.close()
        forget_image(client, tag, archive)
    stages = {k: median([stage_split(r)[k] for r in loaded])
              for k in stage_split(loaded[0])}
    return {"archived": archived, "waiting": waiting, "repeats": repeats, "empty": empty,
            "loaded": [r["total"] for r in loaded], "loaded_stages": stages,
            "insert_seconds": insert_s, "submit_seconds": submit_s, "settle_seconds": settle_s}


def report(r: dict) -> list[str]:
    empty, loaded = median(r["empty"]), median(r["loaded"])
    out = [f"### 6. Warm trivial task with {r['archived']:,} archived and {r['waiting']:,} waiting tasks", "",
           "| what | seconds (median) | x empty | target |", "|---|---|---|---|",
           f"| empty cluster ({r['repeats']} runs) | {empty:.3f} | 1.00 | |",
           f"| {r['archived']:,} archived + {r['waiting']:,} waiting ({r['repeats']} runs) | {loaded:.3f} | "
           f"{loaded / empty:.2f} | {TARGET} |", "",
           f"Setting up: archive rows inserted in {r['insert_seconds']:.1f} s; waiting tasks recorded in "
           f"{r['submit_seconds']:.1f} s, and listed by the leader as waiting {r['settle_seconds']:.1f} s "
           "later.", "", "Where the loaded task's time goes (median per stage, seconds):", "",
           "| stage | loaded |", "|---|---|"]
    out += [f"| {k} | {v:.3f} |" for k, v in r["loaded_stages"].items()]
    out.append("")
    return out
