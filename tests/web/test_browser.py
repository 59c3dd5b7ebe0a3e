"""The pages in a real browser (chromium through Playwright): log in, upload
with progress, follow a task's log to the end, download, cancel and delete,
drain and resume a node, tokens and users, usage. Tasks run on a real runner.

With PINK_SCREENSHOTS=docs/screenshots these tests also save the pages'
screenshots (docs/screenshots/README.md).
"""

from __future__ import annotations

import re
import time

import pytest
import requests

from pink import archive, users
from pink import config as pink_config_module
from pink.store import Store
from pink.tasks import Params, State, Task, new_record
from tests import images
from tests.helpers import Api, files_in_output, make_user

expect = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' (playwright)").expect
PHONE = {"width": 375, "height": 812}

RUN_MS = 90_000  # what a task may take to run to its end here
# Ends at once on SIGTERM (PID 1 ignores signals it has no handler for).
SLEEPER = "sh -c \"trap 'exit 0' TERM; echo start; while true; do sleep 0.2; done\""


def _person(config, name: str, admin: bool = False) -> tuple[Api, str]:
    created = users.create_user(config, name, admin=admin)
    return Api(config, created["token"]), created["password"]


def test_login_with_a_wrong_password_then_the_right_one(web, browse):
    _, password = _person(web, "lina")
    page = browse.page(web)
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login"))
    browse.shot(page, "login")
    page.fill("#username", "lina")
    page.fill("#password", "not-" + password)
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("Wrong user name or password.")
    expect(page.locator("#username")).to_have_value("lina")
    page.fill("#password", password)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Tasks")
    expect(page.locator("header .who")).to_contain_text("lina")
    expect(page.locator("#tasks-empty")).to_be_visible()


def test_upload_with_progress_then_follow_the_task_to_the_end(api, slow_archive, browse, tmp_path):
    """The archive is uploaded from the submit page (slowed down, so progress is
    seen moving; a first upload is cancelled half way), the log appears on the
    task page while the task runs, and the output and log download."""
    config = api.config
    user, password = _person(config, "bea")
    page = browse.login(config, "bea", password, "/submit")
    page.set_input_files("#archive", slow_archive)
    expect(page.locator("#file-name")).to_contain_text("slow.tar")
    page.fill("#name", "browser-slow")
    page.click("#env-add")
    page.locator(".env-key").last.fill("GREETING")
    page.locator(".env-value").last.fill("hello there")
    page.fill("#timeout", "5")
    page.select_option("#timeout-unit", "60")

    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 20, "downloadThroughput": -1,
                                                  "uploadThroughput": 256 * 1024})
    progress = page.locator("#progress")
    page.click("#upload")
    page.wait_for_function("() => { const p = document.querySelector('#progress'); "
                           "return p.value > 0 && p.value < 100; }")
    page.click("#upload-cancel")
    expect(page.locator("#upload-status")).to_have_text("Upload cancelled: nothing was submitted.")
    assert user("GET", "/tasks").json()["tasks"] == []

    page.click("#upload")
    page.wait_for_function("() => { const p = document.querySelector('#progress'); "
                           "return p.value > 0 && p.value < 100; }")
    expect(page.locator("#progress-text")).to_contain_text("left")  # the speed and time left, once measured
    page.wait_for_function("() => document.querySelector('#progress').value > 25")
    browse.shot(page, "submit")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    link = page.locator("#submitted-link")
    expect(link).to_be_visible(timeout=60_000)
    assert progress.evaluate("p => p.value") == 100
    task_id = link.inner_text().rsplit(" ", 1)[1]
    submitted = user.task(task_id)
    assert submitted["name"] == "browser-slow" and submitted["params"]["env"] == {"GREETING": "hello there"}
    assert submitted["params"]["timeout"] == 300

    page.goto("/")
    row = page.locator(f"tr[data-id='{task_id}']")
    expect(row).to_contain_text("browser-slow")

    row.get_by_role("link", name="browser-slow", exact=True).click()
    state = page.locator("#task-state")
    expect(page.locator("#logs")).to_contain_text("start", timeout=RUN_MS)
    expect(state).to_contain_text("running")  # the log showed while the task ran (it sleeps 4 s)
    expect(state).to_contain_text("succeeded", timeout=RUN_MS)
    expect(page.locator("#logs-state")).to_have_text("end of the log")
    expect(page.locator("#timeline li")).to_have_count(7)  # queued ... exported, succeeded
    expect(page.locator("#stages")).to_contain_text("Running, then exporting")
    expect(page.locator("#image")).to_contain_text("pink/test-slow:1")
    browse.shot(page, "task")

    download = page.locator("#download")
    expect(download).to_contain_text(f"{task_id}.tar.zst")
    with page.expect_download() as got:
        download.click()
    files = files_in_output(open(got.value.path(), "rb").read())
    assert files["done.txt"] == b"finished\n"
    with page.expect_download() as got:
        page.click("#logs-download")
    assert b"start" in open(got.value.path(), "rb").read()

    page.click("#again")  # the same parameters, and the same image while its layers are kept
    expect(page.locator("#again-note")).to_contain_text("Run with the same image")
    expect(page.locator("#name")).to_have_value("browser-slow")
    expect(page.locator("#timeout")).to_have_value("5")
    expect(page.locator("#timeout-unit")).to_have_value("60")
    expect(page.locator(".env-key")).to_have_value("GREETING")
    expect(page.locator(".env-value")).to_have_value("hello there")
    page.fill("#name", "browser-slow-again")
    page.click("#rerun")
    expect(page.locator("#task-state")).to_contain_text("succeeded", timeout=RUN_MS)
    expect(page.locator("h1")).to_contain_text("browser-slow-again")


