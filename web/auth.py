"""Who is asking: bearer tokens for the API and CLI, sessions for the pages.

API requests carry `Authorization: Bearer <token>`; the pages log in with a
password and get a signed session cookie, and then call the same API with a
CSRF header. Token lookups are cached briefly so a short MariaDB outage does
not lock out people already working. Users see only their own tasks; admins
see all (enforced in `api` through `can_see`).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

from flask import Blueprint, abort, g, jsonify, redirect, render_template, request, session, url_for

from pink import users
from pink.tasks import Task
from pink.errors import BadRequest, Forbidden, NotFound, Unauthorized
from web.resources import res

bp = Blueprint("auth", __name__)

TOKEN_CACHE_SECONDS = 60.0
_cache: dict[str, tuple[users.User, float]] = {}
_cache_lock = threading.Lock()
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


def _from_token(token: str) -> users.User | None:
    key = hashlib.sha256(token.encode()).hexdigest()
    with _cache_lock:
        hit = _cache.get(key)
    if hit and hit[1] > time.monotonic():
        return hit[0]
    user = users.by_token(res().db(), token)
    if user:
        with _cache_lock:
            _cache[key] = (user, time.monotonic() + TOKEN_CACHE_SECONDS)
    return user


def _from_session(remembered: dict) -> users.User:
    """The session's user as the database has it now (cached briefly): a user
    removed or demoted since logging in loses access within a minute."""
    key = f"session:{remembered['id']}"
    with _cache_lock:
        hit = _cache.get(key)
    if hit and hit[1] > time.monotonic():
        return hit[0]
    try:
        user = users.by_name(res().db(), remembered["name"])
    except NotFound:
        user = None
    if user is None or user.id != remembered["id"]:
        session.clear()
        raise Unauthorized("this account no longer exists: log in again")
    with _cache_lock:
        _cache[key] = (user, time.monotonic() + TOKEN_CACHE_SECONDS)
    return user


def current_user() -> users.User | None:
    if "pink_user" in g:
        return g.pink_user
    user = None
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        user = _from_token(header[7:].strip())
        if user is None:
            raise Unauthorized("the API token was not accepted: run `pink login` again")
    elif "user" in session:
        if request.method in UNSAFE and request.headers.get("X-CSRF-Token") != session.get("csrf"):
            raise Forbidden("missing or wrong CSRF token: reload the page", code="csrf")
        user = _from_session(session["user"])
    g.pink_user = user
    return user


def require_user() -> users.User:
    user = current_user()
    if user is None:
        raise Unauthorized("authentication required: send `Authorization: Bearer <token>` "
                           "(see `pink login`)")
    return user


def require_admin() -> users.User:
    user = require_user()
    if not user.admin:
        raise Forbidden("only an admin may do this")
    return user


def can_see(user: users.User, task: Task) -> bool:
    return user.admin or task.user == user.name


def require_admin_for_dashboard():
    if request.blueprint == "rq_dashboard":
        user = session.get("user")
        if not user:
            return redirect(url_for("auth.login_page", next=request.path))
        if not user.get("admin"):
            abort(403)
    return None


@bp.post("/api/v1/login")
def api_login():
    """Exchange a name and password for a new API token (used by `pink login`)."""
    body = request.get_json(silent=True) or {}
    name, password = body.get("username"), body.get("password")
    if not name or not password:
        raise BadRequest("send JSON {\"username\": ..., \"password\": ...}")
    user = users.by_password(res().db(), name, password)
    if user is None:
        raise Unauthorized("wrong user name or password")
    token = users.add_token(res().db(), user)
    return jsonify(token=token, user={"name": user.name, "admin": user.admin})


@bp.route("/login", methods=["GET", "POST"])
def login_page():
    error = None
    if request.method == "POST":
        user = users.by_password(res().db(), request.form.get("username", ""),
                                 request.form.get("password", ""))
        if user:
            session.clear()
            session["user"] = {"id": user.id, "name": user.name, "admin": user.admin}
            session["csrf"] = secrets.token_urlsafe(24)
            target = request.args.get("next", "")
            return redirect(target if target.startswith("/") and not target.startswith("//")
                            else url_for("pages.tasks"))
        error = "Wrong user name or password."
    return render_template("login.html", error=error), (401 if error else 200)


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("auth.login_page"))
