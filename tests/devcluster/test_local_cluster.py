"""The local cluster's services answer, are locked down as promised, and `up`
and `down` manage exactly their own processes (devcluster/cluster.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import uuid
from pathlib import Path

import paramiko
import pymysql
import pytest
import redis

from devcluster.cluster import TEST_BASE, Cluster
from devcluster.etcd_service import ETCD_COMPACTION_RETENTION, b64
from devcluster.ports import tcp_answers
from devcluster.processes import pid_alive, wait_until

REPO = Path(__file__).resolve().parents[2]


def sftp_client(cluster: Cluster, known_hosts: Path) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=cluster.ssh_port("run1"), username="pink-xfer",
                   key_filename=str(cluster.ssh_key), look_for_keys=False,
                   allow_agent=False, timeout=10)
    return client


# ---------------------------------------------------------------- etcd, redis

def test_etcd_put_get(cluster):
    key = f"/pink-test/probe/{uuid.uuid4().hex}"
    cluster.etcd("kv/put", {"key": b64(key), "value": b64("v1")})
    got = cluster.etcd("kv/range", {"key": b64(key)})
    assert [kv["value"] for kv in got["kvs"]] == [b64("v1")]
    cluster.etcd("kv/deleterange", {"key": b64(key)})


def test_etcd_runs_with_auto_compaction(cluster):
    """The running etcd (not only the argv we meant to give it) compacts periodically."""
    argv = Path(f"/proc/{cluster.pid('etcd')}/cmdline").read_bytes().decode().split("\0")
    assert argv[0].endswith("etcd")
    assert "--auto-compaction-mode=periodic" in argv
    assert f"--auto-compaction-retention={ETCD_COMPACTION_RETENTION}" in argv
    assert not any(arg.startswith("--quota-backend-bytes") for arg in argv)  # etcd's default
    status = cluster.etcd_status()
    assert status["db_size"] >= status["db_size_in_use"] > 0 and status["revision"] > 0


def test_etcd_compaction_drops_old_revisions(cluster):
    """A private etcd with a two-second retention: an old revision is gone soon after."""
    base = TEST_BASE / f"compact-{uuid.uuid4().hex[:8]}"
    small = Cluster(base, ssl_dir=cluster.ssl_dir, ssl_db_dir=cluster.ssl_db_dir)
    try:
        small.start_etcd(compaction_retention="2s")
        key = b64("/pink-test/compaction")
        small.etcd("kv/put", {"key": key, "value": b64("v1")})
        first = small.etcd_status()["revision"]
        for n in range(2, 5):
            small.etcd("kv/put", {"key": key, "value": b64(f"v{n}")})

        def compacted() -> bool:
            try:
                small.etcd("kv/range", {"key": key, "revision": first})
            except urllib.error.HTTPError as exc:  # the gateway answers a gRPC error as HTTP 400
                return "compacted" in exc.read().decode()
            return False

        assert wait_until(compacted, 20, 0.5)
        assert small.etcd_count("/pink-test/compaction") == 1
    finally:
        small.down()
        subprocess.run(["rm", "-rf", str(base)])


def test_redis_ping(cluster):
    assert redis.Redis.from_url(cluster.redis_url()).ping()


# ---------------------------------------------------------------- mariadb

def test_mariadb_pink_user_over_tls(cluster):
    conn = pymysql.connect(host="127.0.0.1", port=cluster.db_port, user="pink",
                           password=cluster.state["db_password"], database="pink",
                           ssl={"ca": str(cluster.db_ca)})
    with conn, conn.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
        assert cur.fetchone()[1].startswith("TLS")


def test_mariadb_refuses_plain_tcp(cluster):
    # PyMySQL >= 1.2 tries TLS unless told not to: disable it explicitly.
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host="127.0.0.1", port=cluster.db_port, user="pink",
                        password=cluster.state["db_password"], database="pink",
                        ssl_disabled=True)


def test_mariadb_certificate_is_verified(cluster):
    """A client trusting another CA (the web one) refuses the server."""
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host="127.0.0.1", port=cluster.db_port, user="pink",
                        password=cluster.state["db_password"], database="pink",
                        ssl={"ca": str(cluster.ssl_dir / "ca.pem")})


def test_mariadb_root_has_no_tcp_access(cluster):
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host="127.0.0.1", port=cluster.db_port, user="root", password="",
                        ssl={"ca": str(cluster.db_ca)})


# ---------------------------------------------------------------- sshd

def test_sftp_put_lands_in_runner_spool(cluster):
    name = f"probe-{uuid.uuid4().hex}"
    client = sftp_client(cluster, cluster.known_hosts)
    with client, client.open_sftp() as sftp:
        assert sorted(sftp.listdir("/")) == ["outbox", "spool"]  # chrooted
        with sftp.open(f"/spool/{name}", "wb") as fh:
            fh.write(b"image bytes")
        assert name in sftp.listdir("/spool")
        with sftp.open(f"/spool/{name}", "rb") as fh:
            assert fh.read() == b"image bytes"
    local = cluster.spool_dir("run1") / name
    assert local.read_bytes() == b"image bytes"
    local.unlink()


def test_sftp_refuses_unknown_host_key(cluster, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException):
        sftp_client(cluster, empty)


def test_ssh_refuses_commands_and_shells(cluster):
    client = sftp_client(cluster, cluster.known_hosts)
    with client:
        _, stdout, _ = client.exec_command("echo pwned; id", timeout=10)
        out = stdout.read()
        assert b"pwned" not in out and b"uid=" not in out
        assert stdout.channel.recv_exit_status() != 0
        with pytest.raises(paramiko.SSHException):
            client.invoke_shell()


def test_second_runner_has_its_own_chroot(cluster):
    port = cluster.start_sshd("run2")
    try:
        assert port != cluster.ssh_port("run1")
        config = cluster.write_config(path=cluster.base / "run2.toml", runner_name="run2")
        assert f"ssh_port = {port}" in config.read_text()
        client = paramiko.SSHClient()
        client.load_host_keys(str(cluster.known_hosts))  # both runners pinned
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect("127.0.0.1", port=port, username="pink-xfer",
                       key_filename=str(cluster.ssh_key), look_for_keys=False,
                       allow_agent=False, timeout=10)
        with client, client.open_sftp() as sftp:
            sftp.open("/spool/for-run2", "wb").close()
        assert (cluster.spool_dir("run2") / "for-run2").exists()
        assert not (cluster.spool_dir("run1") / "for-run2").exists()
    finally:
        cluster.stop("sshd-run2")


def test_ssh_refuses_root(cluster):
    client = paramiko.SSHClient()
    client.load_host_keys(str(cluster.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.AuthenticationException):
        client.connect("127.0.0.1", port=cluster.ssh_port("run1"), username="root",
                       key_filename=str(cluster.ssh_key), look_for_keys=False,
                       allow_agent=False, timeout=10)


# ---------------------------------------------------------------- up, down, namespaces

def test_second_up_reuses_running_services(cluster):
    """`python -m devcluster.local up` on a running cluster changes nothing."""
    before = json.loads(cluster.state_file.read_text())
    out = subprocess.run([sys.executable, "-m", "devcluster.local", "up", "--base",
                          str(cluster.base)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    after = json.loads(cluster.state_file.read_text())
    assert after["ports"].items() >= before["ports"].items()
    assert {n: p["pid"] for n, p in after["procs"].items()} == \
        {n: p["pid"] for n, p in before["procs"].items()}
    assert Path(out.stdout.strip()) == cluster.config_path


def test_restart_after_kill_and_down_leaves_nothing(cluster):
    """A private little cluster: killed services come back on the same
    port; `down` stops its own processes and none of the session's."""
    base = TEST_BASE / f"updown-{uuid.uuid4().hex[:8]}"
    small = Cluster(base, ssl_dir=cluster.ssl_dir, ssl_db_dir=cluster.ssl_db_dir)
    try:
        small.start_etcd()
        small.start_redis()
        port, pid = small.redis_port, small.pid("redis")
        small.kill("redis")
        assert not pid_alive(pid)
        again = Cluster(base)  # as a second `up` would see it
        again.start_etcd()
        again.start_redis()
        assert again.redis_port == port and again.pid("redis") != pid
        assert again.pid("etcd") == small.pid("etcd")
        pids = [again.pid(n) for n in again.names()]
        again.down()
        assert not any(pid_alive(p) for p in pids)
        assert not list(again.run_dir.glob("*.pid"))
        assert not tcp_answers(port)
        assert all(cluster.alive(n) for n in cluster.names())
    finally:
        Cluster(base).down()
        subprocess.run(["rm", "-rf", str(base)])