def test_cancel_from_the_task_page_then_delete_from_the_list(api, slow_archive, browse):
    config = api.config
    user, password = _person(config, "cleo")
    task_id = user.submit(slow_archive, name="sleeper", cmd=SLEEPER).json()["task"]["id"]
    page = browse.login(config, "cleo", password, f"/tasks/{task_id}")
    expect(page.locator("#logs")).to_contain_text("start", timeout=RUN_MS)
    page.click("#cancel")
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Cancel task sleeper?")
    page.click("#confirm-no")  # changed my mind: nothing happens
    expect(dialog).to_be_hidden()
    assert user.task(task_id)["cancel_requested"] is False
    page.click("#cancel")
    page.click("#confirm-yes")
    expect(page.locator("#task-state")).to_contain_text("cancelled", timeout=RUN_MS)
    assert user.task(task_id)["state"] == "cancelled"

    page.goto("/")
    row = page.locator(f"tr[data-id='{task_id}']")
    expect(row).to_contain_text("cancelled")
    row.get_by_role("button", name="Delete task sleeper").click()
    page.click("#confirm-yes")
    expect(row).to_have_count(0)
    assert user("GET", f"/tasks/{task_id}").status_code == 404


def test_the_log_follows_a_new_attempt(control_plane, pink_processes, slow_archive, browse):
    """The runner dies mid-task; the task runs again (attempt 2) on the runner
    restarted: the page shows attempt 2's whole log in a section of its own."""
    config = control_plane.config
    runner = pink_processes.runner()
    user, password = _person(config, "finn")
    task_id = user.submit(slow_archive, cmd="sh -c 'echo begin; sleep 4; echo end'").json()["task"]["id"]
    page = browse.login(config, "finn", password, f"/tasks/{task_id}")
    logs = page.locator("#logs")
    expect(logs).to_contain_text("begin", timeout=RUN_MS)
    pink_processes.kill(runner)
    user.wait(task_id, states={"queued"}, timeout=30)  # the lease expired (node_ttl 3 s): back in the queue
    expect(page.locator("#logs-state")).to_contain_text("attempt 2 waits to start")
    pink_processes.runner()  # the same runner, back with a new epoch
    expect(page.locator("#task-state")).to_contain_text("succeeded", timeout=RUN_MS)
    expect(logs).to_have_text(re.compile(r"^begin\n— attempt 2 —begin\nend\n$"))


