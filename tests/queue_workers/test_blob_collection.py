"""The sweep collects a web node's image blobs by LRU under its budget, and
never one a live task's image needs, however old and however far over budget."""

from __future__ import annotations

import hashlib
import os
import time

from pink.store import Store
from tests import images
from tests.helpers import Api, make_user

OLD = time.time() - 7 * 86400


def _age(path: str) -> None:
    os.utime(path, (OLD, OLD))


def test_the_sweep_spares_blobs_of_live_tasks(pink_processes, pink_config, config_variant, docker_client,
                                              tmp_path):
    path = config_variant("tiny-blob-budget", retention={"sweep_interval": 1}, web={"blob_budget_bytes": 1})
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader):  # no runner: it waits
        start(config_path=path)
    api = Api(pink_config, make_user(pink_config, "alice"))
    archive = images.fresh_archive(docker_client, "kept", tmp_path / "kept.tar")
    task_id = api.submit(archive).json()["task"]["id"]
    store = Store.from_config(pink_config)
    try:
        recipe = store.get(store.keys.task(task_id)).value.image["recipe"]
    finally:
        store.close()
    blob_dir = os.path.join(pink_config.web.blob_root, "sha256")
    needed = [recipe["config"], *recipe["layers"]]
    for digest in needed:
        _age(os.path.join(blob_dir, digest))
    unused = b"a layer no task needs"
    stray = os.path.join(blob_dir, hashlib.sha256(unused).hexdigest())
    with open(stray, "wb") as fh:
        fh.write(unused)
    _age(stray)

    deadline = time.monotonic() + 30
    while os.path.exists(stray):
        assert time.monotonic() < deadline, "the sweep never collected the unused blob"
        time.sleep(0.3)
    assert all(os.path.exists(os.path.join(blob_dir, d)) for d in needed)  # over budget, but in use

    assert api("DELETE", f"/tasks/{task_id}").status_code == 202  # no longer live: collectable
    while any(os.path.exists(os.path.join(blob_dir, d)) for d in needed):
        assert time.monotonic() < deadline + 30, "the blobs of a finished task were never collected"
        time.sleep(0.3)
