"""`output=changes`: only what the task added or changed, with a manifest of those
files (size, sha256) and of deleted paths, the same for every way a task ends."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from tests import images
from tests.helpers import files_in_output

BASE = ("RUN mkdir /base && echo keep > /base/keep.txt && echo gone > /base/gone.txt "
        "&& echo old > /base/edit.txt\n")
WORK = ("mkdir /result && echo made by the task > /result/new.txt && echo new > /base/edit.txt "
        "&& rm /base/gone.txt && ln -s /result/new.txt /result/link && echo written; ")
ENDINGS = {  # final state: (what the task does after its work, submit parameters)
    "succeeded": ("exit 0", {}),
    "failed": ("exit 3", {}),
    "timed_out": ("sleep 60", {"timeout": 2}),
    "cancelled": ("sleep 60", {}),
}


@pytest.fixture(scope="module")
def base_archive(docker_client, tmp_path_factory):
    return images.build_archive(docker_client, "pink/test-changes:1", BASE,
                                tmp_path_factory.mktemp("changes") / "changes.tar")


def test_changes_are_the_same_however_the_task_ends(api, base_archive):
    submitted = {}
    for state, (then, params) in ENDINGS.items():
        r = api.submit(base_archive, cmd=f"sh -c '{WORK}{then}'", output="changes", **params)
        assert r.status_code == 201, r.text
        submitted[state] = r.json()["task"]["id"]
    cancel = submitted["cancelled"]
    api.wait(cancel, states={"running"})
    deadline = time.monotonic() + 60
    while b"written" not in api("GET", f"/tasks/{cancel}/logs").content:
        assert time.monotonic() < deadline, "the task never said it had written its files"
        time.sleep(0.2)
    assert api("DELETE", f"/tasks/{cancel}").status_code == 202

    for state, task_id in submitted.items():
        task = api.wait(task_id, timeout=180)
        assert task["state"] == state, task
        files = files_in_output(api("GET", f"/tasks/{task_id}/output").content)
        assert set(files) == {"result/new.txt", "base/edit.txt", ".pink-changes.json"}, (state, set(files))
        assert files["base/edit.txt"] == b"new\n"
        manifest = json.loads(files[".pink-changes.json"])
        assert manifest["deleted"] == ["/base/gone.txt"]
        entries = {e["path"]: e for e in manifest["changed"]}
        new = entries["/result/new.txt"]
        assert new["change"] == "added" and new["size"] == len(b"made by the task\n")
        assert new["sha256"] == hashlib.sha256(b"made by the task\n").hexdigest()
        assert entries["/base/edit.txt"]["change"] == "modified"
        assert entries["/result/link"] == {"path": "/result/link", "change": "added", "type": "symlink",
                                           "target": "/result/new.txt"}
        assert "/base/keep.txt" not in entries


def test_output_must_be_full_changes_or_a_path(api, base_archive):
    r = api.submit(base_archive, output="diff")
    assert r.status_code == 400 and "changes" in r.json()["message"]


def test_a_task_that_changes_nothing_returns_the_manifest_alone(api, base_archive):
    """Docker's export (a read of the whole base) is skipped; the output is the same shape."""
    task = api.wait(api.submit(base_archive, cmd="true", output="changes").json()["task"]["id"], timeout=120)
    assert task["state"] == "succeeded", task
    files = files_in_output(api("GET", f"/tasks/{task['id']}/output").content)
    assert set(files) == {".pink-changes.json"}, set(files)
    assert json.loads(files[".pink-changes.json"]) == {"changed": [], "deleted": []}
