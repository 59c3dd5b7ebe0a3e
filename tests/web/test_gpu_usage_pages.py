"""GPU usage on the pages, in a real browser: a task run where nothing measures GPUs (the
dev cluster's runner) says "not measured" on its page and in the usage table, never 0."""

from __future__ import annotations

import pytest

from pink import users
from tests import images
from tests.helpers import Api

expect = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' (playwright)").expect


def test_a_task_without_measured_gpus_says_not_measured(api, browse, docker_client, tmp_path):
    person = users.create_user(api.config, "gina")
    gina = Api(api.config, person["token"])
    archive = images.save_image(docker_client, images.ensure_busybox_image(docker_client), tmp_path / "bb.tar")
    task_id = gina.submit(archive, cmd="true").json()["task"]["id"]
    assert gina.wait(task_id, timeout=180)["gpu_usage"] is None
    page = browse.login(api.config, "gina", person["password"], f"/tasks/{task_id}")
    summary = page.locator("#summary")
    expect(summary).to_contain_text("GPU usage")
    expect(summary).to_contain_text("not measured")
    page.goto("/usage")
    row = page.locator("#usage tbody tr").first
    expect(row.locator("[data-label='GPU-hours used']")).to_have_text("not measured")
    expect(row.locator("[data-label='GPU-hours idle']")).to_have_text("not measured")
