"""Tenants: one user can neither read nor change another's task, log, output,
layers or upload by its id, through any door. Each answer is the one a
missing id gets (404), so ids cannot even be probed; the owner's task goes on
untouched."""

from __future__ import annotations

from tests.helpers import Api, begin_upload, make_user

NOT_YOURS = 404


def test_another_users_finished_task_is_as_good_as_missing(api, writer_archive):
    """A user cannot read, download, follow, rerun or delete another user's
    finished task by its id: each door answers what an unknown id gets."""
    task = api.wait(api.submit(writer_archive).json()["task"]["id"])
    assert task["state"] == "succeeded", task
    bob = Api(api.config, make_user(api.config, "bob"))
    tid = task["id"]
    for method, path in (("GET", f"/tasks/{tid}"), ("GET", f"/tasks/{tid}/logs"),
                         ("GET", f"/tasks/{tid}/logs?follow=1"), ("GET", f"/tasks/{tid}/output"),
                         ("POST", f"/tasks/{tid}/rerun"), ("DELETE", f"/tasks/{tid}")):
        r = bob(method, path)
        assert r.status_code == NOT_YOURS, (method, path, r.status_code, r.text)
        assert r.json()["error"] == "unknown_task", (method, path, r.text)
        assert tid not in r.text.replace(f"no task {tid}", "")  # nothing of the task leaks
    assert tid not in {t["id"] for t in bob("GET", "/tasks").json()["tasks"]}
    assert bob("GET", "/tasks", params={"user": "alice"}).status_code == 403
    assert bob("GET", "/usage", params={"user": "alice"}).status_code == 403
    # the owner still has everything
    assert api("GET", f"/tasks/{tid}/output").status_code == 200
    assert b"done" in api("GET", f"/tasks/{tid}/logs").content


def test_another_users_live_task_cannot_be_cancelled(api, slow_archive):
    """A user cannot cancel or follow another user's running task; it runs to its end."""
    tid = api.submit(slow_archive).json()["task"]["id"]
    api.wait(tid, states={"running"})
    bob = Api(api.config, make_user(api.config, "bob"))
    assert bob("DELETE", f"/tasks/{tid}").status_code == NOT_YOURS
    assert bob("GET", f"/tasks/{tid}", params={"wait": 1, "seen": "running:1"}).status_code == NOT_YOURS
    assert bob("GET", f"/tasks/{tid}/logs", params={"follow": 1}).status_code == NOT_YOURS
    assert api.wait(tid)["state"] == "succeeded"


def test_another_users_upload_session_cannot_be_used(web, writer_archive):
    """A user cannot look into, add to, commit or abandon another user's layer
    upload by its id (the id travels in URLs and logs)."""
    alice = Api(web, make_user(web, "alice"))
    session = begin_upload(alice, writer_archive)
    upload_id, layer = session["upload"], session["layers"][0]
    mallory = Api(web, make_user(web, "mallory"))
    for method, path, kwargs in (("HEAD", f"/uploads/{upload_id}/blobs/{layer}", {}),
                                 ("PUT", f"/uploads/{upload_id}/blobs/{layer}", {"data": b"x"}),
                                 ("POST", f"/uploads/{upload_id}/commit", {"json": {}}),
                                 ("DELETE", f"/uploads/{upload_id}", {})):
        r = mallory(method, path, **kwargs)
        assert r.status_code == NOT_YOURS, (method, path, r.status_code, r.text)
    # the session is still alice's and still open
    assert alice("HEAD", f"/uploads/{upload_id}/blobs/{layer}").status_code == 200
    assert alice("DELETE", f"/uploads/{upload_id}").status_code == 200
