"""Who is asking: bearer tokens for the API and CLI, sessions for the pages.

API requests carry `Authorization: Bearer <token>`; the pages log in with a
password and get a signed session cookie, and then call the same API with a
CSRF header. Token lookups are cached briefly so a short MariaDB outage does
not lock out people already working. Users see only their own tasks; admins
see all (enforced in `api` through `can_see`). Password checks are throttled
(`web.throttle`) so that strangers slow a guesser down without locking the
owner out; tokens are never throttled. Tokens carry a scope, and a `metrics`
token reads only /metrics.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from urllib.parse import urlsplit

from flask import Blueprint, abort, g, jsonify, redirect, render_template, request, session, url_for
from redis.exceptions import RedisError

from pink import users
from pink.tasks import Task
from pink.errors import BadRequest, Forbidden, NotFound, PinkError, Unauthorized
from pink.request_input import field, json_body
from web import throttle
from web.pages import security_headers
from web.resources import res

bp = Blueprint("auth", __name__)
bp.after_request(security_headers)
log = logging.getLogger("pink.web")

CACHE_SECONDS = 30.0  # how long a token or session user is trusted without asking MariaDB
CACHE_MAX = 4096  # entries kept before the expired ones are dropped
AUTH_EPOCH = "pink:auth:epoch"  # Redis counter: bumped when cached users or tokens go stale
LOGIN_TOKEN_DAYS = 30  # life of the token `pink login` makes
_cache: dict[str, tuple[users.User, users.Token | None, float]] = {}
_cache_lock = threading.Lock()
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
METRICS_ENDPOINTS = {"metrics.metrics"}  # what a `metrics` token may call


_seen_epoch: list[bytes | None] = [None]


def _check_epoch() -> None:
    """Empty the cache when any web process revoked a token or changed a user since.

    The epoch is a Redis counter (`AUTH_EPOCH`) bumped by `forget`, read once
    per request: a revocation takes effect at once on every node and gunicorn
    process. With Redis unreachable the cache is kept (as during a MariaDB outage).
    """
    try:
        epoch = res().redis.get(AUTH_EPOCH)
    except RedisError:
        return
    with _cache_lock:
        if epoch != _seen_epoch[0]:
            _cache.clear()
            _seen_epoch[0] = epoch


def _cached(key: str) -> tuple[users.User, users.Token | None] | None:
    with _cache_lock:
        hit = _cache.get(key)
    return hit[:2] if hit and hit[2] > time.monotonic() else None


def _remember(key: str, user: users.User, token: users.Token | None) -> None:
    now = time.monotonic()
    with _cache_lock:
        if len(_cache) >= CACHE_MAX:
            for stale in [k for k, v in _cache.items() if v[2] <= now]:
                del _cache[stale]
            if len(_cache) >= CACHE_MAX:
                _cache.clear()
        _cache[key] = (user, token, now + CACHE_SECONDS)


def forget() -> None:
    """After a token is revoked or a user changed: every web process drops its cache.

    Without Redis, processes drop their entries within CACHE_SECONDS.
    """
    with _cache_lock:
        _cache.clear()
    try:
        res().redis.incr(AUTH_EPOCH)
    except RedisError as exc:
        log.warning("could not tell other web processes to forget cached users: %s", exc)


def _from_token(secret: str) -> tuple[users.User, users.Token] | None:
    key = "token:" + hashlib.sha256(secret.encode()).hexdigest()
    hit = _cached(key)
    if hit:
        return hit
    found = users.by_token(res().db(), secret)
    if found:
        users.touch(res().db(), *found)
        _remember(key, *found)
    return found


def _from_session(remembered: dict, fresh: bool = False) -> users.User:
    """The session's user as the database has it now (cached briefly unless `fresh`):
    a user removed, disabled or demoted since logging in loses access within CACHE_SECONDS."""
    key = f"session:{remembered['id']}"
    hit = None if fresh else _cached(key)
    if hit:
        user = hit[0]
    else:
        try:
            user = users.by_name(res().db(), remembered["name"])
        except NotFound:
            user = None
        if user is None or user.id != remembered["id"] or user.disabled:
            session.clear()
            raise Unauthorized("this account no longer exists or is disabled: log in again")
        _remember(key, user, None)
    # Checked on every request, cached user or not: an old cookie replayed after
    # a password change must fail while the new session keeps the cache warm.
    if (user.password_changed_at or 0) > remembered.get("since", 0):
        session.clear()
        raise Unauthorized("the password was changed since this session began: log in again")
    return user


def current_user() -> users.User | None:
    if "pink_user" in g:
        return g.pink_user
    _check_epoch()
    user, token = None, None
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        found = _from_token(header[7:].strip())
        if found is None:
            raise Unauthorized("the API token was not accepted (wrong, revoked or expired): "
                               "run `pink login` again")
        user, token = found
        if token.scope != "user" and request.endpoint not in METRICS_ENDPOINTS:
            raise Forbidden(f"this is a {token.scope} token: it may only read /metrics", code="scope")
    elif "user" in session:
        if request.method in UNSAFE and request.headers.get("X-CSRF-Token") != session.get("csrf"):
            raise Forbidden("missing or wrong CSRF token: reload the page", code="csrf")
        user = _from_session(session["user"])
    g.pink_user, g.pink_token = user, token
    return user


def current_token() -> users.Token | None:
    """The token the request came with (None for a browser session)."""
    current_user()
    return g.pink_token


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


def require_metrics_reader() -> users.User:
    """An admin (token or session) or a `metrics` token, as Prometheus uses."""
    user = require_user()
    token = current_token()
    if not user.admin and not (token is not None and token.scope == "metrics"):
        raise Forbidden("only an admin or a metrics token may read /metrics")
    return user


def can_see(user: users.User, task: Task) -> bool:
    return user.admin or task.user == user.name


def require_admin_for_dashboard():
    """rq-dashboard's gate: the user's admin flag as the database has it now, not the
    session's (which lasts 12 h) nor the cache's; operators' requests are few."""
    if request.blueprint != "rq_dashboard":
        return None
    if "user" not in session:
        return redirect(url_for("auth.login_page", next=request.path))
    try:
        user = _from_session(session["user"], fresh=True)
    except Unauthorized:
        return redirect(url_for("auth.login_page", next=request.path))
    if not user.admin:
        abort(403)
    return None


