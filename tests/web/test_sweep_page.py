"""The sweep page in a real browser: counts and indexes, cancel one, cancel all,
download all, and the way to and from each index's task page."""

from __future__ import annotations

import json
import tarfile

import pytest

from pink import users
from tests.helpers import Api

expect = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' (playwright)").expect

RUN_MS = 90_000
SLEEPER = "sh -c \"trap 'exit 0' TERM; echo start; while true; do sleep 0.2; done\""


def test_a_sweep_page_shows_its_indexes_and_cancels_one_then_all(api, writer_archive, browse, tmp_path):
    created = users.create_user(api.config, "sven")
    sven = Api(api.config, created["token"])
    r = sven.submit(writer_archive, cmd=SLEEPER, sweep=json.dumps({"grid": {"LR": ["1", "2", "3"]},
                                                                   "max_parallel": 1}))
    assert r.status_code == 201, r.text
    sweep_id, tasks = r.json()["sweep"]["id"], r.json()["sweep"]["tasks"]
    page = browse.login(api.config, "sven", created["password"], f"/sweeps/{sweep_id}")
    expect(page.locator("h1")).to_contain_text(sweep_id)
    expect(page.locator("#sweep-size")).to_have_text("3 indexes, at most 1 at once")
    rows = page.locator("#sweep-indexes tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(1)).to_contain_text("LR=2")
    expect(page.locator("#sweep-counts dd[data-state='running']")).to_have_text("1", timeout=RUN_MS)

    rows.nth(2).get_by_role("button", name="Cancel").click()  # one index, as a task
    expect(rows.nth(2)).to_contain_text("cancelled", timeout=RUN_MS)
    assert sven.task(tasks[2])["state"] == "cancelled"
    assert sven.task(tasks[1])["state"] == "queued"

    page.click("#sweep-cancel")
    expect(page.locator("#sweep-counts dd[data-state='cancelled']")).to_have_text("3", timeout=RUN_MS)
    expect(page.locator("#sweep-cancel")).to_be_hidden()

    with page.expect_download() as download:
        page.click("#sweep-download")
    saved = tmp_path / "all.tar"
    download.value.save_as(saved)
    with tarfile.open(saved) as tar:
        assert len(tar.getmembers()) == len([t for t in tasks if sven.task(t).get("output")])

    rows.nth(0).get_by_role("link", name=tasks[0]).click()
    expect(page.locator("#task-sweep")).to_contain_text(f"Index 0 of 3 in sweep {sweep_id}")
    page.locator("#task-sweep a").click()
    expect(page.locator("h1")).to_contain_text(sweep_id)