def test_a_dropped_archive_is_chosen_and_the_api_error_shown_as_written(web, browse):
    user, password = _person(web, "dora")
    page = browse.login(web, "dora", password, "/submit")
    page.click("#upload")
    expect(page.locator("#upload-status")).to_contain_text("Choose an archive first")
    page.evaluate("""() => {
        const data = new DataTransfer();
        data.items.add(new File(['not an image archive'], 'junk.tar', {type: 'application/x-tar'}));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true,
                                                                             cancelable: true}));
    }""")
    expect(page.locator("#file-name")).to_contain_text("junk.tar")
    page.select_option("#output-kind", "path")
    page.fill("#output", "relative/path")  # refused by the API, with its own words
    page.click("#upload")
    expected = user("POST", "/tasks", params={"output": "relative/path"}, data=b"not an image archive",
                    headers={"Content-Type": "application/x-tar"}).json()["message"]
    expect(page.locator("#upload-status")).to_have_text(expected)
    page.select_option("#output-kind", "full")
    page.click("#upload")
    expected = user("POST", "/tasks", data=b"not an image archive",
                    headers={"Content-Type": "application/x-tar"}).json()["message"]
    expect(page.locator("#upload-status")).to_have_text(expected)
    assert user("GET", "/tasks").json()["tasks"] == []


def test_an_image_no_runner_can_run_is_refused_on_the_submit_page(web, browse, docker_client, tmp_path):
    """An arm64 image while the only runner runs linux/amd64 (its registration
    written as a runner writes it): the page says why at once, in the API's words."""
    _, password = _person(web, "gil")
    store = Store.from_config(web)
    lease = store.lease(120)
    assert store.create(store.keys.node("run9"), {"name": "run9", "platform": "linux/amd64", "gpus": [],
                                                  "ssh_host": "127.0.0.1"}, lease.id)
    busybox = images.save_image(docker_client, images.ensure_busybox_image(docker_client), tmp_path / "b.tar")
    arm = images.retarget_archive(busybox, tmp_path / "arm.tar", "arm64")
    page = browse.login(web, "gil", password, "/submit")
    page.set_input_files("#archive", arm)
    page.fill("#cmd", "true")
    page.click("#upload")
    status = page.locator("#upload-status")
    expect(status).to_contain_text("the image is built for linux/arm64; the GPU servers run linux/amd64")
    expect(status).to_contain_text("docker buildx build --platform linux/amd64")
    browse.shot(page, "submit-refused")
    lease.revoke()


def test_nodes_show_gpu_readings_and_the_spool(web, browse):
    """Runners with NVML add `gpu_stats` to GET /nodes, and every runner its spool;
    the page shows them (the answer is stubbed here, as a runner with real GPUs gives it)."""
    _, password = _person(web, "ida")
    gib = 2**30
    node = {"name": "gpu7", "state": "ready", "host": "10.0.0.7", "epoch": 3, "gpu_mode": "nvml",
            "gpus": ["GPU-a", "GPU-b"], "max_containers": 4, "tasks": ["t1"], "images": 5,
            "started_at": time.time() - 3600, "spool_free": 300 * gib, "spool_images": 2,
            "gpu_inventory": [{"index": 0, "uuid": "GPU-a", "model": "NVIDIA H100 80GB HBM3", "memory": 80 * gib},
                              {"index": 1, "uuid": "GPU-b", "model": "NVIDIA H100 80GB HBM3", "memory": 80 * gib}],
            "gpu_stats": {"GPU-a": {"utilization": 0.87, "memory_used": 61 * gib, "memory_total": 80 * gib}}}
    page = browse.page(web)
    page.route("**/api/v1/nodes", lambda route: route.fulfill(json={"nodes": [node]}))
    page.goto("/login?next=/nodes")
    page.fill("#username", "ida")
    page.fill("#password", password)
    page.click("button[type=submit]")
    card = page.locator("[data-node='gpu7']")
    expect(card).to_contain_text("NVIDIA H100 80GB HBM3 · 80.0 GiB memory")
    expect(card).to_contain_text("87 % busy")
    expect(card).to_contain_text("61.0 GiB of 80.0 GiB used")
    expect(card.locator(".gpu").nth(1)).not_to_contain_text("busy")  # no stats for that one
    expect(card).to_contain_text("1 of 4 in use")
    expect(card).to_contain_text("2 images waiting to load · 300.0 GiB free")
    expect(card.get_by_role("link", name="t1")).to_have_attribute("href", "/tasks/t1")


