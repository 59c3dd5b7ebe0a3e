"""The web pages: password login, session-authenticated API calls with CSRF, rq-dashboard for admins."""

from __future__ import annotations

import re

import requests

from pink import users
from tests.helpers import Api, make_user


def browser(config, name, admin=False):
    """A logged-in session, like a browser after the login form."""
    created = users.create_user(config, name, admin=admin)
    api = Api(config, created["token"])
    session = requests.Session()
    r = session.post(api.url + "/login", data={"username": name, "password": created["password"]},
                     verify=api.ca, allow_redirects=False)
    assert r.status_code == 302, r.text
    page = session.get(api.url + "/", verify=api.ca)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
    return api, session, csrf, page


def test_login_then_pages_use_the_api_with_csrf(web):
    api, session, csrf, page = browser(web, "carol")
    assert page.status_code == 200 and "Submit a task" in page.text and "carol" in page.text
    listed = session.get(api.url + "/api/v1/tasks", verify=api.ca)
    assert listed.status_code == 200 and listed.json() == {"tasks": [], "next": None}
    no_csrf = session.delete(api.url + "/api/v1/tasks/abc", verify=api.ca)
    assert no_csrf.status_code == 403 and no_csrf.json()["error"] == "csrf"
    with_csrf = session.delete(api.url + "/api/v1/tasks/abc", headers={"X-CSRF-Token": csrf}, verify=api.ca)
    assert with_csrf.status_code == 404


def test_wrong_password_and_anonymous_pages(web):
    make_user(web, "dave")
    api = Api(web, "")
    r = requests.post(api.url + "/login", data={"username": "dave", "password": "guess"}, verify=api.ca)
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    r = requests.get(api.url + "/", verify=api.ca, allow_redirects=False)
    assert r.status_code == 302 and r.headers["Location"].endswith("/login")


def test_rq_dashboard_is_for_admins_only(web):
    api, session, _, _ = browser(web, "erin")
    assert session.get(api.url + "/rq/", verify=api.ca).status_code == 403
    api, admin, _, _ = browser(web, "frank", admin=True)
    r = admin.get(api.url + "/rq/", verify=api.ca)
    assert r.status_code == 200 and "RQ" in r.text


def test_api_login_returns_a_working_token(web):
    created = users.create_user(web, "gina")
    api = Api(web, "")
    r = requests.post(api.url + "/api/v1/login", json={"username": "gina", "password": created["password"]},
                      verify=api.ca)
    assert r.status_code == 200
    token = r.json()["token"]
    assert Api(web, token)("GET", "/tasks").status_code == 200
