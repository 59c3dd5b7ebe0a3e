"""Users and API tokens, stored in MariaDB (`users`, `tokens`).

Passwords are scrypt hashes; tokens are random and stored only as SHA-256,
so a database dump reveals neither. Nothing here has a default credential:
`pink admin create-user` generates both and shows them once. Called by the
web app's authentication and by `pink admin`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from pink import db
from pink.errors import Conflict, NotFound

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


@dataclass(frozen=True)
class User:
    id: int
    name: str
    admin: bool


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    return "scrypt$" + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), **_SCRYPT)
    return hmac.compare_digest(candidate, base64.b64decode(digest))


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _user(row) -> User:
    return User(id=row["id"], name=row["name"], admin=bool(row["is_admin"]))


def add_user(conn, name: str, admin: bool = False) -> tuple[User, str]:
    """Create a user with a generated password; returns (user, password)."""
    password = secrets.token_urlsafe(18)
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM users WHERE name=%s", (name,))
        if cur.fetchone():
            raise Conflict(f"user {name} already exists", code="user_exists")
        cur.execute("INSERT INTO users (name, password_hash, is_admin, created_at) VALUES (%s,%s,%s,%s)",
                    (name, hash_password(password), admin, time.time()))
        user = User(id=cur.lastrowid, name=name, admin=admin)
    conn.commit()
    return user, password


def add_token(conn, user: User) -> str:
    token = "pink_" + secrets.token_urlsafe(32)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO tokens (user_id, token_hash, created_at) VALUES (%s,%s,%s)",
                    (user.id, _token_hash(token), time.time()))
    conn.commit()
    return token


def by_name(conn, name: str) -> User:
    with conn.cursor() as cur:
        cur.execute("SELECT id, name, is_admin FROM users WHERE name=%s", (name,))
        row = cur.fetchone()
    if not row:
        raise NotFound(f"no user named {name}")
    return _user(row)


def by_token(conn, token: str) -> User | None:
    with conn.cursor() as cur:
        cur.execute("SELECT u.id, u.name, u.is_admin FROM tokens t JOIN users u ON u.id=t.user_id "
                    "WHERE t.token_hash=%s", (_token_hash(token),))
        row = cur.fetchone()
    conn.commit()
    return _user(row) if row else None


def by_password(conn, name: str, password: str) -> User | None:
    with conn.cursor() as cur:
        cur.execute("SELECT id, name, is_admin, password_hash FROM users WHERE name=%s", (name,))
        row = cur.fetchone()
    conn.commit()
    if not row or not verify_password(password, row["password_hash"]):
        return None
    return _user(row)


def create_user(config, name: str, admin: bool = False) -> dict:
    """`pink admin create-user`: a user, its password and a first token."""
    conn = db.connect(config.db)
    try:
        db.init_schema(conn)
        user, password = add_user(conn, name, admin)
        token = add_token(conn, user)
    finally:
        conn.close()
    return {"name": name, "admin": admin, "password": password, "token": token}


def create_token(config, name: str) -> str:
    """`pink admin create-token`: another token for an existing user."""
    conn = db.connect(config.db)
    try:
        return add_token(conn, by_name(conn, name))
    finally:
        conn.close()
