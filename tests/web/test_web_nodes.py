"""Web nodes announce themselves in etcd (`Keys.web`, under a lease kept by
pink-web, which holds the uploads): a task
whose upload is on a web node that is gone fails instead of waiting for
ever, and an output is fetched only from a web node that is up, at the
address it announced, never at one a task record names."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import requests

from pink import archive, outputs
from pink import config as pink_config_module
from devcluster.ports import free_port
from pink.store import Store
from pink.tasks import Params, State, new_record
from tests import images
from tests.helpers import Api


@pytest.fixture
def web1(control_plane):
    """web1 with its worker and leader (its pink-web announces web1); no runner."""
    return control_plane


def test_web_nodes_announce_themselves(web):
    """pink-web alone announces its web node, under a lease."""
    store = Store.from_config(web)
    deadline = time.monotonic() + 20
    while (rec := store.get(store.keys.web("web1"))) is None:
        assert time.monotonic() < deadline, "web1 never announced itself"
        time.sleep(0.2)
    assert rec.value["url"] == web.web.url and rec.lease  # bound to a lease: it goes with the node


def test_an_upload_on_a_web_node_that_is_gone_fails_its_task(web1, pink_processes, config_variant, tmp_path,
                                                             docker_client):
    """web9 takes an upload, then its pink-web (which holds the upload and
    announces web9) stops, as when the host dies: the task fails with a
    reason once a lease has passed."""
    path = config_variant("web9", host="web9", web_port=free_port(),
                          web={"spool_dir": str(tmp_path / "spool9"), "output_dir": str(tmp_path / "out9")})
    web9_process = pink_processes.web(path, role="web9")
    web9 = Api(pink_config_module.load(path), web1.token)
    archive_path = images.save_image(docker_client, images.ensure_busybox_image(docker_client),
                                     tmp_path / "bb.tar")
    task_id = web9.submit(archive_path).json()["task"]["id"]
    pink_processes.stop(web9_process)
    task = web1.wait(task_id, timeout=60)
    assert task["state"] == "failed" and task["error"] == "upload lost with web9; submit again", task
    assert (task["failure"]["cause"], task["failure"]["class"]) == ("upload_lost", "infrastructure")


def test_an_output_is_fetched_only_from_a_web_node_that_is_up(web1):
    """A record naming an output on web9, with a URL elsewhere: the answer is
    503 naming web9; nothing is fetched from the URL the record holds."""
    record = new_record("w9out0000001", "alice", Params(), {"sha256": "0" * 64, "size": 10}, "web9")
    now = time.time()
    record.state, record.result, record.created_at = State.SUCCEEDED, "succeeded", now
    record.output = {"stored": True, "host": "web9", "path": "/etc/passwd", "size": 10,
                     "url": "https://192.0.2.1:9"}  # TEST-NET: never dialled
    with archive.connection(web1.config.db) as conn:
        assert archive.archive_task(conn, record, b"", expires_at=now + 3600)
    r = web1("GET", f"/tasks/{record.id}/output")
    assert r.status_code == 503 and "web9" in r.json()["message"], r.text


def test_an_output_is_kept_on_two_web_nodes_and_served_by_either(web1, pink_processes, config_variant,
                                                                tmp_path, docker_client):
    """The finalize on web1 pushes a copy to web2 before the task is final;
    web1 without its copy serves web2's, and web2 serves its own once web1
    is gone. A push not signed with the cluster's secret is refused."""
    out2 = tmp_path / "out2"
    path = config_variant("web2", host="web2", web_port=free_port(),
                          web={"spool_dir": str(tmp_path / "spool2"), "output_dir": str(out2)})
    web2_procs = [pink_processes.web(path, role="web2"), pink_processes.leader(path, role="leader2")]
    web2 = Api(pink_config_module.load(path), web1.token)
    store = Store.from_config(web1.config)
    deadline = time.monotonic() + 20
    while store.get(store.keys.web("web2")) is None:
        assert time.monotonic() < deadline, "web2 never announced itself"
        time.sleep(0.2)
    pink_processes.runner()
    archive_path = images.save_image(docker_client, images.ensure_busybox_image(docker_client),
                                     tmp_path / "bb.tar")
    task_id = web1.submit(archive_path, cmd="sh -c 'echo hi > /hi.txt'").json()["task"]["id"]
    assert web1.wait(task_id, timeout=120)["state"] == "succeeded"
    with archive.connection(web1.config.db) as conn:
        output = archive.get_record(conn, task_id).output
    assert output["copies"] == ["web1", "web2"], output
    name = f"{task_id}-1.tar.zst"
    first, second = Path(web1.config.web.output_dir) / name, out2 / name
    assert hashlib.sha256(first.read_bytes()).hexdigest() == output["sha256"]
    assert hashlib.sha256(second.read_bytes()).hexdigest() == output["sha256"]

    # A finalize tried again pushes the same copy again: web2 takes it as there already.
    assert outputs.replicate(web1.config, store, str(first), output["size"], output["sha256"]) == "web2"

    first.unlink()  # web1 lost its copy: it streams web2's
    r = web1("GET", f"/tasks/{task_id}/output")
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == output["sha256"], r.text
    for process in [n for n in pink_processes.started if n not in web2_procs]:
        pink_processes.stop(process)  # web1 is gone (and the runner)
    r = web2("GET", f"/tasks/{task_id}/output")
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == output["sha256"]

    forged = requests.put(f"{web2.url}/internal/v1/outputs/{task_id}-2.tar.zst", data=b"x",
                          headers={"X-Pink-Peer-Signature": "0" * 64, "X-Pink-SHA256": "0" * 64},
                          verify=web2.ca, timeout=30)
    assert forged.status_code == 403 and not (out2 / f"{task_id}-2.tar.zst").exists()
