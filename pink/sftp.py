"""SFTP to a runner's transfer account: copy images in, pull exports and logs out.

The account is key-only and chrooted to the runner's spool and outbox. Host
keys come from the configured known_hosts file and are never auto-accepted
(paramiko's RejectPolicy). Used by the transfer and finalize jobs and by the
web node when it tails a running task's log.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from typing import Callable, Iterator

import paramiko

from pink import defaults
from pink.errors import Unavailable

_WINDOW = 64 * 2**20  # bytes: a large window keeps pipelined writes flowing


def connect(ssh_config, node: dict, timeout: float = 10.0) -> paramiko.SSHClient:
    """An SSH client to `node`'s transfer account, host key pinned."""
    client = paramiko.SSHClient()
    if ssh_config.known_hosts:
        client.load_host_keys(ssh_config.known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    where = f"{node['ssh_user']}@{node['ssh_host']}:{node['ssh_port']}"
    try:
        client.connect(node["ssh_host"], port=node["ssh_port"], username=node["ssh_user"],
                       key_filename=ssh_config.key or None, look_for_keys=False, allow_agent=False,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       disabled_algorithms=_prefer_cipher(ssh_config.cipher))
    except paramiko.SSHException as exc:
        client.close()
        raise Unavailable(f"cannot open SFTP to runner {node['name']} ({where}): {exc}") from exc
    except (OSError, socket.timeout) as exc:
        client.close()
        raise Unavailable(f"runner {node['name']} ({where}) is unreachable: {exc}") from exc
    client.get_transport().default_window_size = _WINDOW
    return client


def _prefer_cipher(cipher: str) -> dict:
    """Leave only the preferred cipher when paramiko knows it."""
    known = paramiko.Transport._preferred_ciphers
    if cipher and cipher in known:
        return {"ciphers": [c for c in known if c != cipher]}
    return {}


@contextlib.contextmanager
def session(ssh_config, node: dict) -> Iterator[paramiko.SFTPClient]:
    client = connect(ssh_config, node)
    try:
        yield client.open_sftp()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise Unavailable(f"SFTP to runner {node['name']} failed: {exc}") from exc
    finally:
        client.close()


def remote_size(sftp: paramiko.SFTPClient, path: str) -> int | None:
    try:
        return sftp.stat(path).st_size
    except FileNotFoundError:
        return None


def put(sftp: paramiko.SFTPClient, local: str, remote: str,
        progress: Callable[[int], None] | None = None) -> int:
    """Copy `local` to `remote` atomically: write `remote.part`, then rename."""
    part = remote + ".part"
    sent = 0
    with open(local, "rb") as src, sftp.open(part, "wb") as dst:
        dst.set_pipelined(True)
        while chunk := src.read(defaults.SFTP_CHUNK):
            dst.write(chunk)
            sent += len(chunk)
            if progress:
                progress(sent)
    sftp.posix_rename(part, remote)
    return sent


def get(sftp: paramiko.SFTPClient, remote: str, local: str) -> tuple[int, str]:
    """Copy `remote` to `local` via `local.part`; returns (bytes, sha256)."""
    part = local + ".part"
    digest = hashlib.sha256()
    size = 0
    with sftp.open(remote, "rb") as src, open(part, "wb") as dst:
        src.prefetch()
        while chunk := src.read(defaults.SFTP_CHUNK):
            dst.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    os.replace(part, local)
    return size, digest.hexdigest()


def read_from(sftp: paramiko.SFTPClient, remote: str, offset: int) -> bytes:
    """What `remote` holds past `offset` (b"" when it is gone or unchanged)."""
    try:
        with sftp.open(remote, "rb") as fh:
            fh.seek(offset)
            return fh.read()
    except FileNotFoundError:
        return b""


def remove(sftp: paramiko.SFTPClient, *paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            sftp.remove(path)