def test_pink_config_is_a_private_namespace(cluster, pink_config):
    assert pink_config.path.endswith("pink.toml")
    assert pink_config.etcd.prefix.startswith("/pink-test/")
    assert pink_config.node_ttl == 3 and pink_config.leader_ttl == 3
    assert redis.Redis.from_url(pink_config.redis_url).dbsize() == 0
    db = pink_config.db
    conn = pymysql.connect(host=db.host, port=db.port, user=db.user, password=db.password,
                           database=db.database, ssl={"ca": db.ca})
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE probe (id INT)")
        cur.execute("SELECT DATABASE()")
        assert cur.fetchone()[0] == db.database
    assert Path(pink_config.web.spool_dir).is_dir()
    assert pink_config.runner.spool_dir == str(cluster.spool_dir("run1"))
    assert not any(Path(pink_config.runner.spool_dir).iterdir())


# ---------------------------------------------------------------- the demo's address

def test_demo_web_port_is_the_bookmarked_one_unless_taken(tmp_path):
    """`make demo` serves https://localhost:8443 when it can, says which port it chose when not,
    and moves back to 8443 once it is free again."""
    import socket

    from devcluster.pink_toml import WEB_PORT
    from devcluster.ports import port_is_free

    if not port_is_free(WEB_PORT):
        pytest.skip(f"port {WEB_PORT} is in use on this machine")
    cl = Cluster(tmp_path / "demo")
    assert cl.port("web", prefer=WEB_PORT) == WEB_PORT
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", WEB_PORT))
        squatter.listen()
        moved = cl.port("web", prefer=WEB_PORT)
        assert moved != WEB_PORT and Cluster(tmp_path / "demo").state["ports"]["web"] == moved
    assert cl.port("web", prefer=WEB_PORT) == WEB_PORT
