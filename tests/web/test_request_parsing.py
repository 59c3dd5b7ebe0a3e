"""Malformed input to a running pink-web is a 400 that says what was wrong and
what to send, never a 500: JSON bodies that are not objects, fields of the
wrong type and query numbers that are garbage or out of range
(`pink.request_input`). Valid requests still work."""

from __future__ import annotations

import base64
import json
import time

import pytest
import requests

from pink import archive, users
from pink.tasks import Params, State, new_record
from tests.helpers import Api, make_user

JSON = {"Content-Type": "application/json"}
# (what is sent, the words the message holds); every one answers 400 bad_json
BAD_BODIES = [
    ({"json": [1, 2]}, "a list, not an object"),
    ({"json": []}, "a list, not an object"),
    ({"data": b'"hello"', "headers": JSON}, "the string 'hello', not an object"),
    ({"data": b"42", "headers": JSON}, "the number 42, not an object"),
    ({"data": b"null", "headers": JSON}, "null, not an object"),
    ({"data": b'{"username": ', "headers": JSON}, "not valid JSON"),
    ({"data": b'{"name": "x"}', "headers": {"Content-Type": "text/plain"}}, "not JSON (text/plain)"),
    ({}, "no body"),
]


def _login(web, **kwargs) -> requests.Response:
    return requests.post(web.web.url + "/api/v1/login", verify=Api(web, "").ca, timeout=30, **kwargs)


def _check_refused(r: requests.Response, code: str, *words: str) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == code, body
    for word in words:
        assert word in body["message"], body


def _fake_upload(api: Api) -> tuple[str, str]:
    """An upload session for a made-up one-layer image: (its id, the layer's digest)."""
    layer = "ab" * 32
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "cd" * 32]}}).encode()
    r = api("POST", "/uploads", json={"config": base64.b64encode(config).decode(),
                                      "layers": [{"digest": layer, "size": 10}]})
    assert r.status_code == 201, r.text
    return r.json()["upload"], layer


def test_json_endpoints_refuse_bodies_that_are_not_objects(web):
    admin = Api(web, make_user(web, "ada", admin=True))
    upload, _ = _fake_upload(admin)
    endpoints = [
        ("login", lambda **kw: _login(web, **kw), 'send JSON {"username"'),
        ("/me/password", lambda **kw: admin("POST", "/me/password", **kw), '"current"'),
        ("/tokens", lambda **kw: admin("POST", "/tokens", **kw), '"expires_days"'),
        ("/users", lambda **kw: admin("POST", "/users", **kw), '"admin"'),
        ("/uploads", lambda **kw: admin("POST", "/uploads", **kw), '"layers"'),
        ("commit", lambda **kw: admin("POST", f"/uploads/{upload}/commit", **kw), '"proofs"'),
    ]
    for name, send, shape in endpoints:
        for kwargs, words in BAD_BODIES:
            if name == "commit" and words == "no body":
                continue  # optional there: no proofs to send
            r = send(**kwargs)
            assert r.status_code == 400, (name, kwargs, r.status_code, r.text)
            _check_refused(r, "bad_json", words, shape, "Content-Type: application/json")
    admin("DELETE", f"/uploads/{upload}")


def test_fields_of_the_wrong_type_are_refused(web):
    created = users.create_user(web, "bea")
    api = Api(web, created["token"])
    admin = Api(web, make_user(web, "ada", admin=True))
    _check_refused(_login(web, json={"username": ["bea"], "password": "x"}), "bad_param",
                   '"username" must be a string', "got a list")
    _check_refused(_login(web, json={"username": "bea"}), "bad_param", '"password" is missing')
    _check_refused(_login(web, json={"username": "bea", "password": ""}), "bad_param", "empty")
    _check_refused(api("POST", "/me/password", json={"current": 12, "new": "x" * 20}), "bad_param",
                   '"current" must be a string', "got the number 12")
    _check_refused(api("POST", "/tokens", json={"name": {"a": 1}}), "bad_param", '"name" must be a string')
    _check_refused(api("POST", "/tokens", json={"name": "t", "expires_days": True}), "bad_param",
                   '"expires_days" must be a number or null', "got true")
    _check_refused(admin("POST", "/users", json={"name": "cal", "admin": "yes"}), "bad_param",
                   '"admin" must be true or false')
    # a good login after the refusals: none of them counted as a failed password
    r = _login(web, json={"username": "bea", "password": created["password"], "token_name": None})
    assert r.status_code == 200 and r.json()["user"]["name"] == "bea", r.text