@pytest.fixture
def gpu_runner(pink_processes, pink_config, config_variant):
    """web, worker, leader and runner run1 with two declared GPUs."""
    path = config_variant("gpus", runner={"gpus": ["GPU-0a1b2c3d-0000-4000-8000-000000000001",
                                                   "GPU-0a1b2c3d-0000-4000-8000-000000000002"]})
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader, pink_processes.runner):
        start(config_path=path)
    return pink_config_module.load(path)


def test_an_admin_drains_and_resumes_a_node(gpu_runner, browse):
    config = gpu_runner
    admin, password = _person(config, "root", admin=True)
    page = browse.login(config, "root", password, "/nodes")
    card = page.locator("[data-node='run1']")
    expect(card).to_contain_text("ready")
    expect(card.locator(".gpu")).to_have_count(2)
    expect(card).to_contain_text("0 of")
    browse.shot(page, "nodes")

    card.get_by_role("button", name="Drain", exact=True).click()
    expect(page.locator("#confirm")).to_contain_text("No new task goes to run1")
    page.click("#confirm-yes")
    expect(card.locator(".state")).to_have_text(re.compile("draining"))
    assert admin("GET", "/nodes").json()["nodes"][0]["state"] == "draining"
    card.get_by_role("button", name="Resume").click()
    page.click("#confirm-yes")
    expect(card.locator(".state")).to_have_text(re.compile("ready"))
    assert admin("GET", "/nodes").json()["nodes"][0]["state"] == "ready"

    alice, alice_password = _person(config, "alice")
    page = browse.login(config, "alice", alice_password, "/nodes")
    expect(page.locator("[data-node='run1']")).to_contain_text("ready")
    expect(page.locator("[data-node='run1'] button")).to_have_count(0)  # not an admin: no controls


