"""9. layers and 10. changes: what crosses the wire, and what comes back.

9. Image A is a base of `base_mib` MiB of random bytes plus a small layer;
   image B is A plus a new 4 MiB layer. Both are submitted with the `pink`
   CLI, A first. For B: the bytes the web node received (upload_bytes) and
   sent to the runner (transfer_bytes) against the size of its new layer,
   and its submit-to-finished time against A's (both return `changes`, so
   the times are those of upload, transfer, load and run).
10. A task writes 1 MiB into an image of `base_mib` MiB, once with
   `--output changes` and once with the default `full`: output bytes and
   submit-to-finished times.

Images are removed from Docker once saved: the runner shares this
machine's Docker, and would otherwise skip loading an image it holds.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from tests import images
from tests.helpers import Api

TARGET = 1.05  # x the new layer, for both hops
NEW_MIB = 4


def _build(client, workdir: Path, base_mib: int) -> tuple[Path, Path]:
    run = uuid.uuid4().hex[:8]
    tag_a, tag_b = f"pink/bench-layers-a:{run}", f"pink/bench-layers-b:{run}"
    images.build_image(client, tag_a, f"RUN dd if=/dev/urandom of=/base.bin bs=1M count={base_mib} 2>/dev/null\n"
                                      f"RUN echo {run} > /small.txt\nCMD [\"cat\", \"/small.txt\"]\n")
    images.build_image(client, tag_b, f"FROM {tag_a}\nRUN dd if=/dev/urandom of=/new.bin bs=1M count={NEW_MIB} "
                                      "2>/dev/null\n")
    paths = workdir / f"layers-a-{run}.tar", workdir / f"layers-b-{run}.tar"
    for tag, path in zip((tag_a, tag_b), paths):
        images.save_image(client, tag, path)
    for tag in (tag_b, tag_a):
        client.images.remove(tag)
    return paths


def _submit(api: Api, archive: Path, *args: str) -> tuple[dict, float]:
    started = time.monotonic()
    task = json.loads(api.cli("submit", str(archive), "--json", *args).stdout)
    task = api.wait(task["id"], timeout=1800)
    if task["state"] != "succeeded":
        raise RuntimeError(f"task {task['id']} ended {task['state']}: {task.get('error')}")
    return task, time.monotonic() - started


def _new_layer(archive: Path) -> int:
    from pink import image_archive, recipes

    recipe, _ = recipes.Recipe.from_archive(archive, image_archive.inspect(archive))
    return recipe.sizes[recipe.layers[-1]]


def measure_layers(api: Api, client, workdir: Path, base_mib: int, log) -> dict:
    archive_a, archive_b = _build(client, workdir, base_mib)
    log(f"image A ({base_mib} MiB base), then B (A + {NEW_MIB} MiB)")
    a, a_seconds = _submit(api, archive_a, "--output", "changes")  # times of the way in, not of a 512 MiB export
    b, b_seconds = _submit(api, archive_b, "--output", "changes")
    pick = ("upload_bytes", "transfer_bytes")
    return {"base_mib": base_mib, "new_layer": _new_layer(archive_b),
            "a": {**{k: a["timings"].get(k) for k in pick}, "seconds": a_seconds},
            "b": {**{k: b["timings"].get(k) for k in pick}, "seconds": b_seconds}}


def measure_changes(api: Api, client, workdir: Path, base_mib: int, log) -> dict:
    archive, _ = _build(client, workdir, base_mib)
    cmd = "sh -c 'head -c 1048576 /dev/urandom > /written.bin'"
    _submit(api, archive, "--cmd", "true", "--output", "changes")  # the image reaches the runner: both below are warm
    out = {"base_mib": base_mib}
    for output in ("full", "changes"):
        log(f"output={output}")
        task, seconds = _submit(api, archive, "--cmd", cmd, "--output", output)
        out[output] = {"bytes": task["output"]["size"], "seconds": seconds}
    return out


def report(la: dict | None, ch: dict | None) -> list[str]:
    out = []
    if la:
        mib = 2**20
        out += [f"### 9. Layers: image B = A ({la['base_mib']} MiB base) + a new {NEW_MIB} MiB layer, after A", "",
                "| image | received by the web node | sent to the runner | submit to finished |",
                "|---|---|---|---|"]
        out += [f"| {name} | {t['upload_bytes'] / mib:.2f} MiB | {t['transfer_bytes'] / mib:.2f} MiB | "
                f"{t['seconds']:.1f} s |" for name, t in (("A", la["a"]), ("B", la["b"]))]
        out += ["", f"B's new layer: {la['new_layer'] / mib:.2f} MiB. Target: both of B's figures at most "
                f"{TARGET}x the new layer.", ""]
    if ch:
        out += [f"### 10. Outputs: a task writing 1 MiB into a {ch['base_mib']} MiB image", "",
                "| output | bytes | submit to finished |", "|---|---|---|"]
        out += [f"| {name} | {ch[name]['bytes']:,} | {ch[name]['seconds']:.1f} s |" for name in ("full", "changes")]
        out.append("")
    return out
