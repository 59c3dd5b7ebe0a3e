"""Accounts in the REST API: who am I, my API tokens, and (admins) users.

People hand out tokens to laptops, notebooks and scrapers; each gets a name,
a scope and an expiry so it can be told apart and revoked. Admins create and
disable users and reset passwords here instead of on a server machine
(`pink admin user ... --config` still works there, for the first admin and
the way back). Generated secrets are in the answer once and stored only
hashed. The CLI's `pink token` and `pink admin user` call these endpoints.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from pink import users
from pink.errors import Forbidden
from pink.request_input import field, json_body, number
from web import notification_settings
from web.auth import check_password, current_token, forget, require_admin, require_user, start_session
from web.resources import res

bp = Blueprint("accounts", __name__, url_prefix="/api/v1")


@bp.get("/me")
def me():
    user = require_user()
    token = current_token()
    return jsonify(user=users.user_view(user), token=users.token_view(token) if token else None)


@bp.post("/me/password")
def change_password():
    """{"current", "new"}: change your own password. Other browser sessions end; this one stays."""
    user = require_user()
    body = json_body(request, '{"current": ..., "new": ...}')
    current, new = field(body, "current", str), field(body, "new", str)
    if check_password(user.name, current) is None:
        raise Forbidden("the current password is wrong", code="wrong_password")
    changed = users.set_password(res().db(), user.name, new)
    forget()
    if current_token() is None:
        start_session(changed)
    return jsonify(user=users.user_view(changed))


@bp.get("/me/notifications")
def notifications_view():
    """Your webhook, e-mail, on-running flag and signing secret (`pink.notifications`)."""
    return jsonify(notifications=notification_settings.view(require_user()))


@bp.put("/me/notifications")
def notifications_set():
    """{"webhook": URL or null, "email": address or null, "on_running": bool}: the fields sent are set."""
    user = require_user()
    body = json_body(request, '{"webhook": URL or null, "email": address or null, "on_running": true or false}')
    return jsonify(notifications=notification_settings.update(user, body))


@bp.delete("/me/notifications")
def notifications_clear():
    """Forget your webhook, e-mail and secret; tasks already submitted are not notified."""
    notification_settings.clear(require_user())
    return jsonify(notifications=None)


@bp.post("/me/notifications/secret")
def notifications_rotate():
    """A new signing secret; the old one stops signing at once."""
    return jsonify(notifications=notification_settings.rotate(require_user()))


@bp.get("/tokens")
def list_tokens():
    user = require_user()
    return jsonify(tokens=[users.token_view(t) for t in users.list_tokens(res().db(), user)])


@bp.post("/tokens")
def create_token():
    """{"name", "expires_days" (default 90; null: until revoked), "scope" ("user" or, for admins, "metrics")}."""
    user = require_user()
    body = json_body(request, '{"name": ..., "expires_days": days or null, "scope": "user" or "metrics"}')
    days = field(body, "expires_days", float, users.TOKEN_DAYS, null_ok=True)  # null: until revoked
    token, secret = users.add_token(res().db(), user, name=field(body, "name", str, ""),
                                    scope=field(body, "scope", str, "user"), days=days)
    return jsonify(token=users.token_view(token), secret=secret), 201


@bp.delete("/tokens/<int:token_id>")
def revoke_token(token_id: int):
    user = require_user()
    users.revoke_token(res().db(), user, token_id)
    forget()
    return jsonify(revoked=token_id)


@bp.get("/users")
def list_users():
    require_admin()
    limit = number(request.args, "limit", int, users.USER_PAGE, low=1, high=users.USER_PAGE)
    page, after = users.list_users(res().db(), request.args.get("after", ""), limit)
    return jsonify(users=[users.user_view(u) for u in page], next=after)


@bp.post("/users")
def create_user():
    """{"name", "admin"}: the new user and a generated password, shown once."""
    require_admin()
    body = json_body(request, '{"name": ..., "admin": true or false}')
    return jsonify(users.create(res().db(), field(body, "name", str, ""),
                                admin=field(body, "admin", bool, False))), 201


@bp.post("/users/<name>/<action>")
def change_user(name: str, action: str):
    """disable (no login, no token works), enable, reset-password (answers the new password once)."""
    answer = users.change(res().db(), name, action, by=require_admin())
    forget()
    return jsonify(answer)
