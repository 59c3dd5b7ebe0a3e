"""ssl/make-certs.sh, run for real into private directories: certificates
that fit are kept byte for byte, one that lacks a requested SAN (or expires
soon, or another CA signed it) is refused with nothing changed, `--renew`
re-issues the leaves under the same CAs, `--check` only reports. Also the
pink_web role's check that the web certificate names the host's address.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "ssl" / "make-certs.sh"
OPENSSL = shutil.which("openssl")
SERVER_CERTS = ("ssl/web.pem", "ssl_db/server.pem", "ssl/etcd/member.pem")
CLIENT_CERTS = ("ssl/etcd/root.pem", "ssl/etcd/pink-web.pem", "ssl/etcd/pink-runner.pem")
CAS = ("ssl", "ssl_db", "ssl/etcd")

pytestmark = pytest.mark.skipif(not OPENSSL, reason="openssl is not installed")


def make_certs(base: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), "--web-dir", str(base / "ssl"), "--db-dir", str(base / "ssl_db"),
                           *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def snapshot(base: Path) -> dict[str, bytes]:
    """Every file under base (hidden ones too), by relative path."""
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def openssl(*args: str) -> str:
    return subprocess.run([OPENSSL, *args], check=True, capture_output=True, text=True).stdout


def sans(cert: Path) -> set[str]:
    text = openssl("x509", "-noout", "-ext", "subjectAltName", "-in", str(cert))
    return {s.strip().replace("IP Address:", "IP:") for s in text.splitlines()[1].split(",")}


def verifies(ca: Path, cert: Path) -> bool:
    return subprocess.run([OPENSSL, "verify", "-CAfile", str(ca), str(cert)],
                          capture_output=True).returncode == 0


@pytest.fixture
def base(tmp_path):
    out = make_certs(tmp_path, "IP:10.0.0.1")
    assert out.returncode == 0, out.stderr
    return tmp_path


def test_matching_certificates_are_kept_as_they_are(base):
    before = snapshot(base)
    assert len(before) == 18  # 3 CAs and 6 leaves, each a .pem and a .key
    for args in (["IP:10.0.0.1"], [], ["DNS:LOCALHOST,IP:10.0.0.1", "IP:127.0.0.1"]):
        out = make_certs(base, *args)
        assert out.returncode == 0, out.stderr
        assert "made" not in out.stderr and "renewed" not in out.stderr
        assert snapshot(base) == before, args


def test_a_missing_san_is_refused_and_nothing_changes(base):
    before = snapshot(base)
    out = make_certs(base, "IP:10.0.0.1", "IP:10.0.0.2", "DNS:web1.lab.example")
    assert out.returncode != 0
    for cert in SERVER_CERTS:
        assert str(base / cert) in out.stderr
    assert "IP:10.0.0.2" in out.stderr and "DNS:web1.lab.example" in out.stderr
    assert "--renew" in out.stderr
    assert snapshot(base) == before  # byte-identical, and nothing added (no staging left)


def test_renew_adds_the_san_under_the_same_ca(base):
    before = snapshot(base)
    out = make_certs(base, "--renew", "IP:10.0.0.1", "IP:10.0.0.2")
    assert out.returncode == 0, out.stderr
    after = snapshot(base)
    assert set(after) == set(before)  # the same files, no leftovers
    for ca in CAS:  # clients pin the CAs: never replaced
        assert after[f"{ca}/ca.pem"] == before[f"{ca}/ca.pem"]
        assert after[f"{ca}/ca.key"] == before[f"{ca}/ca.key"]
    for cert in SERVER_CERTS + CLIENT_CERTS:
        key = cert.removesuffix(".pem") + ".key"
        assert after[cert] != before[cert] and after[key] != before[key], cert
        assert verifies(base / Path(cert).parent / "ca.pem", base / cert), cert
        assert (openssl("x509", "-noout", "-pubkey", "-in", str(base / cert))
                == openssl("pkey", "-pubout", "-in", str(base / key))), cert
    for cert in SERVER_CERTS:
        assert {"DNS:localhost", "IP:127.0.0.1", "IP:10.0.0.1", "IP:10.0.0.2"} <= sans(base / cert)
    # now they fit: a plain run keeps them
    assert make_certs(base, "IP:10.0.0.2").returncode == 0
    assert snapshot(base) == after


def test_renew_changes_nothing_when_a_new_certificate_fails(base, tmp_path_factory):
    """The leaves are made aside: if signing one fails, none of the old ones
    is replaced (web.pem is made before the etcd member's)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "openssl").write_text(
        f'#!/bin/sh\ncase "$*" in *-req*member.csr*) echo "injected failure" >&2; exit 1 ;; esac\n'
        f'exec {OPENSSL} "$@"\n')
    (bin_dir / "openssl").chmod(0o755)
    before = snapshot(base)
    out = make_certs(base, "--renew", "IP:10.0.0.2", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert out.returncode != 0
    assert "injected failure" in out.stderr
    assert snapshot(base) == before


def test_a_certificate_of_another_ca_is_refused(base):
    for name in ("ca.pem", "ca.key"):  # ssl/ now holds MariaDB's CA: web.pem is not its
        shutil.copy(base / "ssl_db" / name, base / "ssl" / name)
    before = snapshot(base)
    out = make_certs(base, "IP:10.0.0.1")
    assert out.returncode != 0
    assert str(base / "ssl" / "web.pem") in out.stderr and "not signed" in out.stderr
    assert snapshot(base) == before
    assert make_certs(base, "--renew", "IP:10.0.0.1").returncode == 0
    assert verifies(base / "ssl" / "ca.pem", base / "ssl" / "web.pem")


def test_check_reports_an_expiring_certificate(tmp_path):
    assert make_certs(tmp_path, "--days", "10").returncode == 0
    before = snapshot(tmp_path)
    out = make_certs(tmp_path, "--check")
    assert out.returncode == 1, out.stdout + out.stderr
    lines = {line.split(":")[0].split()[-1]: line for line in out.stdout.splitlines() if line[:4] in ("ok  ", "FAIL")}
    for cert in SERVER_CERTS + CLIENT_CERTS:
        line = lines[str(tmp_path / cert)]
        assert line.startswith("FAIL") and "expires within 30 days" in line, line
    assert snapshot(tmp_path) == before
    # refused as it is, renewed for --days (825 by default) under the same CA
    assert make_certs(tmp_path).returncode == 1
    assert make_certs(tmp_path, "--renew").returncode == 0
    out = make_certs(tmp_path, "--check")
    assert out.returncode == 0, out.stdout
    assert make_certs(tmp_path, "--check", "--within", "900").returncode == 1


def test_check_reports_a_missing_san_and_changes_nothing(base):
    before = snapshot(base)
    out = make_certs(base, "--check", "IP:10.0.0.1")
    assert out.returncode == 0, out.stdout
    assert "FAIL" not in out.stdout
    out = make_certs(base, "--check", "IP:10.0.0.1", "IP:10.0.0.9")
    assert out.returncode == 1
    fails = [line for line in out.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == len(SERVER_CERTS), out.stdout
    assert all("IP:10.0.0.9" in line for line in fails)
    assert snapshot(base) == before


# ---------------------------------------------------------------- the deploy's check

def ansible_playbook() -> str | None:
    here = Path(sys.executable).parent / "ansible-playbook"
    return str(here) if here.exists() else shutil.which("ansible-playbook")


@pytest.mark.parametrize("address, fits", [("10.0.0.1", True), ("localhost", True),
                                           ("10.0.0.9", False), ("web9.lab.example", False)])
def test_pink_web_refuses_a_certificate_without_the_hosts_address(base, tmp_path_factory, address, fits):
    """The role's own tasks (the command on the control host and the assert)
    against a web certificate naming IP:10.0.0.1."""
    playbook = ansible_playbook()
    if not playbook:
        pytest.skip("ansible-playbook is not installed (pip install '.[deploy]')")
    tasks = yaml.safe_load((REPO / "ansible" / "roles" / "pink_web" / "tasks" / "main.yml").read_text())
    checks = [t for t in tasks if t.get("register") == "pink_web_cert_check"
              or "pink_web_cert_check" in str(t.get("ansible.builtin.assert", ""))]
    assert len(checks) == 2, "pink_web lost its certificate check"
    work = tmp_path_factory.mktemp("play")
    (work / "play.yml").write_text(yaml.safe_dump([{
        "hosts": "all", "gather_facts": False,
        "vars": {"pink_web_certfile_src": str(base / "ssl" / "web.pem"), "pink_address": address},
        "tasks": checks}]))
    out = subprocess.run([playbook, "-i", "web1,", "-c", "local", str(work / "play.yml")],
                         capture_output=True, text=True, timeout=300, cwd=work,
                         env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0"})
    if fits:
        assert out.returncode == 0, out.stdout + out.stderr
    else:
        assert out.returncode != 0
        assert f"does not name {address}" in out.stdout, out.stdout
