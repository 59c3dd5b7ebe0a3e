"""Web nodes announce themselves in etcd (`Keys.web`, under a lease): a task
whose upload is on a web node that is gone fails instead of waiting for
ever, and an output is fetched only from a web node that is up, at the
address it announced, never at one a task record names."""

from __future__ import annotations

import time

import pytest

from pink import archive
from pink import config as pink_config_module
from devcluster.local import free_port
from pink.store import Store
from pink.tasks import Params, State, new_record
from tests import images
from tests.helpers import Api


@pytest.fixture
def web1(control_plane):
    """web1 with its worker and leader (which announces web1); no runner."""
    return control_plane


def test_web_nodes_announce_themselves(web1):
    store = Store.from_config(web1.config)
    deadline = time.monotonic() + 20
    while (rec := store.get(store.keys.web("web1"))) is None:
        assert time.monotonic() < deadline, "web1 never announced itself"
        time.sleep(0.2)
    assert rec.value["url"] == web1.config.web.url and rec.lease  # bound to a lease: it goes with the node


def test_an_upload_on_a_web_node_that_is_gone_fails_its_task(web1, pink_processes, config_variant, tmp_path,
                                                             docker_client):
    """web9 takes an upload but nothing announces web9 (no leader runs there,
    as after its death): the task fails with a reason once a lease has passed."""
    path = config_variant("web9", host="web9", web_port=free_port(),
                          web={"spool_dir": str(tmp_path / "spool9"), "output_dir": str(tmp_path / "out9")})
    pink_processes.web(path, role="web9")
    web9 = Api(pink_config_module.load(path), web1.token)
    archive_path = images.save_image(docker_client, images.ensure_busybox_image(docker_client),
                                     tmp_path / "bb.tar")
    task_id = web9.submit(archive_path).json()["task"]["id"]
    task = web1.wait(task_id, timeout=60)
    assert task["state"] == "failed" and task["error"] == "upload lost with web9; submit again", task


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
