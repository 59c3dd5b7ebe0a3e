"""End to end on real services: upload -> transfer -> run -> export -> archive -> download."""

from __future__ import annotations

import json
import os
import time


from pink import archive
from pink import config as pink_config_module
from devcluster.ports import free_port
from pink.store import Store
from tests import images
from tests.helpers import Api, files_in_output, make_user



def _archived(config, task_id):
    with archive.connection(config.db) as conn:
        task = archive.get_record(conn, task_id)
        return (task.to_json() if task else None), archive.get_logs(conn, task_id)


def test_cli_submit_wait_download(api, writer_archive, tmp_path):
    proc = api.cli("submit", str(writer_archive), "--name", "first", "--wait",
                   "--download", str(tmp_path / "out"), "--json")
    task = json.loads(proc.stdout)
    assert task["state"] == "succeeded"
    downloaded = list((tmp_path / "out").iterdir())
    assert [p.name for p in downloaded] == [f"{task['id']}.tar.zst"]
    files = files_in_output(downloaded[0].read_bytes())
    assert files["result.txt"] == b"hello from pink\n"
    row, logs = _archived(api.config, task["id"])
    assert row["state"] == "succeeded" and row["exit_code"] == 0
    assert b"done" in logs
    assert [h[1] for h in row["history"]] == ["queued", "placed", "transferred", "assigned",
                                             "running", "exported", "succeeded"]


def test_cli_submits_a_local_image_by_name(api, writer_archive, tmp_path):
    proc = api.cli("submit", "pink/test-writer:1", "--wait", "--json")
    assert json.loads(proc.stdout)["state"] == "succeeded"


def test_docker25_oci_layout_runs(api, writer_archive, tmp_path):
    oci = images.to_oci_archive(writer_archive, tmp_path / "oci.tar")
    r = api.submit(oci, output="/result.txt", compression="gzip")
    assert r.status_code == 201, r.text
    assert r.json()["task"]["image"]["layout"] == "oci"
    task = api.wait(r.json()["task"]["id"])
    assert task["state"] == "succeeded", task
    data = api("GET", f"/tasks/{task['id']}/output").content
    assert files_in_output(data, "gzip") == {"result.txt": b"hello from pink\n"}


def test_second_task_with_same_image_skips_the_copy(api, docker_client, tmp_path):
    archive_path = images.fresh_archive(docker_client, "fresh", tmp_path / "fresh.tar", images.WRITER)
    first = api.wait(api.submit(archive_path).json()["task"]["id"])
    second = api.wait(api.submit(archive_path).json()["task"]["id"])
    assert first["timings"]["transfer_bytes"] > 0
    assert second["timings"]["transfer_bytes"] == 0
    t = second["timings"]  # a task without GPUs gets its container's end with the report
    assert t["running"] < t["exited"] <= t["exported"], t
    assert second["state"] == "succeeded"


def test_nonzero_exit_fails_keeping_logs_and_output(api, writer_archive):
    r = api.submit(writer_archive, cmd="sh -c 'echo oops; echo partial > /partial.txt; exit 3'")
    task = api.wait(r.json()["task"]["id"])
    assert task["state"] == "failed" and task["exit_code"] == 3 and task["attempt"] == 1
    assert (task["failure"]["cause"], task["failure"]["class"]) == ("exit_code", "task")
    shown = api.cli("status", task["id"]).stdout
    assert "failure:      task: the command exited with an error" in shown
    assert "what to do:   Read the task's log" in shown
    assert "oops" in api("GET", f"/tasks/{task['id']}/logs").text
    assert files_in_output(api("GET", f"/tasks/{task['id']}/output").content)["partial.txt"] == b"partial\n"


def test_missing_command_fails_with_dockers_message(api, writer_archive):
    task = api.wait(api.submit(writer_archive, cmd="/no/such/program").json()["task"]["id"])
    assert task["state"] == "failed" and task["attempt"] == 1, task  # the task's own failure: not tried again
    assert (task["failure"]["cause"], task["failure"]["class"]) == ("start_failed", "task")
    assert "no such file" in task["error"].lower() or "not found" in task["error"].lower(), task["error"]


