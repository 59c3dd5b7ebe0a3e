"""Users and API tokens, stored in MariaDB (`users`, `tokens`).

Passwords are scrypt hashes; tokens are random and stored only as SHA-256,
so a database dump reveals neither. Nothing here has a default credential:
a new user's password is generated and shown once. Tokens have a name, a
scope and an expiry, so people can tell apart and revoke what they handed
out; a revoked or expired token is deleted, so the table does not grow with
every `pink login` of a lab's year. Used by the web app (`web.auth`,
`web.accounts`) and by `pink admin user` on a server machine.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from pink import cooperative, db
from pink.errors import BadRequest, Conflict, Forbidden, NotFound
from pink.tasks import iso

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
SCOPES = ("user", "metrics")  # user: the API as its owner; metrics: only GET /metrics
TOKEN_DAYS = 90  # a new token's life unless its creator says otherwise
MAX_TOKEN_NAME = 128
USER_PAGE = 200
MIN_PASSWORD = 12


@dataclass(frozen=True)
class User:
    id: int
    name: str
    admin: bool
    disabled: bool = False
    created_at: float | None = None
    last_used_at: float | None = None
    password_changed_at: float | None = None


@dataclass(frozen=True)
class Token:
    id: int
    user_id: int
    name: str
    scope: str
    created_at: float
    last_used_at: float | None
    expires_at: float | None


def _scrypt(password: str, salt: bytes) -> bytes:
    """16 MiB of scrypt, off pink-web's event loop (a login must not stall its neighbours)."""
    return cooperative.off_the_loop(functools.partial(hashlib.scrypt, password.encode(), salt=salt, **_SCRYPT))


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt)
    return "scrypt$" + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = _scrypt(password, base64.b64decode(salt))
    return hmac.compare_digest(candidate, base64.b64decode(digest))


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(18))


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_USER_COLUMNS = "u.id, u.name, u.is_admin, u.disabled_at, u.created_at, u.last_used_at, u.password_changed_at"
_TOKEN_COLUMNS = "t.id, t.user_id, t.name, t.scope, t.created_at, t.last_used_at, t.expires_at"


def _user(row) -> User:
    return User(id=row["id"], name=row["name"], admin=bool(row["is_admin"]),
                disabled=row["disabled_at"] is not None, created_at=row["created_at"],
                last_used_at=row["last_used_at"], password_changed_at=row["password_changed_at"])


def _token(row) -> Token:
    return Token(id=row["id"], user_id=row["user_id"], name=row["name"], scope=row["scope"],
                 created_at=row["created_at"], last_used_at=row["last_used_at"], expires_at=row["expires_at"])


def user_view(user: User) -> dict:
    """A user as the API shows it."""
    return {"name": user.name, "admin": user.admin, "disabled": user.disabled,
            "created_at": iso(user.created_at), "last_used_at": iso(user.last_used_at)}


def token_view(token: Token) -> dict:
    """A token as the API shows it: never its secret (only its hash is stored)."""
    return {"id": token.id, "name": token.name, "scope": token.scope, "created_at": iso(token.created_at),
            "last_used_at": iso(token.last_used_at), "expires_at": iso(token.expires_at)}


# ---------------------------------------------------------------- users

