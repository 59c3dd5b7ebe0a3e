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
from pink.errors import BadRequest, Forbidden
from web.auth import check_password, current_token, forget, require_admin, require_user, start_session
from web.resources import res

bp = Blueprint("accounts", __name__, url_prefix="/api/v1")


def _body() -> dict:
    body = request.get_json(silent=True)
    if body is None and request.content_length:
        raise BadRequest("send a JSON object", code="bad_json")
    if not isinstance(body or {}, dict):
        raise BadRequest("send a JSON object", code="bad_json")
    return body or {}


@bp.get("/me")
def me():
    user = require_user()
    token = current_token()
    return jsonify(user=users.user_view(user), token=users.token_view(token) if token else None)


@bp.post("/me/password")
def change_password():
    """{"current", "new"}: change your own password. Other browser sessions end; this one stays."""
    user = require_user()
    body = _body()
    current, new = body.get("current"), body.get("new")
    if not isinstance(current, str) or not isinstance(new, str):
        raise BadRequest('send JSON {"current": ..., "new": ...}', code="bad_param")
    if check_password(user.name, current) is None:
        raise Forbidden("the current password is wrong", code="wrong_password")
    changed = users.set_password(res().db(), user.name, new)
    forget()
    if current_token() is None:
        start_session(changed)
    return jsonify(user=users.user_view(changed))


@bp.get("/tokens")
def list_tokens():
    user = require_user()
    return jsonify(tokens=[users.token_view(t) for t in users.list_tokens(res().db(), user)])


@bp.post("/tokens")
def create_token():
    """{"name", "expires_days" (default 90; null: until revoked), "scope" ("user" or, for admins, "metrics")}."""
    user = require_user()
    body = _body()
    days = body.get("expires_days", users.TOKEN_DAYS)
    if days is not None and (isinstance(days, bool) or not isinstance(days, (int, float))):
        raise BadRequest("expires_days is a number of days, or null for a token that lasts until revoked",
                         code="bad_param")
    token, secret = users.add_token(res().db(), user, name=body.get("name", ""),
                                    scope=body.get("scope", "user"), days=days)
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
    limit = request.args.get("limit", users.USER_PAGE, type=int)
    if not 1 <= limit <= users.USER_PAGE:
        raise BadRequest(f"limit must be between 1 and {users.USER_PAGE}", code="bad_param")
    page, after = users.list_users(res().db(), request.args.get("after", ""), limit)
    return jsonify(users=[users.user_view(u) for u in page], next=after)


@bp.post("/users")
def create_user():
    """{"name", "admin"}: the new user and a generated password, shown once."""
    require_admin()
    body = _body()
    return jsonify(users.create(res().db(), body.get("name", ""), admin=body.get("admin") is True)), 201


@bp.post("/users/<name>/<action>")
def change_user(name: str, action: str):
    """disable (no login, no token works), enable, reset-password (answers the new password once)."""
    answer = users.change(res().db(), name, action, by=require_admin())
    forget()
    return jsonify(answer)
