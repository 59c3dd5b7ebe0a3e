"""The deployed lab is what the seed describes, and a user's task goes through it.

`make cluster` deployed it with the Ansible roles; these tests read what the
roles left on the machines and use PINK through the router, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from devcluster import lab as devlab
from tests.helpers import files_in_output


def pink_cli(*args: str) -> subprocess.CompletedProcess:
    """The `pink` CLI as `make cluster` left it logged in (its config file)."""
    pink = str(Path(sys.executable).parent / "pink")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINK_")}
    out = subprocess.run([pink, *args], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, f"pink {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


def test_submit_through_the_router_and_download_the_output(lab, archive, tmp_path):
    out = pink_cli("submit", archive, "--env", "SECONDS=1", "--env", "TOKEN_IN_QUERY=s3cret",
                   "--wait", "--download", str(tmp_path / "out"))
    outputs = sorted((tmp_path / "out").rglob("*.tar.zst"))
    assert outputs, out.stdout + out.stderr
    files = files_in_output(outputs[0].read_bytes())
    assert files.get("result.txt") == b"done\n", sorted(files)
    log = lab.sh("router", "cat /var/log/nginx/pink-access.log")
    assert "POST /api/v1/uploads" in log and "s3cret" not in log and "TOKEN_IN_QUERY" not in log


def test_a_runner_holds_no_secret_of_the_web_side(lab):
    credentials = devlab.LAB_DIR / "credentials"
    secrets = {p.name: p.read_text().strip() for p in credentials.iterdir()
               if p.is_file() and not p.name.endswith(".pub")}
    assert {"db_pink", "redis", "web_secret_key", "pink_workers_id_ed25519"} <= set(secrets)
    for runner in ("run1", "run2"):
        config = lab.sh(runner, "cat /etc/pink/pink.toml")
        assert "[db]" not in config and "[web]" not in config and "redis_url" not in config
        for name, secret in secrets.items():
            # A private key: a line of its own material (the first is the same in every key).
            needle = secret.splitlines()[2] if "PRIVATE KEY" in secret else secret
            found = lab.sh(runner, f"grep -rlF -- {json.dumps(needle)} /etc /var/lib/pink /opt/pink "
                                   "2>/dev/null || true")
            assert not found.strip(), f"{runner} holds {name} in {found}"
        subject = lab.sh(runner, "openssl x509 -noout -subject -in /etc/pink/etcd/client.pem")
        assert "CN = pink-runner" in subject
        assert lab.sh(runner, "test -e /etc/etcd/pki/root.key && echo yes || echo no").strip() == "no"


def test_etcd_is_three_members_over_tls_with_authentication(lab):
    member = "/etc/etcd/pki/member"  # a CN that is no etcd user
    names = {m["name"] for m in json.loads(lab.etcdctl("web2", "member list -w json", member))["members"]}
    assert names == {"web1", "web2", "db"} == set(lab.etcd_members), names
    health = lab.etcdctl("web2", "endpoint health", member)
    assert health.count("is healthy") == 3, health
    plain = lab.sh("web2", "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:2379/version || true")
    assert plain.strip() in ("000", ""), f"etcd answered plain HTTP: {plain}"
    no_user = lab.etcdctl("web2", "get /pink/ --prefix --keys-only", member)
    assert "permission denied" in no_user or "user name not found" in no_user, no_user
    assert "/pink/nodes/run1" in lab.etcdctl("run1", "get /pink/nodes/ --prefix --keys-only")
    for refused in ("put /elsewhere x", "put /pink/web/web9 x", "get /pink/leader"):
        assert "permission denied" in lab.etcdctl("run1", refused), f"a runner may {refused}"
    assert "/pink/web/web1" in lab.etcdctl("web2", "get /pink/web/ --prefix --keys-only")


def test_a_runner_holds_no_etcd_member(lab):
    """A container escaping to root on a runner finds no replica of etcd's
    data, no member (peer) or root certificate, and no etcd server: the
    runner is a client of the members with its own certificate."""
    for runner in ("run1", "run2"):
        found = lab.sh(runner, "ls -d /var/lib/etcd/pink /var/lib/etcd/default /etc/etcd/pki "
                               "2>/dev/null || true")
        assert not found.strip(), f"{runner} holds {found}"
        assert lab.sh(runner, "pgrep -x etcd || true").strip() == "", f"etcd runs on {runner}"
        listening = lab.sh(runner, "ss -Htln '( sport = :2379 or sport = :2380 )'")
        assert not listening.strip(), f"{runner} listens for etcd: {listening}"
        etcd = tomllib.loads(lab.sh(runner, "cat /etc/pink/pink.toml"))["etcd"]
        assert sorted(etcd["endpoints"]) == sorted(f"{lab.hosts[h]['ip']}:2379" for h in lab.etcd_members)
        assert etcd["cert"] == "/etc/pink/etcd/client.pem"  # CN pink-runner, checked above


def test_redis_is_replicated_under_sentinel(lab):
    master = lab.redis_cli("db", "-p 26379 SENTINEL get-master-addr-by-name pink").split()
    assert master and master[0] in {lab.hosts[h]["ip"] for h in ("web1", "web2", "db")}
    info = lab.redis_cli("db", f"-h {master[0]} INFO replication")
    assert "role:master" in info and "connected_slaves:2" in info, info
    sentinels = lab.redis_cli("db", "-p 26379 SENTINEL sentinels pink")
    assert sentinels.count("26379") == 2, sentinels  # the other two
    for host in ("web1", "web2", "db"):  # loopback and the cluster network only
        bound = {line.split()[3] for line in lab.sh(host, "ss -Htln '( sport = :6379 )'").splitlines()}
        assert bound == {"127.0.0.1:6379", f"{lab.hosts[host]['ip']}:6379"}, bound