def add_user(conn, name: str, admin: bool = False) -> tuple[User, str]:
    """Create a user with a generated password; returns (user, password)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadRequest("a user name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter",
                         code="bad_param")
    password = secrets.token_urlsafe(18)
    now = time.time()
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM users WHERE name=%s", (name,))
        if cur.fetchone():
            raise Conflict(f"user {name} already exists", code="user_exists")
        cur.execute("INSERT INTO users (name, password_hash, is_admin, created_at) VALUES (%s,%s,%s,%s)",
                    (name, hash_password(password), admin, now))
        user = User(id=cur.lastrowid, name=name, admin=admin, created_at=now)
    conn.commit()
    return user, password


def by_name(conn, name: str) -> User:
    with conn.cursor() as cur:
        cur.execute(f"SELECT {_USER_COLUMNS} FROM users u WHERE u.name=%s", (name,))
        row = cur.fetchone()
    conn.commit()
    if not row:
        raise NotFound(f"no user named {name}", code="unknown_user")
    return _user(row)


def list_users(conn, after: str = "", limit: int = USER_PAGE) -> tuple[list[User], str | None]:
    """One page of users by name, and the name to continue after (None at the end)."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT {_USER_COLUMNS} FROM users u WHERE u.name > %s ORDER BY u.name LIMIT %s",
                    (after, limit + 1))
        rows = cur.fetchall()
    conn.commit()
    page = [_user(r) for r in rows[:limit]]
    return page, (page[-1].name if len(rows) > limit else None)


def set_disabled(conn, name: str, disabled: bool, by: User | None = None) -> User:
    """Disable (no login, no token works) or enable a user; their tokens are kept for enabling."""
    user = by_name(conn, name)
    if disabled and by is not None and by.id == user.id:
        raise Forbidden("you cannot disable your own account (another admin can)", code="self")
    with conn.cursor() as cur:
        cur.execute("UPDATE users SET disabled_at=%s WHERE id=%s", (time.time() if disabled else None, user.id))
    conn.commit()
    return by_name(conn, name)


def reset_password(conn, name: str) -> tuple[User, str]:
    """A new generated password for `name`; returns (user, password)."""
    password = secrets.token_urlsafe(18)
    return set_password(conn, name, password), password


def set_password(conn, name: str, password: str) -> User:
    """Give `name` this password: the old one stops working, and so do browser
    sessions opened before (a reset is often after a leak). Tokens stay: revoke those."""
    if len(password) < MIN_PASSWORD:
        raise BadRequest(f"a password has at least {MIN_PASSWORD} characters", code="bad_param")
    user = by_name(conn, name)
    with conn.cursor() as cur:
        cur.execute("UPDATE users SET password_hash=%s, password_changed_at=%s WHERE id=%s",
                    (hash_password(password), time.time(), user.id))
    conn.commit()
    return by_name(conn, name)


def by_password(conn, name: str, password: str) -> User | None:
    """The user if the password is theirs, else None; a disabled account is refused (403)."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT {_USER_COLUMNS}, u.password_hash FROM users u WHERE u.name=%s", (name,))
        row = cur.fetchone()
    conn.commit()
    # An unknown name costs the same scrypt as a wrong password, so timing does not tell which.
    if not verify_password(password, row["password_hash"] if row else _dummy_hash()) or not row:
        return None
    user = _user(row)
    if user.disabled:
        raise Forbidden("this account is disabled: ask an admin", code="disabled")
    return user


USER_ACTIONS = ("disable", "enable", "reset-password")


def create(conn, name: str, admin: bool = False) -> dict:
    """A new user as the API answers it: the user and its generated password (shown once)."""
    user, password = add_user(conn, name, admin)
    return {"user": user_view(user), "password": password}


def change(conn, name: str, action: str, by: User | None = None) -> dict:
    """One of USER_ACTIONS on `name`, answered as the API does (with the new password for a reset)."""
    if action == "reset-password":
        user, password = reset_password(conn, name)
        return {"user": user_view(user), "password": password}
    if action not in USER_ACTIONS:
        raise BadRequest(f"no user action {action}: use {', '.join(USER_ACTIONS)}", code="bad_param")
    return {"user": user_view(set_disabled(conn, name, action == "disable", by=by))}


# ---------------------------------------------------------------- tokens

def add_token(conn, user: User, name: str = "token", scope: str = "user",
              days: float | None = TOKEN_DAYS) -> tuple[Token, str]:
    """A new token for `user`, valid `days` (None: until revoked); returns (token, secret)."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_TOKEN_NAME:
        raise BadRequest(f"a token's name is 1 to {MAX_TOKEN_NAME} characters", code="bad_param")
    if scope not in SCOPES:
        raise BadRequest(f"a token's scope is one of {', '.join(SCOPES)}", code="bad_param")
    if scope != "user" and not user.admin:
        raise Forbidden(f"only an admin may create a {scope} token", code="scope")
    if days is not None and not 0 < days <= 3660:
        raise BadRequest("a token lives 1 to 3660 days, or until revoked (no expiry)", code="bad_param")
    secret = "pink_" + secrets.token_urlsafe(32)
    now = time.time()
    expires = now + days * 86400 if days is not None else None
    with conn.cursor() as cur:
        cur.execute("DELETE FROM tokens WHERE user_id=%s AND expires_at < %s", (user.id, now))
        cur.execute("INSERT INTO tokens (user_id, token_hash, name, scope, created_at, expires_at) "
                    "VALUES (%s,%s,%s,%s,%s,%s)", (user.id, _token_hash(secret), name.strip(), scope, now, expires))
        token = Token(id=cur.lastrowid, user_id=user.id, name=name.strip(), scope=scope, created_at=now,
                      last_used_at=None, expires_at=expires)
    conn.commit()
    return token, secret


