"""Blob upload sessions on a web node: which image a client is sending, and
what it has proved so far.

A session is a directory `<blob_root>/uploads/<user>/<id>/`: `session.json`,
written once when the client sends its manifest (the user, the image's
recipe, which blobs the store lacked and the challenges for those it had),
and one marker file per event after that: `done-<digest>` when this
session's upload of a blob completed, `challenge-<digest>.json` when a blob
it was sending turned up in the store meanwhile. Files, not a record
rewritten in place, so parallel blob uploads of one session never race.
A directory per user, so counting a user's open sessions (`[limits]
upload_sessions_per_user`) and the bytes they will hold reads that user's
few sessions, never everyone's. The web API (`web.blob_uploads`) drives
sessions; the sweep keeps their blobs (`in_use`) and removes sessions
nobody committed (`expire`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass

from pink.rebuilt_archive import archive_size
from pink.recipes import Recipe, image_blobs
from pink.errors import NotFound, TooManyRequests

SESSIONS = "uploads"
SESSION_LIFE = 24 * 3600.0  # seconds a session may wait for its commit
_ID = re.compile(r"([A-Za-z0-9_.-]{1,64})\.[0-9a-f]{32}")  # <web host>.<random>: the router sends it home


@dataclass(frozen=True)
class Session:
    root: str  # this session's directory
    id: str
    user: str
    recipe: Recipe
    layout: str
    challenges: dict  # digest -> challenge, for blobs the store held when the session began
    created: float

    def _marker(self, kind: str, digest: str) -> str:
        return os.path.join(self.root, f"{kind}-{digest}")

    def mark_done(self, digest: str) -> None:
        """This session uploaded `digest` whole (the store verified it)."""
        with open(self._marker("done", digest), "w"):
            pass

    def done(self, digest: str) -> bool:
        return os.path.exists(self._marker("done", digest))

    def add_challenge(self, digest: str, challenge: dict) -> None:
        """A blob that arrived from elsewhere while this session sent it: prove it instead."""
        path = self._marker("challenge", digest) + ".json"
        with open(path + ".tmp", "w") as fh:
            json.dump(challenge, fh)
        os.replace(path + ".tmp", path)

    def challenge(self, digest: str) -> dict | None:
        try:
            with open(self._marker("challenge", digest) + ".json") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return self.challenges.get(digest)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _dir(blob_root: str, user: str | None = None) -> str:
    sessions = os.path.join(blob_root, SESSIONS)
    return sessions if user is None else os.path.join(sessions, user)


def check_room(blob_root: str, user: str, limit: int) -> int:
    """Refuse (429) a new session when `user` has `limit` open (`[limits]
    upload_sessions_per_user`, 0: no limit); else the bytes the images of the
    open ones will hold, which count against `upload_bytes_per_user` with the
    image being begun: open sessions may not hold more than live tasks may.
    Sessions opened before per-user folders are not counted: finding a user's
    among them reads every user's, and they expire within a day."""
    sessions = _open(blob_root, user)
    if limit and len(sessions) >= limit:
        raise TooManyRequests(f"user limit: {len(sessions)} upload sessions open on this web node (limit "
                              f"upload_sessions_per_user = {limit}); let one finish, or abandon one "
                              "(DELETE /api/v1/uploads/<id>)", code="uploads_open")
    return sum(archive_size(Recipe.from_dict(data["recipe"])) for _, data in sessions)


def create(blob_root: str, host: str, user: str, recipe: Recipe, layout: str, challenges: dict) -> Session:
    """A new session on web host `host`, whose name starts its id (`host_of`).
    Callers check the user's room first (`check_room`)."""
    session_id = f"{host}.{secrets.token_hex(16)}"
    root = os.path.join(_dir(blob_root, user), session_id)
    os.makedirs(root, mode=0o700)
    data = {"user": user, "recipe": recipe.to_dict(), "layout": layout, "challenges": challenges,
            "created": time.time()}
    with open(os.path.join(root, "session.json.tmp"), "w") as fh:
        json.dump(data, fh)
    os.replace(os.path.join(root, "session.json.tmp"), os.path.join(root, "session.json"))
    return _session(root, session_id, data)


def host_of(session_id: str) -> str | None:
    """The web host an upload id belongs to, or None for a malformed id."""
    match = _ID.fullmatch(session_id or "")
    return match.group(1) if match else None


def load(blob_root: str, session_id: str, user: str) -> Session:
    """The user's session `session_id`; 404 for another user's, like a missing one.

    A session opened before per-user folders lies at `uploads/<id>`: it is
    looked up there too, so an upgrade does not lose it (they expire within a day).
    """
    data = root = None
    if _ID.fullmatch(session_id or ""):
        for root in (os.path.join(_dir(blob_root, user), session_id), os.path.join(_dir(blob_root), session_id)):
            if (data := _data(root)) is not None:
                break
    if data is None or data.get("user") != user or time.time() - data["created"] > SESSION_LIFE:
        raise NotFound(f"no upload {session_id} (uploads not committed within a day are dropped): "
                       "submit again", code="unknown_upload")
    return _session(root, session_id, data)


def _data(root: str) -> dict | None:
    try:
        with open(os.path.join(root, "session.json")) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _session(root: str, session_id: str, data: dict) -> Session:
    return Session(root=root, id=session_id, user=data["user"], recipe=Recipe.from_dict(data["recipe"]),
                   layout=data["layout"], challenges=data["challenges"], created=data["created"])


def in_use(blob_root: str) -> set[str]:
    """Blobs of sessions still open: an upload may be about to commit them."""
    return {blob for _, data in _all(blob_root) if time.time() - data["created"] <= SESSION_LIFE
            for blob in image_blobs(data)}


def expire(blob_root: str) -> int:
    """Remove sessions older than SESSION_LIFE; returns how many."""
    gone = 0
    for root, data in _all(blob_root):
        if time.time() - data["created"] > SESSION_LIFE:
            shutil.rmtree(root, ignore_errors=True)
            gone += 1
    return gone


def _open(blob_root: str, user: str) -> list[tuple[str, dict]]:
    """(directory, data) of `user`'s sessions not yet expired."""
    now = time.time()
    found = (_read(entry) for entry in _entries(_dir(blob_root, user)))
    return [(root, data) for root, data in filter(None, found)
            if data.get("user") == user and now - data["created"] <= SESSION_LIFE]


def _all(blob_root: str):
    """(directory, data) of every session of every user: for the sweep only."""
    for entry in _entries(_dir(blob_root)):
        legacy = os.path.exists(os.path.join(entry.path, "session.json"))  # from before per-user folders
        for session in [entry] if legacy else _entries(entry.path):
            if (found := _read(session)) is not None:
                yield found


def _entries(folder: str) -> list[os.DirEntry]:
    try:
        return [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _read(entry: os.DirEntry) -> tuple[str, dict] | None:
    try:
        with open(os.path.join(entry.path, "session.json")) as fh:
            return entry.path, json.load(fh)
    except (OSError, ValueError):
        if time.time() - entry.stat().st_mtime > SESSION_LIFE:  # a session that never got its file
            shutil.rmtree(entry.path, ignore_errors=True)
        return None