def test_an_upload_refuses_bad_proofs_and_offsets_and_takes_good_ones(web):
    api = Api(web, make_user(web, "ida"))
    upload, layer = _fake_upload(api)
    commit = f"/uploads/{upload}/commit"
    _check_refused(api("POST", commit, json={"proofs": ["ab"]}), "bad_param", '"proofs" must be an object')
    for offset in ("abc", "-1", "1.5"):
        r = api("PUT", f"/uploads/{upload}/blobs/{layer}", data=b"x", headers={"Upload-Offset": offset})
        _check_refused(r, "bad_param", "Upload-Offset", repr(offset), "0 or more")
    # parsed fine, refused for what it says: the layer is neither uploaded nor proved
    for kwargs in ({"json": {"proofs": {}}}, {"json": {"proofs": None}}, {}):
        r = api("POST", commit, **kwargs)
        assert r.status_code == 409 and r.json()["error"] == "blobs_missing", (kwargs, r.text)
    assert api("DELETE", f"/uploads/{upload}").status_code == 200


def _archived_task(config, user: str) -> str:
    record = new_record("rq0000000001", user, Params(), {"sha256": "0" * 64, "size": 10}, "web1")
    now = time.time()
    record.state, record.result, record.created_at = State.SUCCEEDED, "succeeded", now
    with archive.connection(config.db) as conn:
        assert archive.archive_task(conn, record, b"hello\n", expires_at=now + 3600)
    return record.id


@pytest.mark.parametrize("path, name, value, words", [
    ("/tasks", "limit", "abc", "from 1 to 500"),
    ("/tasks", "limit", "0", "from 1 to 500"),
    ("/tasks", "limit", "501", "from 1 to 500"),
    ("/tasks", "limit", "9" * 40, "from 1 to 500"),
    ("/tasks", "limit", "2.5", "a whole number"),
    ("/users", "limit", "abc", "from 1 to 200"),
    ("/users", "limit", "0", "from 1 to 200"),
    ("/users", "limit", "100000", "from 1 to 200"),
    ("/tasks/{task}", "wait", "abc", "0 or more"),
    ("/tasks/{task}", "wait", "-1", "0 or more"),
    ("/tasks/{task}", "wait", "nan", "a number"),
    ("/tasks/{task}/logs?follow=1", "offset", "-1", "0 or more"),
    ("/tasks/{task}/logs?follow=1", "offset", "abc", "a whole number"),
    ("/tasks/{task}/logs?follow=1", "attempt", "0", "1 or more"),
    ("/tasks", "gpus", "many", "from 0 to 64"),  # POST: Params.parse, before any body is read
    ("/tasks", "timeout", "soon", "from 1 to"),
])
def test_query_numbers_that_are_garbage_or_out_of_range_are_refused(web, path, name, value, words):
    admin = Api(web, make_user(web, "ada", admin=True))
    task = _archived_task(web, "ada")
    method = "POST" if name in ("gpus", "timeout") else "GET"
    r = admin(method, path.format(task=task), params={name: value})
    _check_refused(r, "bad_param", name, words)
    assert repr(value)[:40] in r.json()["message"], r.text


def test_valid_query_numbers_still_work(web):
    admin = Api(web, make_user(web, "ada", admin=True))
    make_user(web, "zed")
    task = _archived_task(web, "ada")
    r = admin("GET", "/tasks", params={"limit": "5"})
    assert r.status_code == 200 and [t["id"] for t in r.json()["tasks"]] == [task], r.text
    assert admin("GET", "/tasks", params={"limit": ""}).status_code == 200  # empty: the default
    r = admin("GET", "/users", params={"limit": "1"})
    assert r.status_code == 200 and len(r.json()["users"]) == 1 and r.json()["next"], r.text
    # a long poll above MAX_WAIT is capped, not refused (the task is final: the answer is at once)
    started = time.monotonic()
    r = admin("GET", f"/tasks/{task}", params={"wait": "3600", "seen": "succeeded:1"})
    assert r.status_code == 200 and r.json()["task"]["state"] == "succeeded", r.text
    assert time.monotonic() - started < 10
    r = admin("GET", f"/tasks/{task}/logs", params={"follow": "1", "offset": "2", "attempt": "1"})
    assert r.status_code == 200 and r.text == "llo\n", r.text


def test_valid_bodies_still_work(web):
    created = users.create_user(web, "eve")
    api = Api(web, created["token"])
    admin = Api(web, make_user(web, "ada", admin=True))
    assert _login(web, json={"username": "eve", "password": created["password"]}).status_code == 200
    made = api("POST", "/tokens", json={"name": "laptop", "expires_days": 1.5})
    assert made.status_code == 201, made.text
    made = api("POST", "/tokens", json={"name": "forever", "expires_days": None})
    assert made.status_code == 201 and made.json()["token"]["expires_at"] is None, made.text
    r = admin("POST", "/users", json={"name": "fay", "admin": False})
    assert r.status_code == 201 and r.json()["user"]["admin"] is False, r.text
    r = api("POST", "/me/password", json={"current": created["password"], "new": "a-new-password-1234"})
    assert r.status_code == 200, r.text
