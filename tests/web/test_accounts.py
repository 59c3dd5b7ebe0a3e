"""Accounts: named tokens that expire and can be revoked, users admins manage, and
the login endpoint's throttle, through a running pink-web and the `pink` CLI."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import requests

from pink import db, users
from tests.helpers import Api, make_user
from tests.web.test_pages import browser


def _login(api: Api, name: str, password: str) -> requests.Response:
    return requests.post(api.url + "/api/v1/login", json={"username": name, "password": password},
                         verify=api.ca, timeout=30)


def _days_left(iso_time: str) -> float:
    moment = datetime.fromisoformat(iso_time.replace("Z", "+00:00"))
    return (moment - datetime.now(timezone.utc)).total_seconds() / 86400


def test_tokens_are_named_listed_expire_and_are_revoked(web):
    created = users.create_user(web, "hana")
    api = Api(web, created["token"])
    login = _login(api, "hana", created["password"])
    assert login.status_code == 200
    assert 29 < _days_left(login.json()["expires_at"]) <= 30  # `pink login` tokens do not live for ever

    made = api("POST", "/tokens", json={"name": "laptop", "expires_days": 7})
    assert made.status_code == 201, made.text
    laptop, secret = made.json()["token"], made.json()["secret"]
    assert laptop["name"] == "laptop" and laptop["scope"] == "user" and 6 < _days_left(laptop["expires_at"]) <= 7
    assert Api(web, secret)("GET", "/tasks").status_code == 200

    listed = api("GET", "/tokens").json()["tokens"]
    assert [t["name"] for t in listed] == ["laptop", "pink login", "created with the account"]
    assert "secret" not in listed[0] and listed[0]["last_used_at"] is not None  # it was just used

    assert api("DELETE", f"/tokens/{laptop['id']}").json() == {"revoked": laptop["id"]}
    refused = Api(web, secret)("GET", "/tasks")
    assert refused.status_code == 401 and "revoked" in refused.json()["message"]

    # another user's token is not yours to revoke: 404 like a missing one
    other = Api(web, make_user(web, "ivan"))
    assert other("DELETE", f"/tokens/{listed[1]['id']}").status_code == 404
    assert len(api("GET", "/tokens").json()["tokens"]) == 2

    # an expired token is refused and deleted when its owner next lists tokens
    expired_secret = api("POST", "/tokens", json={"name": "old"}).json()["secret"]
    _sql(web, "UPDATE tokens SET expires_at=1 WHERE name='old'")
    assert Api(web, expired_secret)("GET", "/tasks").status_code == 401
    assert "old" not in [t["name"] for t in api("GET", "/tokens").json()["tokens"]]
    assert _sql(web, "SELECT COUNT(*) AS n FROM tokens WHERE name='old'")[0]["n"] == 0


def test_token_input_is_checked_and_metrics_tokens_are_for_admins(web):
    api = Api(web, make_user(web, "jo"))
    for body, word in (({"name": ""}, "name"), ({"name": "x", "expires_days": "soon"}, "expires_days"),
                       ({"name": "x", "expires_days": 0}, "days"), ({"name": "x", "scope": "root"}, "scope")):
        r = api("POST", "/tokens", json=body)
        assert r.status_code == 400 and word in r.json()["message"], (body, r.text)
    assert api("POST", "/tokens", json={"name": "prom", "scope": "metrics"}).status_code == 403

    admin = Api(web, make_user(web, "kim", admin=True))
    scrape = admin("POST", "/tokens", json={"name": "prometheus", "scope": "metrics", "expires_days": None})
    assert scrape.status_code == 201 and scrape.json()["token"]["expires_at"] is None
    r = Api(web, scrape.json()["secret"])("GET", "/tasks")
    assert r.status_code == 403 and r.json()["error"] == "scope"


def test_admins_create_disable_enable_and_reset_users(web):
    admin = Api(web, make_user(web, "lena", admin=True))
    made = admin("POST", "/users", json={"name": "mo", "admin": False})
    assert made.status_code == 201 and made.json()["user"]["name"] == "mo"
    password = made.json()["password"]
    token = _login(admin, "mo", password).json()["token"]
    mo = Api(web, token)
    assert mo("GET", "/users").status_code == 403
    assert mo("POST", "/users", json={"name": "eve"}).status_code == 403
    assert admin("POST", "/users", json={"name": "mo"}).status_code == 409
    assert admin("POST", "/users", json={"name": "../x"}).status_code == 400

    assert admin("POST", "/users/mo/disable").json()["user"]["disabled"] is True
    r = _login(admin, "mo", password)
    assert r.status_code == 403 and "disabled" in r.json()["message"]
    assert mo("GET", "/tasks").status_code == 401  # every web process forgot the token at once
    assert admin("POST", "/users/lena/disable").status_code == 403  # not yourself

    assert admin("POST", "/users/mo/enable").json()["user"]["disabled"] is False
    assert mo("GET", "/tasks").status_code == 200
    new = admin("POST", "/users/mo/reset-password").json()["password"]
    assert _login(admin, "mo", password).status_code == 401 and _login(admin, "mo", new).status_code == 200

    names = {u["name"]: u for u in admin("GET", "/users").json()["users"]}
    assert set(names) == {"lena", "mo"} and names["mo"]["last_used_at"] and names["lena"]["admin"]
    page = admin("GET", "/users", params={"limit": 1}).json()
    assert [u["name"] for u in page["users"]] == ["lena"] and page["next"] == "lena"
    assert admin("POST", "/users/nobody/disable").status_code == 404


def test_cli_tokens_and_admin_users(web):
    admin = Api(web, make_user(web, "nora", admin=True))
    secret = admin.cli("token", "create", "ci", "--days", "3").stdout.strip()
    assert secret.startswith("pink_") and Api(web, secret)("GET", "/tasks").status_code == 200
    listed = admin.cli("token", "list").stdout
    assert "ci" in listed and "LAST USED" in listed
    token_id = next(t["id"] for t in admin("GET", "/tokens").json()["tokens"] if t["name"] == "ci")
    admin.cli("token", "revoke", str(token_id))
    assert Api(web, secret)("GET", "/tasks").status_code == 401

    out = admin.cli("admin", "user", "create", "otto").stdout
    assert "user:     otto" in out and "password:" in out
    assert "otto" in admin.cli("admin", "user", "list").stdout
    admin.cli("admin", "user", "disable", "otto")
    assert "disabled" in admin.cli("admin", "user", "list").stdout
    # on a server machine, with its config, without any login: the way back for a lost password
    direct = admin.cli("admin", "user", "reset-password", "nora", "--json", "--config", web.path)
    assert '"password"' in direct.stdout


def test_logins_are_throttled_by_user_and_by_address(web):
    created = users.create_user(web, "pia")
    api = Api(web, created["token"])
    for _ in range(10):
        assert _login(api, "pia", "wrong").status_code == 401
    r = _login(api, "pia", created["password"])  # right, but the account is under attack
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0 and "pia" in r.json()["message"]
    page = requests.post(api.url + "/login", data={"username": "pia", "password": created["password"]},
                         verify=api.ca, timeout=30)
    assert page.status_code == 429 and "too many failed logins" in page.text

    for n in range(30):  # a client spraying names (unknown ones cost a scrypt too: no timing oracle)
        assert _login(api, f"ghost{n}", "x").status_code in (401, 429)
    r = _login(api, "quinn", "x")
    assert r.status_code == 429 and "from" in r.json()["message"]


def test_login_redirects_only_within_the_site(web):
    created = users.create_user(web, "rita")
    api = Api(web, "")
    for target, expected in (("/tasks/abc", "/tasks/abc"), ("/\\evil.com", "/"), ("//evil.com", "/"),
                             ("https://evil.com/", "/"), ("/\\/evil.com", "/"), ("/\t/evil.com", "/")):
        r = requests.post(api.url + "/login", params={"next": target}, verify=api.ca, allow_redirects=False,
                          data={"username": "rita", "password": created["password"]}, timeout=30)
        assert r.status_code == 302 and r.headers["Location"] == expected, (target, r.headers["Location"])


def test_rq_dashboard_rechecks_the_admin_flag(web):
    api, session, _, _ = browser(web, "sam", admin=True)
    assert session.get(api.url + "/rq/", verify=api.ca).status_code == 200
    _sql(web, "UPDATE users SET is_admin=0 WHERE name='sam'")
    assert session.get(api.url + "/rq/", verify=api.ca).status_code == 403


def _sql(config, statement: str) -> list[dict]:
    conn = db.connect(config.db)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            rows = cur.fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def test_a_new_password_ends_older_browser_sessions(web):
    api, session, csrf, _ = browser(web, "tom")
    token_api = Api(web, make_user(web, "una", admin=True))
    new = token_api("POST", "/users/tom/reset-password").json()["password"]
    r = session.get(api.url + "/api/v1/tasks", verify=api.ca)
    assert r.status_code == 401 and "password was changed" in r.json()["message"]
    assert _login(api, "tom", new).status_code == 200


def test_people_change_their_own_password(web):
    created = users.create_user(web, "vera")
    api = Api(web, created["token"])
    session = requests.Session()
    assert session.post(api.url + "/login", data={"username": "vera", "password": created["password"]},
                        verify=api.ca, allow_redirects=False).status_code == 302
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', session.get(api.url + "/", verify=api.ca).text)[1]

    def change(current: str, new: str) -> requests.Response:
        return session.post(api.url + "/api/v1/me/password", json={"current": current, "new": new},
                            headers={"X-CSRF-Token": csrf}, verify=api.ca)

    wrong = change("guess", "a-new-long-password")
    assert wrong.status_code == 403 and wrong.json()["error"] == "wrong_password"
    short = change(created["password"], "short")
    assert short.status_code == 400 and "12 characters" in short.json()["message"]
    assert change(created["password"], "a-new-long-password").status_code == 200
    assert session.get(api.url + "/api/v1/tasks", verify=api.ca).status_code == 200  # this browser stays in
    assert api("GET", "/tasks").status_code == 200  # and tokens keep working
    assert _login(api, "vera", created["password"]).status_code == 401
    assert _login(api, "vera", "a-new-long-password").status_code == 200


def test_an_old_cookie_fails_after_a_password_change_even_with_the_cache_warm(web):
    created = users.create_user(web, "yara")
    api = Api(web, created["token"])

    def login(password: str) -> tuple[requests.Session, str]:
        session = requests.Session()
        assert session.post(api.url + "/login", data={"username": "yara", "password": password},
                            verify=api.ca, allow_redirects=False).status_code == 302
        page = session.get(api.url + "/", verify=api.ca).text
        return session, re.search(r'name="csrf-token" content="([^"]+)"', page)[1]

    old, csrf = login(created["password"])
    stolen = dict(old.cookies)  # what someone copied from this browser
    r = old.post(api.url + "/api/v1/me/password", json={"current": created["password"], "new": "n" * 14},
                 headers={"X-CSRF-Token": csrf}, verify=api.ca)
    assert r.status_code == 200
    new, _ = login("n" * 14)
    for _ in range(3):  # the new session keeps the cache of this user warm
        assert new.get(api.url + "/api/v1/tasks", verify=api.ca).status_code == 200
    replayed = requests.get(api.url + "/api/v1/tasks", cookies=stolen, verify=api.ca)
    assert replayed.status_code == 401 and "password was changed" in replayed.json()["message"]


def test_bodies_read_into_memory_are_capped(web):
    api = Api(web, "")
    r = requests.post(api.url + "/api/v1/login", data=b"{" + b" " * (100 * 2**10) + b"}",
                      headers={"Content-Type": "application/json"}, verify=api.ca)
    assert r.status_code == 413


def test_usage_and_the_account_page_show_every_limit(web, writer_archive):
    """A user sees every per-user limit, its shipped default, their use of it and what it caps:
    in `GET /api/v1/usage`, in `pink usage` and on the account page; an admin sees another user's."""
    created = users.create_user(web, "lena")
    api = Api(web, created["token"])
    assert api.submit(writer_archive, name="one").status_code == 201
    shown = api("GET", "/usage").json()["limits"]
    for name in ("live_tasks_per_user", "upload_bytes_per_user", "upload_sessions_per_user",
                 "output_bytes_per_task", "log_streams_per_user", "log_streams_per_node", "record_bytes",
                 "gpus_per_user", "queued_per_user", "max_output_bytes_per_user", "max_log_bytes"):
        assert name in shown and shown[name]["caps"], name
    assert shown["live_tasks_per_user"] == {"limit": 500, "used": 1, "caps": shown["live_tasks_per_user"]["caps"]}
    assert shown["upload_sessions_per_user"]["limit"] == 16

    text = api.cli("usage").stdout
    assert "WHAT IT CAPS" in text and re.search(r"live_tasks_per_user\s+500\s+1\s", text), text
    assert re.search(r"upload_bytes_per_user\s+500\.0 GiB", text), text

    admin = Api(web, make_user(web, "root2", admin=True))
    assert admin("GET", "/usage", params={"user": "lena"}).json()["limits"]["live_tasks_per_user"]["used"] == 1
    assert admin("GET", "/usage").json()["limits"]["live_tasks_per_user"]["used"] == 0

    page = requests.Session()
    page.post(api.url + "/login", data={"username": "lena", "password": created["password"]},
              verify=api.ca, timeout=30)
    account = page.get(api.url + "/account", verify=api.ca, timeout=30)
    assert account.status_code == 200 and 'id="limits"' in account.text
    assert re.search(r"<code>live_tasks_per_user</code></td><td[^>]*>500</td><td[^>]*>1</td>", account.text)
    assert "500.0 GiB" in account.text and "no limit" in account.text
