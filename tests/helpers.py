"""Helpers for tests that drive a running PINK over HTTPS and the `pink` CLI."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import requests
import zstandard

from pink import archive, db, image_archive, recipes, users
from pink.tasks import FINAL_NAMES

FINAL = FINAL_NAMES


class Api:
    """A user's view of a running pink-web: requests with the token and the CA."""

    def __init__(self, config, token: str):
        self.config = config
        self.url = config.web.url.rstrip("/")
        self.ca = str(Path(config.web.certfile).parent / "ca.pem")
        self.token = token
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def __call__(self, method: str, path: str, **kwargs) -> requests.Response:
        # verify per request: a session's verify loses to $REQUESTS_CA_BUNDLE
        return self.http.request(method, self.url + "/api/v1" + path, timeout=60, verify=self.ca, **kwargs)

    def submit(self, archive: Path, **params) -> requests.Response:
        with open(archive, "rb") as fh:
            return self("POST", "/tasks", params=params, data=fh,
                        headers={"Content-Type": "application/x-tar"})

    def task(self, task_id: str) -> dict:
        r = self("GET", f"/tasks/{task_id}")
        assert r.status_code == 200, r.text
        return r.json()["task"]

    def wait(self, task_id: str, states=FINAL, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            task = self.task(task_id)
            if task["state"] in states:
                return task
            assert time.monotonic() < deadline, f"task stuck in {task['state']}: {task}"
            time.sleep(0.2)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "PINK_URL": self.url, "PINK_TOKEN": self.token, "PINK_CA": self.ca,
               "PINK_CLI_CONFIG": "/nonexistent/pink-cli.toml"}
        pink = str(Path(sys.executable).parent / "pink")
        proc = subprocess.run([pink, *args], env=env, capture_output=True, text=True, timeout=300)
        if check:
            assert proc.returncode == 0, f"pink {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc


def make_user(config, name: str, admin: bool = False) -> str:
    """A user with a token; returns the token."""
    return users.create_user(config, name, admin=admin)["token"]


def files_in_output(data: bytes, compression: str = "zstd") -> dict[str, bytes]:
    """The regular files of a downloaded output, by name without leading ./"""
    if compression == "zstd":
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        mode = "r:"
    else:
        mode = "r:gz"
    with tarfile.open(fileobj=io.BytesIO(data), mode=mode) as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def archived(config, task_id: str) -> dict | None:
    """The task's archived record (MariaDB), where a finished task lives, as JSON."""
    conn = db.connect(config.db)
    try:
        task = archive.get_record(conn, task_id)
        return task.to_json() if task else None
    finally:
        conn.close()


def etcd_record(store, task_id: str) -> dict | None:
    """The task's record in etcd, as JSON."""
    rec = store.get(store.keys.task(task_id))
    return rec.value.to_json() if rec else None


def wait_requeued(store, task_id: str, timeout: float = 30) -> None:
    """Until the task's first attempt is given up (its runner's lease expired)."""
    deadline = time.monotonic() + timeout
    while store.get(store.keys.task(task_id)).value.attempt == 1:
        assert time.monotonic() < deadline, "the task was never re-queued"
        time.sleep(0.2)


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


def begin_upload(api: Api, archive) -> dict:
    """Open a layer-upload session for `archive` as `pink submit` does; the answer
    (`upload`, `missing`, `challenges`), with the archive's layer digests as `layers`."""
    info = image_archive.inspect(archive)
    recipe, where = recipes.Recipe.from_archive(archive, info)
    with open(archive, "rb") as fh:
        fh.seek(where[recipe.config][0])
        config = fh.read(where[recipe.config][1])
    r = api("POST", "/uploads", json={"config": base64.b64encode(config).decode(), "layout": info.layout,
                                      "layers": [{"digest": d, "size": recipe.sizes[d]} for d in recipe.layers],
                                      "repo_tags": list(recipe.repo_tags)})
    assert r.status_code == 201, r.text
    return {**r.json(), "layers": list(recipe.layers)}


def wait_for(check, timeout: float = 30) -> None:
    """Until `check()` is true; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.2)
