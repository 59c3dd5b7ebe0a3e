"""The CLI's own settings: which server to talk to, with which token and CA.

Stored in `~/.config/pink/config.toml` (under $XDG_CONFIG_HOME when set, or
the file named by $PINK_CLI_CONFIG) with keys `url`, `token`, `ca` and `device`; the
token is a secret, so the file is written 0600 in a 0700 directory. Read by
the `pink` group for every command, written by `pink login`.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

from pink.compat import tomllib
from pink.errors import ConfigError

PATH_ENV = "PINK_CLI_CONFIG"
KEYS = ("url", "token", "ca", "device")


@dataclass
class Settings:
    url: str = ""
    token: str = ""
    ca: str = ""  # CA certificate file trusted for the server's TLS; empty: system CAs
    # The server's signed login-device cookie from the last password login: the
    # server counts this CLI's failed logins apart, so strangers sharing its
    # address (a lab's NAT) cannot keep it from logging in (web/throttle.py).
    device: str = ""

    def merged(self, **overrides: str | None) -> "Settings":
        """A copy where every non-empty override (option or env var) wins over the file."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in overrides.items() if v})
        return Settings(**values)


def default_path() -> Path:
    """Where the settings live: $PINK_CLI_CONFIG, else the XDG config directory."""
    explicit = os.environ.get(PATH_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "pink" / "config.toml"


def load(path: Path | None = None) -> Settings:
    """The saved settings; a missing file is simply empty settings (not logged in yet)."""
    path = path or default_path()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return Settings()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    for key in KEYS:
        if not isinstance(data.get(key, ""), str):
            raise ConfigError(f"{path}: {key} must be a string")
    return Settings(**{key: data.get(key, "") for key in KEYS})


def insecure(path: Path | None = None) -> bool:
    """True when others may read the file that holds the token (like ssh, we warn)."""
    try:
        mode = os.stat(path or default_path()).st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


def toml_string(value: str) -> str:
    """A TOML basic string: tomllib reads it back as exactly `value`."""
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def render(settings: Settings) -> str:
    lines = ["# Written by `pink login`: the PINK server this CLI talks to."]
    lines += [f"{key} = {toml_string(getattr(settings, key))}" for key in KEYS]
    return "\n".join(lines) + "\n"


def _ensure_dir(directory: Path) -> None:
    """Create missing directories 0700: the file inside holds a token."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        os.mkdir(d, 0o700)
        os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask


def save(settings: Settings, path: Path | None = None) -> Path:
    """Write the settings atomically, mode 0600 from the first byte."""
    path = path or default_path()
    try:
        _ensure_dir(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # mkstemp already creates 0600; keep it explicit
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(render(settings))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
