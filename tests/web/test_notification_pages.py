"""The notification pages in a real browser: the account page's form (a
hostile URL refused with its reason, a webhook saved, the secret shown and
rotated) and a task page showing its delivery's state and last failure,
with a real receiver that keeps answering 500."""

from __future__ import annotations

import re

import pytest

from pink import users
from tests.helpers import Api
from tests.receivers import receiver, start_pink  # noqa: F401 - receiver: the fixture

expect = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' (playwright)").expect
RUN_MS = 90_000  # a task's run and its deliveries' tries


@pytest.fixture
def pink(pink_processes, config_variant, receiver):
    """PINK allowing the receiver's address, giving up a delivery after 2 quick tries."""
    start_pink(pink_processes, config_variant, "notify-pages", allow_private=[f"{receiver.address}/32"],
               first_retry=0.5, max_retry_interval=1.0, max_attempts=2)
    return pink_processes.config


def test_the_account_form_refuses_a_hostile_url_saves_a_webhook_and_rotates_the_secret(pink, receiver, browse):
    created = users.create_user(pink, "nora")
    page = browse.login(pink, "nora", created["password"], "/account")
    status = page.locator("#notify-status")
    expect(page.locator("#notify-secret")).to_be_hidden()
    page.fill("#notify-webhook", "http://127.0.0.1:9/hook")
    page.click("#notify-form button[type=submit]")
    expect(status).to_contain_text("is a loopback address")
    expect(status).to_have_class(re.compile(r"\berror\b"))

    page.fill("#notify-webhook", receiver.url("/nora"))
    page.check("#notify-running")
    page.click("#notify-form button[type=submit]")
    expect(status).to_have_text("Notifications saved: tasks you submit from now on are notified.")
    secret = page.locator("#notify-secret-value")
    expect(secret).to_have_value(re.compile(r"^pinkwh_"))
    first = secret.input_value()
    browse.shot(page, "account-notifications")

    page.click("#notify-rotate")
    page.click("#confirm-yes")
    expect(status).to_have_text("A new signing secret was made.")
    expect(secret).not_to_have_value(first)
    saved = Api(pink, created["token"])("GET", "/me/notifications").json()["notifications"]
    assert (saved["webhook"], saved["on_running"], saved["secret"]) == \
        (receiver.url("/nora"), True, secret.input_value())

    page.reload()  # what the form shows comes from the server
    expect(page.locator("#notify-webhook")).to_have_value(receiver.url("/nora"))
    expect(page.locator("#notify-running")).to_be_checked()


def test_the_task_page_shows_a_failed_delivery_and_its_last_error(pink, receiver, browse, writer_archive):
    created = users.create_user(pink, "omar")
    api = Api(pink, created["token"])
    receiver.answers["/down"] = [(500, {}), (500, {})]
    task_id = api.submit(writer_archive, notify=receiver.url("/down")).json()["task"]["id"]
    page = browse.login(pink, "omar", created["password"], f"/tasks/{task_id}")
    row = page.locator("#notifications tbody tr")
    expect(row.locator(".notify-state")).to_have_text("failed", timeout=RUN_MS)  # refreshed while pending
    expect(row.locator(".notify-error")).to_have_text("HTTP 500 (given up after 2 tries)")
    expect(row).to_contain_text(receiver.origin)
    expect(row).not_to_contain_text("/down")  # the path (often a receiver's token) is not shown
    browse.shot(page, "task-notifications")