def list_tokens(conn, user: User) -> list[Token]:
    """The user's live tokens, newest first. Expired ones are deleted on the way.

    A user holds a handful of tokens (each is made by hand or by a login
    that replaces an expired one), so this list needs no paging.
    """
    now = time.time()
    with conn.cursor() as cur:
        cur.execute("DELETE FROM tokens WHERE user_id=%s AND expires_at < %s", (user.id, now))
        cur.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens t WHERE t.user_id=%s ORDER BY t.id DESC", (user.id,))
        rows = cur.fetchall()
    conn.commit()
    return [_token(r) for r in rows]


def revoke_token(conn, user: User, token_id: int) -> None:
    """Delete one of the user's tokens; another user's token answers 404 like a missing one."""
    with conn.cursor() as cur:
        cur.execute("DELETE FROM tokens WHERE id=%s AND user_id=%s", (token_id, user.id))
        gone = cur.rowcount
    conn.commit()
    if not gone:
        raise NotFound(f"you have no token {token_id}", code="unknown_token")


def by_token(conn, secret: str) -> tuple[User, Token] | None:
    """The live token `secret` and its enabled user, or None."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens t JOIN users u ON u.id=t.user_id "
                    "WHERE t.token_hash=%s AND (t.expires_at IS NULL OR t.expires_at > %s) "
                    "AND u.disabled_at IS NULL", (_token_hash(secret), time.time()))
        row = cur.fetchone()
        if row:
            cur.execute(f"SELECT {_USER_COLUMNS} FROM users u WHERE u.id=%s", (row["user_id"],))
            user_row = cur.fetchone()
    conn.commit()
    if not row or not user_row:
        return None
    return _user(user_row), _token(row)


def touch(conn, user: User, token: Token | None = None) -> None:
    """Record a use (a login, or a token's first use in a while) for the account pages."""
    now = time.time()
    with conn.cursor() as cur:
        cur.execute("UPDATE users SET last_used_at=%s WHERE id=%s", (now, user.id))
        if token is not None:
            cur.execute("UPDATE tokens SET last_used_at=%s WHERE id=%s", (now, token.id))
    conn.commit()


# ---------------------------------------------------------------- on a server machine

@contextlib.contextmanager
def database(config):
    """A connection with a current schema, for `pink admin` run where the config is."""
    conn = db.connect(config.db)
    try:
        db.init_schema(conn)
        yield conn
    finally:
        conn.close()


def create_user(config, name: str, admin: bool = False) -> dict:
    """A user, its password and a first token (`pink admin user create`, tests)."""
    with database(config) as conn:
        user, password = add_user(conn, name, admin)
        _, secret = add_token(conn, user, name="created with the account")
    return {"user": user_view(user), "name": name, "admin": admin, "password": password, "token": secret}
