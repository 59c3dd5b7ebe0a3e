"""SFTP to a runner's chrooted account: atomic, pinned, and parallel for big files."""

from __future__ import annotations

import hashlib
import os

import pytest

from pink import sftp
from pink.errors import Unavailable


@pytest.fixture
def node(pink_config):
    r = pink_config.runner
    return {"name": r.name, "ssh_host": r.ssh_host, "ssh_port": r.ssh_port, "ssh_user": r.ssh_user}


def _sha(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_parallel_put_of_a_big_file_arrives_whole(pink_config, node, tmp_path):
    local = tmp_path / "big.bin"
    with open(local, "wb") as fh:
        for _ in range(sftp.PARALLEL_MIN // (1 << 20) + 3):
            fh.write(os.urandom(1 << 20))
    with sftp.session(pink_config.ssh, node) as conn:
        sent = sftp.put_parallel(conn, pink_config.ssh, node, sftp.local_file(str(local)), "/spool/big.tar")
        assert sorted(conn.listdir("/spool")) == ["big.tar"]  # no .part left behind
    arrived = os.path.join(pink_config.runner.spool_dir, "big.tar")
    assert sent == os.path.getsize(local) == os.path.getsize(arrived)
    assert _sha(arrived) == _sha(local)


def test_unknown_host_key_is_refused(pink_config, node, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    pink_config.ssh.known_hosts = str(empty)
    with pytest.raises(Unavailable, match="cannot open SFTP"):
        sftp.connect(pink_config.ssh, node)