def test_tokens_are_created_and_revoked_and_users_managed(web, browse):
    _, password = _person(web, "root", admin=True)
    page = browse.login(web, "root", password, "/account")
    expect(page.locator("#tokens tbody tr")).to_have_count(1)  # the one create_user made
    page.fill("#token-name", "laptop")
    page.select_option("#token-days", "30")
    page.click("#token-form button[type=submit]")
    secret = page.locator("#token-secret-value")
    expect(secret).to_have_value(re.compile(r".{20,}"))
    token = secret.input_value()
    assert Api(web, token)("GET", "/tasks").status_code == 200
    row = page.locator("#tokens tbody tr", has_text="laptop")
    expect(row).to_contain_text("user")  # its scope

    page.fill("#user-name", "newbie")
    page.click("#user-form button[type=submit]")
    new_password = page.locator("#user-secret-value")
    expect(new_password).to_have_value(re.compile(r".{12,}"))
    first = new_password.input_value()
    assert requests.post(web.web.url + "/api/v1/login", json={"username": "newbie", "password": first},
                         verify=Api(web, "").ca, timeout=30).status_code == 200
    newbie = page.locator("#users tbody tr[data-user='newbie']")
    newbie.get_by_role("button", name="Disable newbie").click()
    page.click("#confirm-yes")
    expect(newbie).to_contain_text("disabled")
    newbie.get_by_role("button", name="Enable newbie").click()
    expect(newbie).to_contain_text("active")
    newbie.get_by_role("button", name="Reset the password of newbie").click()
    page.click("#confirm-yes")
    expect(page.locator("#user-secret-title")).to_have_text("New password for newbie")
    expect(new_password).not_to_have_value(first)
    page.evaluate("window.scrollTo(0, 0)")
    browse.shot(page, "account")

    row.get_by_role("button", name="Revoke token laptop").click()
    page.click("#confirm-yes")
    expect(row).to_have_count(0)
    assert Api(web, token)("GET", "/tasks").status_code == 401

    page.fill("#pw-current", "not my password")
    page.fill("#pw-new", "a new long password")
    page.fill("#pw-again", "a new long password")
    page.click("#password-form button[type=submit]")
    expect(page.locator("#password-status")).to_have_text("the current password is wrong")
    page.fill("#pw-current", password)
    page.click("#password-form button[type=submit]")
    expect(page.locator("#password-status")).to_have_text("Your password was changed.")
    page.fill("#token-name", "after the change")  # the renewed session still works
    page.click("#token-form button[type=submit]")
    expect(page.locator("#tokens tbody tr", has_text="after the change")).to_have_count(1)


# ---------------------------------------------------------------- history and usage

DAY = 86400.0


def _archived(config, task_id: str, user: str, name: str, state: str, ended_ago: float, ran: float,
              gpus: int = 0) -> None:
    """A finished task in the archive, as finalize writes it."""
    end = time.time() - ended_ago
    start = end - ran
    task = new_record(task_id, user, Params(name=name, gpus=gpus, cmd=["python", "train.py"]),
                      {"sha256": "ab" * 32, "size": 73 * 2**20, "repo_tags": [f"lab/{name}:latest"],
                       "image_id": "sha256:" + "cd" * 32, "layout": "docker"}, "web1")
    task.state, task.result, task.node = State(state), state, "run1"
    task.created_at, task.updated_at = start - 40, end + 2
    task.gpus = [f"GPU-{i}" for i in range(gpus)]
    task.exit_code = {"succeeded": 0, "failed": 1}.get(state)
    task.error = {"failed": "the container exited with 1", "timed_out": "stopped after its timeout"}.get(state)
    task.failure = {"failed": "exit_code", "timed_out": "timed_out"}.get(state)
    task.timings = {"submitted": start - 40, "placed": start - 30, "transferred": start - 20,
                    "assigned": start - 10, "running": start, "exported": end, state: end + 2}
    task.history = [[t, s, ""] for s, t in task.timings.items() if s != "submitted"]
    task.history.insert(0, [start - 40, "queued", "uploaded to web1"])
    with archive.connection(config.db) as conn:
        assert archive.archive_task(conn, Task.from_json(task.to_json()), b"epoch 1\n", expires_at=end + 14 * DAY)


