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


def _random_file(path, mib: int):
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(1 << 20))


def test_batched_put_survives_key_reexchanges(pink_config, node, tmp_path):
    """Batches advance paramiko's packet counters: rekeys happen mid-copy and the connection goes on."""
    assert pink_config.ssh.cipher == "aes128-gcm@openssh.com"
    local = tmp_path / "rekeyed.bin"
    _random_file(local, 24)
    with sftp.session(pink_config.ssh, node) as conn:
        channel = conn.get_channel()
        assert channel._batchable()  # the batched path, not paramiko's send
        transport = channel.get_transport()
        transport.packetizer.REKEY_BYTES = 4 << 20  # this connection only: a re-exchange every 4 MiB
        first_exchange = transport.H
        sftp.put(conn, sftp.local_file(str(local)), "/spool/rekeyed.bin")
        assert transport.H != first_exchange  # keys changed during the copy
        assert conn.stat("/spool/rekeyed.bin").st_size == os.path.getsize(local)
    assert _sha(os.path.join(pink_config.runner.spool_dir, "rekeyed.bin")) == _sha(local)


def test_other_ciphers_use_paramikos_send(pink_config, node, tmp_path):
    local = tmp_path / "ctr.bin"
    _random_file(local, 3)
    pink_config.ssh.cipher = "aes128-ctr"
    with sftp.session(pink_config.ssh, node) as conn:
        assert not conn.get_channel()._batchable()
        sftp.put(conn, sftp.local_file(str(local)), "/spool/ctr.bin")
    assert _sha(os.path.join(pink_config.runner.spool_dir, "ctr.bin")) == _sha(local)


def test_get_reads_ahead_in_windows_and_hands_over_every_byte(pink_config, node, tmp_path):
    """A file of several read-ahead windows and a ragged end arrives whole; so does its tail."""
    size = 3 * sftp.PREFETCH_REQUESTS * 32768 + 12345
    data = os.urandom(size)
    with open(os.path.join(pink_config.runner.spool_dir, "windows.bin"), "wb") as fh:
        fh.write(data)
    with sftp.session(pink_config.ssh, node) as conn:
        got, digest = sftp.get(conn, "/spool/windows.bin", str(tmp_path / "got.bin"))
        tail, skipped = sftp.read_tail(conn, "/spool/windows.bin", 100_000)
        streamed = b"".join(sftp.stream_from(conn, "/spool/windows.bin", 5))
    assert (got, digest) == (size, hashlib.sha256(data).hexdigest())
    assert (tail, skipped) == (data[-100_000:], size - 100_000)
    assert streamed == data[5:]