def safe_next(target: str) -> str:
    """`target` if it is a path on this site, else the task list.

    Browsers read a backslash as a slash, so `/\\evil.com` is `//evil.com`,
    another site; control characters are dropped by them too.
    """
    cleaned = target.replace("\\", "/")
    if (cleaned.startswith("/") and not cleaned.startswith("//") and cleaned.isprintable()
            and not urlsplit(cleaned).netloc and not urlsplit(cleaned).scheme):
        return cleaned
    return url_for("pages.tasks")


def check_password(name: str, password: str) -> users.User | None:
    """The user if the password is right. Throttled per client (`web.throttle`: a known
    device or address of the account is never held back by strangers' failures);
    a success makes this client known to the account."""
    with throttle.attempt(name) as outcome:
        user = users.by_password(res().db(), name, password)
        if user is None:
            outcome.failed()
            return None
    users.touch(res().db(), user)
    return user


@bp.post("/api/v1/login")
def api_login():
    """Exchange a name and password for a new API token that expires (used by `pink login`)."""
    body = json_body(request, '{"username": ..., "password": ..., "token_name": optional}')
    name, password = field(body, "username", str), field(body, "password", str)
    if not name or not password:
        raise BadRequest('send JSON {"username": ..., "password": ...}: neither may be empty', code="bad_param")
    user = check_password(name, password)
    if user is None:
        raise Unauthorized("wrong user name or password")
    label = field(body, "token_name", str, None, null_ok=True) or "pink login"
    token, secret = users.add_token(res().db(), user, name=label[:users.MAX_TOKEN_NAME],
                                    days=LOGIN_TOKEN_DAYS)
    return jsonify(token=secret, expires_at=users.token_view(token)["expires_at"],
                   user={"name": user.name, "admin": user.admin})


@bp.route("/login", methods=["GET", "POST"])
def login_page():
    error, status = None, 200
    if request.method == "POST":
        try:
            user = check_password(request.form.get("username", ""), request.form.get("password", ""))
        except PinkError as exc:
            user, error, status = None, exc.message, exc.status
        else:
            if user is None:
                error, status = "Wrong user name or password.", 401
        if user:
            start_session(user)
            return redirect(safe_next(request.args.get("next", "")))
    return render_template("login.html", error=error), status


def start_session(user: users.User) -> None:
    """Log the browser in as `user` (after a password check)."""
    session.clear()
    session["user"] = {"id": user.id, "name": user.name, "admin": user.admin, "since": time.time()}
    session["csrf"] = secrets.token_urlsafe(24)


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("auth.login_page"))
