"""The PINK REST API (`/api/v1`) as a Python class, usable without click.

`Client(url, token, ca)` wraps one `requests.Session`; every transport and
HTTP error is translated to a `pink.errors.PinkError` at this one boundary,
carrying the server's `{"error", "message"}`. Uploads and downloads stream
from and to disk in chunks (constant memory) and report progress through a
plain callback `progress(done, total)`. Called by the `pink` commands.

Transient failures (no connection, 502/503/504 from a router or a web node
in failover, 429 with Retry-After) are retried here, with exponential
backoff and jitter, up to `TRIES` tries, each announced on stderr. Only
requests that cannot do a thing twice are replayed after their bytes left:
reads, and the requests that create a task, which carry one
`Idempotency-Key` per submit so the server answers a retry with the task
the first try made. Anything else is retried only when the connection was
never made. This is a loop of our own rather than urllib3's `Retry` on the
session's adapter: the policy depends on each request's headers, and a
streamed upload must be rewound (with its progress) before it is sent again.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import random
import re
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote

import requests
from urllib3.exceptions import NewConnectionError

from pink import errors
from pink_cli import layer_upload
from pink.errors import PinkError
from pink.tasks import FINAL_NAMES

API = "/api/v1"
CHUNK = 1 << 20  # bytes read from disk / network per step of a transfer
CONNECT_TIMEOUT = 10.0  # seconds to open a connection to the server
LONG_POLL = 20.0  # seconds the server may hold a task request until its state changes
READ_TIMEOUT = 120.0  # seconds the server may stay silent on an ordinary request
UPLOAD_READ_TIMEOUT = 1800.0  # seconds for the server to validate an archive after its last byte
DEVICE_COOKIE = "pink_device"  # web/throttle.py: the signed login-device cookie
NOT_LOGGED_IN = "not logged in or token rejected: run `pink login`"
TRIES = 5  # tries of one request through transient failures (the first included)
BACKOFF = 0.5  # seconds before the first retry; doubled for each next one, with jitter
MAX_BACKOFF = 8.0  # seconds: the longest wait between two tries of our own choosing
MAX_RETRY_AFTER = 60.0  # seconds: a server asking to wait longer is not retried
TRANSIENT = {502, 503, 504}  # statuses a retry may get past (429 too, with Retry-After)
REPLAYABLE = {"GET", "HEAD"}  # methods sent again even after the request left
IDEMPOTENCY_KEY = "Idempotency-Key"  # the header that makes a task-creating POST replayable

Progress = Callable[[int, "int | None"], None]

_BY_STATUS = {400: errors.BadRequest, 401: errors.Unauthorized, 403: errors.Forbidden,
              404: errors.NotFound, 409: errors.Conflict, 413: errors.TooLarge,
              502: errors.Unavailable, 503: errors.Unavailable, 504: errors.Unavailable}


def normalize_url(url: str) -> str:
    """`host:8443/` -> `https://host:8443`: TLS unless the user says otherwise."""
    url = url.strip().rstrip("/")
    if url and "://" not in url:
        url = "https://" + url
    return url


def is_final(task: dict) -> bool:
    return task.get("state") in FINAL_NAMES


def error_from_response(resp: requests.Response, auth_hint: bool = True) -> PinkError:
    """The PinkError the server meant: its JSON `{"error", "message"}` when it sent one."""
    code, message = None, None
    try:
        body = resp.json()
        if isinstance(body, dict):
            code, message = body.get("error"), body.get("message")
    except ValueError:
        pass
    if resp.status_code == 401 and auth_hint:
        message = NOT_LOGGED_IN
    if not message:
        message = f"server answered {resp.status_code} {resp.reason or ''}".strip()
    cls = _BY_STATUS.get(resp.status_code, PinkError)
    return cls(message, code=code, status=resp.status_code)


def filename_from_disposition(header: str | None) -> str | None:
    """The bare file name in a Content-Disposition header, never a path."""
    if not header:
        return None
    match = re.search(r"filename\*\s*=\s*[^']*'[^']*'([^;]+)", header)
    if match:
        name = unquote(match.group(1).strip().strip('"'))
    else:
        match = re.search(r'filename\s*=\s*"([^"]*)"|filename\s*=\s*([^;]+)', header)
        if not match:
            return None
        name = (match.group(1) or match.group(2) or "").strip()
    name = os.path.basename(name.replace("\\", "/"))
    return name if name not in ("", ".", "..") else None


class ProgressFile:
    """A file opened for upload that reports each read: requests sends it as a
    body with Content-Length (from `__len__`) instead of chunked encoding."""

    def __init__(self, path: str | os.PathLike, progress: Progress | None = None):
        self._fh = open(path, "rb")
        self._size = os.fstat(self._fh.fileno()).st_size
        self._done = 0
        self._progress = progress

    def __len__(self) -> int:
        return self._size

    def rewind(self) -> None:
        """Back to the first byte, for a retry: progress starts over with it."""
        self._fh.seek(0)
        self._done = 0

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(CHUNK if size is None or size < 0 else size)
        self._done += len(data)
        if self._progress and data:
            self._progress(self._done, self._size)
        return data

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "ProgressFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Client:
    """One PINK server, one user's token. Methods return the API's JSON (dicts)."""

    def __init__(self, url: str, token: str | None = None, ca: str | None = None,
                 session: requests.Session | None = None):
        self.url = normalize_url(url or "")
        if not self.url:
            raise errors.ConfigError("no server URL: run `pink login --url URL` or set PINK_URL")
        if ca and not os.path.isfile(ca):
            raise errors.ConfigError(f"CA file {ca} does not exist (check --ca / PINK_CA)")
        self.token = token or ""
        self.ca = ca or ""
        self.device = ""  # the login-device cookie, after a password login
        self.on_retry: Callable[[str], None] = _to_stderr
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = "pink-cli"
        if self.token:
            self.session.headers["Authorization"] = f"Bearer {self.token}"

    # -- transport ---------------------------------------------------------

    @contextlib.contextmanager
    def _transport(self):
        """Turn every requests failure into a PinkError that says what to check."""
        try:
            yield
        except requests.exceptions.SSLError as exc:
            trust = f"the CA file {self.ca}" if self.ca else "the system's CAs"
            raise errors.Unavailable(
                f"TLS verification of {self.url} failed against {trust}: check --ca / PINK_CA "
                f"names the CA that signed the server's certificate ({_reason(exc)})",
                code="tls_failed") from None
        except requests.exceptions.ConnectionError as exc:
            raise errors.Unavailable(
                f"cannot reach the PINK server at {self.url}: check the URL and that pink-web "
                f"is running and reachable ({_reason(exc)})", code="unreachable") from None
        except requests.exceptions.Timeout:
            raise errors.Unavailable(f"the PINK server at {self.url} did not answer in time",
                                     code="timeout") from None
        except requests.exceptions.RequestException as exc:
            raise errors.Unavailable(f"request to {self.url} failed: {_reason(exc)}",
                                     code="transport") from None

    def _request(self, method: str, path: str, *, expect=(200,), auth_hint: bool = True,
                 timeout=None, stream: bool = False, **kwargs) -> requests.Response:
        """One API request, retried through transient failures (see the module's docstring)."""
        replayable = method in REPLAYABLE or IDEMPOTENCY_KEY in (kwargs.get("headers") or {})
        for attempt in range(1, TRIES + 1):
            if attempt > 1 and hasattr(kwargs.get("data"), "rewind"):
                kwargs["data"].rewind()
            try:
                # verify per request: requests lets $REQUESTS_CA_BUNDLE override session.verify
                resp = self.session.request(method, self.url + API + path, stream=stream,
                                            verify=self.ca or True,
                                            timeout=timeout or (CONNECT_TIMEOUT, READ_TIMEOUT), **kwargs)
            except requests.exceptions.RequestException as exc:
                if attempt == TRIES or not _retryable(exc, replayable):
                    self._raise(exc, attempt)
                why, wait = _reason(exc), _backoff(attempt)
            else:
                wait = _retry_wait(resp, attempt) if replayable and attempt < TRIES else None
                if wait is None:
                    break
                why = f"the server answered {resp.status_code} {resp.reason or ''}".strip()
                resp.close()
            self.on_retry(f"{why}: retrying {method} {API}{path} in {wait:.1f}s (try {attempt + 1} of {TRIES})")
            time.sleep(wait)
        if resp.status_code not in expect:
            try:
                err = error_from_response(resp, auth_hint)
                raise _gave_up(err, attempt) if resp.status_code in TRANSIENT | {429} else err
            finally:
                resp.close()
        return resp

    def _raise(self, exc: requests.exceptions.RequestException, attempt: int):
        """Raise `exc` as the PinkError that says what to check (and how often it was tried)."""
        try:
            with self._transport():
                raise exc
        except PinkError as translated:
            raise _gave_up(translated, attempt) from None

    def _json(self, method: str, path: str, key: str | None = None, **kwargs):
        resp = self._request(method, path, **kwargs)
        try:
            body = resp.json()
        except ValueError:
            raise PinkError(f"{self.url}{API}{path} did not answer JSON: is the URL a PINK server?",
                            code="bad_response") from None
        if key is None:
            return body
        if not isinstance(body, dict) or key not in body:
            raise PinkError(f"{self.url}{API}{path} answered without '{key}'", code="bad_response")
        return body[key]

    # -- account -------------------------------------------------------------

    def health(self) -> dict:
        return self._json("GET", "/health")

    def login(self, username: str, password: str, device: str = "") -> dict:
        """Exchange a password for a token: returns `{"token", "user": {"name", "admin"}}`.
        The token is also adopted by this client. `device` is the login-device
        cookie an earlier login to this same server got (sent back, so this CLI
        is a known device); the one the server gives now is left in `self.device`.
        Sent and read by name, not through the cookie jar, which files cookies
        of `localhost` under another name."""
        headers = {"Cookie": f"{DEVICE_COOKIE}={device}"} if device else {}
        resp = self._request("POST", "/login", auth_hint=False, headers=headers,
                             json={"username": username, "password": password,
                                   "token_name": f"pink login on {socket.gethostname()}"})
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not body.get("token"):
            raise PinkError("the server's login answer carries no token", code="bad_response")
        self.token = body["token"]
        self.session.headers["Authorization"] = f"Bearer {self.token}"
        self.device = resp.cookies.get(DEVICE_COOKIE) or device
        return body

    def check_token(self) -> None:
        """Raise Unauthorized unless the server accepts this client's token."""
        if not self.token:
            raise errors.Unauthorized(NOT_LOGGED_IN)
        self._request("GET", "/tasks").close()

    def me(self) -> dict:
        return self._json("GET", "/me")

    def change_password(self, current: str, new: str) -> dict:
        return self._json("POST", "/me/password", json={"current": current, "new": new})

    def tokens(self) -> list[dict]:
        return self._json("GET", "/tokens", "tokens")

    def create_token(self, name: str, days: float | None, scope: str = "user") -> dict:
        """A new token: `{"token": {...}, "secret"}`; the secret is shown only in this answer."""
        return self._json("POST", "/tokens", json={"name": name, "expires_days": days, "scope": scope},
                          expect=(201,))

    def revoke_token(self, token_id: int) -> None:
        self._request("DELETE", f"/tokens/{int(token_id)}").close()

    def notifications(self) -> dict:
        """Your notification settings: webhook, email, on_running, secret, email_enabled."""
        return self._json("GET", "/me/notifications", "notifications")

    def set_notifications(self, **changes) -> dict:
        """Set the fields given (webhook, email: None clears one; on_running); the others are kept."""
        return self._json("PUT", "/me/notifications", "notifications", json=changes)

    def clear_notifications(self) -> None:
        self._request("DELETE", "/me/notifications").close()

    def rotate_notification_secret(self) -> dict:
        return self._json("POST", "/me/notifications/secret", "notifications")

    def users(self) -> Iterator[dict]:
        """Every user (admins), page by page."""
        after = ""
        while after is not None:
            body = self._json("GET", "/users", params={"after": after})
            yield from body.get("users") or []
            after = body.get("next")

    def create_user(self, name: str, admin: bool = False) -> dict:
        return self._json("POST", "/users", json={"name": name, "admin": admin}, expect=(201,))

    def user_action(self, name: str, action: str) -> dict:
        return self._json("POST", f"/users/{_id(name, 'user name')}/{action}")

    # -- tasks ---------------------------------------------------------------

    def submit(self, archive: str | os.PathLike, *, name: str | None = None,
               cmd: str | None = None, entrypoint: str | None = None,
               env: dict[str, str] | list[str] | None = None, gpus: int | None = None,
               timeout: int | None = None, output: str | None = None,
               compression: str | None = None, progress: Progress | None = None,
               on_plan: Callable[[int, int, int], None] | None = None,
               notify: str | None = None, notify_running: bool | None = None, sweep: dict | None = None) -> dict:
        """Create a task from a `docker save` archive on disk; returns the task (with
        `sweep`, a spec as `pink.sweeps.parse` reads it: index 0 of the sweep made).

        Only the layers the server lacks are sent (`pink_cli.layer_upload`;
        `on_plan` hears how many); a server without layer uploads gets the
        whole archive. `cmd` and `entrypoint` are shell words (the server
        splits them).
        """
        params = submit_params(name=name, cmd=cmd, entrypoint=entrypoint, env=env, gpus=gpus,
                               timeout=timeout, output=output, compression=compression, notify=notify,
                               notify_running=notify_running)
        key = str(uuid.uuid4())  # one per submit: every retry of it names the same task
        try:
            return layer_upload.submit(self, archive, params, progress, on_plan, idempotency_key=key, sweep=sweep)
        except layer_upload.NoLayerUploads:
            pass
        if sweep:  # the body is the archive: the sweep goes in the query (small ones only)
            params.append(("sweep", json.dumps(sweep, separators=(",", ":"))))
        with ProgressFile(archive, progress) as body:
            return self._json("POST", "/tasks", "task", params=params, data=body,
                              headers={"Content-Type": "application/x-tar", IDEMPOTENCY_KEY: key},
                              expect=(200, 201), timeout=(CONNECT_TIMEOUT, UPLOAD_READ_TIMEOUT))

    def page(self, *, limit: int | None = None, cursor: str | None = None, state: str | None = None,
             name: str | None = None, since: str | None = None, until: str | None = None,
             user: str | None = None) -> tuple[list[dict], str | None]:
        """One page of tasks, newest first, and the cursor of the next (None at the end)."""
        params = {k: v for k, v in (("limit", limit), ("cursor", cursor), ("state", state), ("name", name),
                                    ("since", since), ("until", until), ("user", user)) if v is not None}
        body = self._json("GET", "/tasks", params=params)
        if not isinstance(body, dict) or "tasks" not in body:
            raise PinkError(f"{self.url}{API}/tasks answered without 'tasks'", code="bad_response")
        return body["tasks"], body.get("next")

    def list(self, **filters) -> Iterator[dict]:
        """Every task matching `filters`, newest first, page after page."""
        cursor = None
        while True:
            tasks, cursor = self.page(cursor=cursor, **filters)
            yield from tasks
            if not cursor:
                return

    def usage(self, since: str | None = None, until: str | None = None,
              user: str | None = None) -> dict:
        """`{"usage": [per user], "since", "until", "limits": {name: {"limit", "used", "caps"}}}`."""
        params = {k: v for k, v in (("since", since), ("until", until), ("user", user)) if v}
        return self._json("GET", "/usage", params=params)

    def get(self, task_id: str, seen: str | None = None, wait: float = 0) -> dict:
        """The task; with `seen` ("state:attempt"), the server answers when it differs or after `wait` s."""
        params = {"seen": seen, "wait": wait} if seen else None
        timeout = (CONNECT_TIMEOUT, READ_TIMEOUT + wait)
        return self._json("GET", f"/tasks/{_id(task_id)}", "task", params=params, timeout=timeout)

    def cancel(self, task_id: str) -> dict:
        """Cancel a live task (`{"task": ...}`, 202) or delete a finished one (`{"deleted": id}`)."""
        return self._json("DELETE", f"/tasks/{_id(task_id)}", expect=(200, 202))

    def logs(self, task_id: str, follow: bool = False) -> Iterator[bytes]:
        """The task's log as byte chunks; with `follow`, until the task is final.

        The server ends a follow after `log_follow_seconds` even while the
        task runs; it is then resumed where it stopped, so the chunks are the
        log's bytes exactly once."""
        place = FollowedLog()
        while True:
            resp = self._request("GET", f"/tasks/{_id(task_id)}/logs", stream=True,
                                 params=place.params() if follow else None,
                                 timeout=(CONNECT_TIMEOUT, None if follow else READ_TIMEOUT))
            with resp, self._transport():
                place.start(resp.headers.get(LOG_ATTEMPT_HEADER))
                for chunk in resp.iter_content(chunk_size=None):
                    if chunk:
                        place.advance(chunk)
                        yield chunk
            if not follow or is_final(self.get(task_id)):
                return

    def wait(self, task_id: str, interval: float = 0.5, max_interval: float = 1.0,
             on_change: Callable[[dict], None] | None = None, patience: float = 60.0) -> dict:
        """Long-poll until the task is final and return it, calling `on_change` on each new state.

        The server being briefly unreachable (a web node failing over) is
        tolerated for `patience` seconds: the task lives on in the cluster.
        """
        seen, delay, down_since = None, interval, None
        while True:
            try:
                task = self.get(task_id, seen=seen and f"{seen[0]}:{seen[1]}", wait=LONG_POLL)
                down_since = None
            except errors.Unavailable:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > patience:
                    raise
                time.sleep(max_interval)
                continue
            now = (task.get("state"), task.get("attempt"))
            if on_change and now != seen:
                on_change(task)
            if is_final(task):
                return task
            if now == seen:  # the long poll ran out (or an old server ignored it): back off
                time.sleep(delay)
                delay = min(max_interval, delay * 1.5)
            seen = now

    def download(self, task_id: str, dest: str | os.PathLike | None = None,
                 directory: str | os.PathLike = ".", progress: Progress | None = None) -> Path:
        """Save the task's output to `dest` (default: the server's file name in
        `directory`), resuming from `dest.part` when an earlier try left one."""
        path = f"/tasks/{_id(task_id)}/output"
        resp = self._request("GET", path, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        target = Path(dest) if dest else Path(directory) / (
            filename_from_disposition(resp.headers.get("Content-Disposition")) or f"{task_id}.tar")
        part = target.with_name(target.name + ".part")
        offset = part.stat().st_size if part.exists() else 0
        if offset:
            resp.close()
            resp = self._request("GET", path, stream=True, expect=(200, 206, 416),
                                 headers={"Range": f"bytes={offset}-"},
                                 timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
            if resp.status_code == 416:
                resp.close()
                if resp.headers.get("Content-Range") == f"bytes */{offset}":
                    os.replace(part, target)  # complete already; only the rename was missed
                    return target
                offset = 0  # the part is not a prefix of this output: start over
                resp = self._request("GET", path, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
            elif resp.status_code == 200:  # the server ignored the range
                offset = 0
        with resp:
            _save_stream(resp, part, offset, progress, self._transport)
        os.replace(part, target)
        return target

    # -- nodes ---------------------------------------------------------------

    def nodes(self) -> list[dict]:
        return self._json("GET", "/nodes", "nodes")

    def forget_node(self, name: str) -> list[str]:
        return self._json("DELETE", f"/nodes/{_id(name, 'node name')}", "forgotten")

    def node_action(self, name: str, action: str, now: bool = False) -> dict:
        """drain / stop / resume a runner (admins); returns {"node", "moved"}."""
        params = {"now": "1"} if now else None
        return self._json("POST", f"/nodes/{_id(name, 'node name')}/{action}", params=params)


def submit_params(*, name=None, cmd=None, entrypoint=None, env=None, gpus=None, timeout=None,
                  output=None, compression=None, notify=None, notify_running=None) -> list[tuple[str, str]]:
    """The query string of `POST /tasks`: only what the user set, `env` repeated."""
    running = None if notify_running is None else int(bool(notify_running))
    params = [(key, str(value)) for key, value in
              (("name", name), ("cmd", cmd), ("entrypoint", entrypoint), ("gpus", gpus),
               ("timeout", timeout), ("output", output), ("compression", compression),
               ("notify", notify), ("notify_running", running))
              if value not in (None, "")]
    items = env.items() if isinstance(env, dict) else (item.partition("=")[::2] for item in env or ())
    params += [("env", f"{key}={value}") for key, value in items]
    return params


def _save_stream(resp: requests.Response, part: Path, offset: int, progress: Progress | None,
                 transport) -> None:
    length = resp.headers.get("Content-Length")
    total = offset + int(length) if length and length.isdigit() else None
    done = offset
    if progress:
        progress(done, total)
    with open(part, "ab" if offset else "wb") as fh, transport():
        for chunk in resp.iter_content(chunk_size=CHUNK):
            fh.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    if total is not None and done != total:
        raise errors.Unavailable(f"download stopped at {done} of {total} bytes; run the same "
                                 f"command again to resume from {part}", code="incomplete")


def _id(task_id: str, what: str = "task id") -> str:
    """Ids and names are path segments: refuse anything that would change the path."""
    if not task_id or not re.fullmatch(r"[A-Za-z0-9_.-]+", task_id) or task_id in (".", ".."):
        raise errors.BadRequest(f"not a {what}: {task_id!r}", code="bad_id")
    return task_id


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _retryable(exc: requests.exceptions.RequestException, replayable: bool) -> bool:
    """A failure worth another try: any connection failure or timeout for a replayable
    request, else only a connection that was never made (nothing reached the server)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return False  # a certificate does not fix itself
    if not isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return False
    if replayable or isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    return isinstance(getattr(exc.args[0] if exc.args else None, "reason", None), NewConnectionError)


def _backoff(attempt: int) -> float:
    """Exponential, with jitter so that clients cut off together do not come back together."""
    ceiling = min(MAX_BACKOFF, BACKOFF * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def _retry_wait(resp: requests.Response, attempt: int) -> float | None:
    """Seconds to wait before trying `resp`'s request again, or None to take the answer."""
    after = _retry_after(resp.headers.get("Retry-After"))
    if resp.status_code == 429:
        return after if after is not None and after <= MAX_RETRY_AFTER else None
    if resp.status_code in TRANSIENT:
        return max(after or 0.0, _backoff(attempt)) if (after or 0) <= MAX_RETRY_AFTER else None
    return None


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _gave_up(err: PinkError, attempt: int) -> PinkError:
    """`err`, saying it is the last of several tries when it was."""
    if attempt == 1:
        return err
    return type(err)(f"{err.message} (gave up after {attempt} tries)", code=err.code, status=err.status)


def _reason(exc: Exception) -> str:
    """The innermost, most specific words of a requests/urllib3 error chain."""
    text = re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(exc))
    for pattern in (r"\[SSL[^\]]*\][^')\"]*", r"\[Errno -?\d+\][^')\"]*"):
        match = re.search(pattern, text)
        if match:
            return match.group(0).strip()
    return text[:200]


LOG_ATTEMPT_HEADER = "X-Pink-Log-Attempt"  # web/api.py: the attempt a followed log starts in
NEXT_ATTEMPT = re.compile(rb"\n\[pink: attempt (\d+) started on [^\]\n]*\]\n")  # web/api.py _next_attempt
MARKER_MAX = 256  # bytes of the stream kept to find a line between attempts split over chunks


class FollowedLog:
    """Where a followed log stands, so that a follow the server ended can be
    resumed: the attempt its last bytes belong to, and how many bytes of that
    attempt's log have been read."""

    def __init__(self):
        self.attempt: int | None = None
        self.offset = 0
        self._tail = b""

    def params(self) -> dict:
        resume = {"attempt": self.attempt, "offset": self.offset} if self.attempt is not None else {}
        return {"follow": "1", **resume}

    def start(self, attempt: str | None) -> None:
        """A response begins, in the log of `attempt` (its header)."""
        self._tail = b""
        if attempt and attempt.isdigit() and int(attempt) != self.attempt:
            self.attempt, self.offset = int(attempt), 0

    def advance(self, chunk: bytes) -> None:
        window = self._tail + chunk
        new = [m for m in NEXT_ATTEMPT.finditer(window) if m.end() > len(self._tail)]
        if new:
            self.attempt, self.offset = int(new[-1][1]), len(window) - new[-1].end()
        else:
            self.offset += len(chunk)
        self._tail = window[-MARKER_MAX:]