def test_history_filters_pages_and_usage(web, browse):
    """Archived tasks of three users and two live ones: the admin's list filters
    by state and name and pages with a cursor; usage shows rows and bars."""
    _, password = _person(web, "root", admin=True)
    make_user(web, "ana")
    make_user(web, "ben")
    for n, (who, name, state, ago, ran, gpus) in enumerate([
            ("ana", "resnet-a", "succeeded", 2 * DAY, 5 * 3600, 2), ("ana", "resnet-b", "failed", 1 * DAY, 600, 2),
            ("ben", "bert-large", "succeeded", 3 * DAY, 8 * 3600, 4), ("ben", "bert-small", "timed_out", 4 * DAY, 3600, 1),
            ("root", "smoke-test", "cancelled", 5 * DAY, 60, 0), ("ana", "old-run", "succeeded", 60 * DAY, 3600, 1)]):
        _archived(web, f"a{n:011d}", who, name, state, ago, ran, gpus)
    store = Store.from_config(web)
    running = new_record("l00000000001", "ben", Params(name="gpt-tiny", gpus=2), {"sha256": "ef" * 32, "size": 5},
                         "web1")
    running.state, running.node, running.gpus = State.RUNNING, "run1", ["GPU-0", "GPU-1"]
    running.timings["running"] = time.time() - 400
    waiting = new_record("l00000000002", "ana", Params(name="resnet-c", gpus=8), {"sha256": "ef" * 32, "size": 5},
                         "web1")
    for task in (running, waiting):
        assert store.create(store.keys.task(task.id), task)
    store.txn().put(store.keys.queue, {"tasks": {waiting.id: [1, 0]},
                                       "reasons": ["no runner has 8 free GPUs"]}).commit()

    page = browse.login(web, "root", password, "/")
    rows = page.locator("#tasks tbody tr")
    expect(rows).to_have_count(8)
    waiting_row = page.locator(f"tr[data-id='{waiting.id}']")
    expect(waiting_row).to_contain_text("#1 in the queue: no runner has 8 free GPUs")
    expect(waiting_row).to_contain_text(re.compile(r"queued \d+ s"))
    expect(page.locator(f"tr[data-id='{running.id}']")).to_contain_text(re.compile(r"running [67] min"))
    browse.shot(page, "tasks")
    phone = browse.login(web, "root", password, "/", viewport=PHONE)
    expect(phone.locator("#tasks tbody tr")).to_have_count(8)
    browse.shot(phone, "tasks-phone")

    page.select_option("#f-state", "succeeded")
    page.click("#filters button[type=submit]")
    expect(rows).to_have_count(3)
    page.fill("#f-name", "bert")
    page.click("#filters button[type=submit]")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("bert-large")

    page.goto("/?limit=3")
    expect(rows).to_have_count(3)
    first_page = rows.evaluate_all("rs => rs.map(r => r.dataset.id)")
    page.click("#page-next")
    expect(rows).to_have_count(3)
    second_page = rows.evaluate_all("rs => rs.map(r => r.dataset.id)")
    assert not set(first_page) & set(second_page)
    expect(page.locator("#page-newest")).to_be_visible()

    page.goto("/usage")
    usage = page.locator("#usage tbody tr")
    expect(usage).to_have_count(3)  # old-run finished before the last 30 days
    expect(page.locator("#usage-chart svg rect")).to_have_count(3)
    expect(usage.first).to_contain_text("ben")  # most GPU-hours first: 4 x 8 h + 1 h
    expect(usage.first).to_contain_text("33.00")
    expect(page.locator("#usage tfoot")).to_contain_text("All users")
    browse.shot(page, "usage")
    page.fill("#u-user", "ana")
    page.click("#usage-form button[type=submit]")
    expect(usage).to_have_count(1)
    expect(page.locator("#usage-chart svg rect")).to_have_count(1)
    since = page.locator("#u-since")
    since.fill(time.strftime("%Y-%m-%d", time.localtime(time.time() - 90 * DAY)))
    page.click("#usage-form button[type=submit]")
    expect(usage).to_contain_text("3")  # old-run counts now

    page.goto("/tasks/a00000000003")  # bert-small, timed out: its own failure, and what to do
    failure = page.locator("#task-failure")
    expect(failure).to_contain_text("The task failed by itself: it ran past its time limit.")
    expect(failure).to_contain_text("Submit again with a longer --timeout")
    expect(page.locator("#summary")).to_contain_text("task: it ran past its time limit")
    page.goto("/tasks/a00000000000")  # succeeded: no failure shown
    expect(page.locator("#summary")).to_contain_text("Attempt")
    expect(failure).to_be_hidden()