def test_env_and_output_path(api, writer_archive):
    r = api.submit(writer_archive, cmd="sh -c 'mkdir /o; echo $GREETING > /o/g.txt'",
                   env=["GREETING=hi there", "OTHER=1"], output="/o")
    task = api.wait(r.json()["task"]["id"])
    assert task["state"] == "succeeded", task
    assert files_in_output(api("GET", f"/tasks/{task['id']}/output").content) == {"o/g.txt": b"hi there\n"}


def test_download_supports_range(api, writer_archive):
    task = api.wait(api.submit(writer_archive).json()["task"]["id"])
    whole = api("GET", f"/tasks/{task['id']}/output")
    part = api("GET", f"/tasks/{task['id']}/output", headers={"Range": "bytes=100-"})
    assert part.status_code == 206
    assert part.content == whole.content[100:]


def test_follow_logs_streams_until_the_end(api, writer_archive):
    cmd = "sh -c 'for i in 1 2 3 4 5; do echo line $i; sleep 0.4; done'"
    task_id = api.submit(writer_archive, cmd=cmd).json()["task"]["id"]
    api.wait(task_id, states={"running", "exported", "succeeded"})
    proc = api.cli("logs", task_id, "-f")
    assert [l for l in proc.stdout.splitlines() if l.startswith("line")] == [f"line {i}" for i in range(1, 6)]
    assert api.task(task_id)["state"] in {"exported", "succeeded"}


def test_cancel_a_running_task(api, writer_archive):
    task_id = api.submit(writer_archive, cmd="sh -c 'echo started; sleep 300'").json()["task"]["id"]
    api.wait(task_id, states={"running"})
    api.cli("cancel", task_id, "--yes")
    task = api.wait(task_id)
    assert task["state"] == "cancelled"
    assert task["output"] is not None, json.dumps(task)


def test_timeout_stops_the_container(api, writer_archive):
    task_id = api.submit(writer_archive, cmd="sleep 300", timeout=2).json()["task"]["id"]
    task = api.wait(task_id)
    assert task["state"] == "timed_out"
    assert (task["failure"]["cause"], task["failure"]["class"]) == ("timed_out", "task")
    proc = api.cli("submit", "--wait", "--timeout", "1", "--cmd", "sleep 300", str(writer_archive), check=False)
    assert proc.returncode == 1 and "task: it ran past its time limit. Submit again with a longer --timeout" \
        in proc.stderr, proc.stderr


def test_users_see_only_their_own_tasks(api, writer_archive):
    task_id = api.submit(writer_archive).json()["task"]["id"]
    bob = Api(api.config, make_user(api.config, "bob"))
    assert bob("GET", f"/tasks/{task_id}").status_code == 404
    assert bob("GET", f"/tasks/{task_id}/logs").status_code == 404
    assert bob("DELETE", f"/tasks/{task_id}").status_code == 404
    assert task_id not in [t["id"] for t in bob("GET", "/tasks").json()["tasks"]]
    admin = Api(api.config, make_user(api.config, "root", admin=True))
    assert admin("GET", f"/tasks/{task_id}").status_code == 200
    api.wait(task_id)


def test_delete_a_finished_task(api, writer_archive):
    task_id = api.wait(api.submit(writer_archive).json()["task"]["id"])["id"]
    assert api("DELETE", f"/tasks/{task_id}").json() == {"deleted": task_id}
    assert api("GET", f"/tasks/{task_id}").status_code == 404
    assert api("GET", f"/tasks/{task_id}/output").status_code == 404


def test_nodes_and_health(api):
    deadline = time.monotonic() + 10
    while not api("GET", "/nodes").json()["nodes"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    node = api("GET", "/nodes").json()["nodes"][0]
    assert node["name"] == "run1" and node["state"] == "ready"
    assert node["gpu_mode"] == "none" and node["gpus"] == []  # no NVIDIA driver here, none declared
    health = api("GET", "/health").json()
    assert health["status"] == "ok" and health["etcd"] == health["redis"] == health["db"] == "ok"


def test_any_web_node_serves_an_output(api, pink_processes, config_variant, writer_archive, tmp_path):
    task = api.wait(api.submit(writer_archive).json()["task"]["id"])
    path = config_variant("web2", host="web2", web_port=free_port(),
                          web={"spool_dir": str(tmp_path / "spool2"), "output_dir": str(tmp_path / "out2")})
    pink_processes.web(path, role="web2")
    web2 = Api(pink_config_module.load(path), api.token)
    whole = api("GET", f"/tasks/{task['id']}/output").content
    assert web2("GET", f"/tasks/{task['id']}/output").content == whole
    part = web2("GET", f"/tasks/{task['id']}/output", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == whole[10:20]


TRAPPER = ("sh -c \"trap 'echo saved by $0 > /saved.txt; exit 0' TERM; echo ready; "
           "while true; do sleep 0.2; done\"")


def test_timeout_sends_sigterm_first_and_keeps_the_output(api, writer_archive):
    task_id = api.submit(writer_archive, cmd=TRAPPER, timeout=4).json()["task"]["id"]
    task = api.wait(task_id)
    assert task["state"] == "timed_out" and task["output"] is not None, json.dumps(task)
    assert files_in_output(api("GET", f"/tasks/{task_id}/output").content)["saved.txt"] == b"saved by sh\n"


def test_cancel_sends_sigterm_and_keeps_the_output(api, writer_archive):
    task_id = api.submit(writer_archive, cmd=TRAPPER).json()["task"]["id"]
    api.wait(task_id, states={"running"})
    time.sleep(1)  # the trap is set once the shell has started
    assert api("DELETE", f"/tasks/{task_id}").status_code == 202
    task = api.wait(task_id)
    assert task["state"] == "cancelled", json.dumps(task)
    assert files_in_output(api("GET", f"/tasks/{task_id}/output").content)["saved.txt"] == b"saved by sh\n"


def test_image_cache_evicts_the_least_recently_used(pink_processes, pink_config, config_variant,
                                                    docker_client, tmp_path):
    c = pink_config
    path = config_variant("cache", runner={"image_cache_bytes": 1,  # all but the image in use go
                                           "container_disk": "1g"})  # overlay2 on ext4: refused
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader, pink_processes.runner):
        start(config_path=path)
    api = Api(pink_config_module.load(path), make_user(c, "alice"))
    archives = [images.fresh_archive(docker_client, "cache", tmp_path / f"c{n}.tar", images.WRITER) for n in range(2)]
    first = api.wait(api.submit(archives[0]).json()["task"]["id"])
    again = api.wait(api.submit(archives[0]).json()["task"]["id"])
    assert first["timings"]["image_load_seconds"] > 0 and first["timings"]["transfer_bytes"] > 0
    assert again["timings"]["image_load_seconds"] == 0 and again["timings"]["transfer_bytes"] == 0
    api.wait(api.submit(archives[1]).json()["task"]["id"])
    cached = {t.split(":", 1)[1] for i in docker_client.images.list(name="pink/cache") for t in i.tags}
    assert first["image"]["sha256"] not in cached  # evicted: the second image took its place
    third = api.wait(api.submit(archives[0]).json()["task"]["id"])
    # Out of Docker, not out of the runner's blobs: loaded again from them, nothing sent
    assert third["state"] == "succeeded" and third["timings"]["transfer_bytes"] == 0
    assert third["timings"]["image_load_seconds"] > 0
    storage = docker_client.info()["DriverStatus"]
    if ["Backing Filesystem", "xfs"] not in storage:
        store = Store.from_config(api.config)
        assert store.get(store.keys.node("run1")).value["disk_limits"] is False


def test_runner_sweeps_archives_no_task_needs(pink_processes, pink_config, config_variant):
    spool = pink_config.runner.spool_dir
    stale, fresh = os.path.join(spool, "a" * 64 + ".tar"), os.path.join(spool, "b" * 64 + ".tar")
    part = os.path.join(spool, "c" * 64 + ".tar.0123.part")
    for path in (stale, fresh, part):
        with open(path, "wb") as fh:
            fh.write(b"left by a task that was cancelled before its image was loaded")
    for path in (stale, part):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    pink_processes.runner(config_path=config_variant("sweep", runner={"spool_grace": 60}))
    store = Store.from_config(pink_config)
    deadline = time.monotonic() + 20
    while os.path.exists(stale) or os.path.exists(part):
        assert time.monotonic() < deadline, "the stale archive was never swept"
        time.sleep(0.2)
    assert os.path.exists(fresh)  # within its grace: it may be about to be placed
    while store.get(store.keys.node("run1")).value["spool_images"] != 1:  # published after the sweep
        assert time.monotonic() < deadline, "the node record still counts the swept archive"
        time.sleep(0.2)
