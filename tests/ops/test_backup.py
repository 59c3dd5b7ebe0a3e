"""Backups (pink/backup.py, ansible/roles/backup) against the real MariaDB and
etcd the session's cluster runs: archive, back up, lose, restore, compare;
and the tasks finalized after the dump, which come back from the journal."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jinja2
import pytest
import zstandard

from devcluster.etcd_service import b64
from devcluster.ports import free_port
from devcluster.processes import wait_until
from pink import archive, backup, db, journal
from pink.errors import Unavailable
from pink.store import Store
from pink.tasks import Params, State, new_record
from tests.helpers import Api, make_user

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "ansible" / "roles" / "backup"
T0 = 1_700_000_000.0


def pink_backup(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pink.backup_command", *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"pink-backup {' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def root_options(cluster, tmp_path) -> Path:
    """The [client] option file the role writes, for the test cluster's root."""
    path = tmp_path / "backup-mariadb.cnf"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"[client]\nuser = root\npassword = {cluster.state['db_root_password']}\n"
                 f"socket = {cluster.db_socket}\n")
    return path


def _task(task_id: str, user: str = "alice", state: str = "succeeded", at: float = T0, output: dict | None = None):
    rec = new_record(task_id, user, Params(name=f"job-{task_id}"), {"sha256": "0" * 64, "size": 10}, "web1")
    rec.state, rec.result, rec.created_at, rec.updated_at = State(state), state, at, at + 3
    rec.timings = {"submitted": at, "running": at + 1, "exited": at + 2, state: at + 3}
    rec.history = [[at, "queued", "uploaded"], [at + 1, "running", ""], [at + 3, state, "exit code 0"]]
    rec.output = output
    return rec


def _tables(config) -> dict[str, list]:
    """Everything PINK keeps in its database, in a stable order."""
    conn = db.connect(config.db)
    try:
        out = {}
        with conn.cursor() as cur:
            for table, order in (("users", "id"), ("tokens", "id"), ("tasks", "id"),
                                 ("task_logs", "task_id, seq"), ("task_events", "id"), ("schema_version", "version")):
                cur.execute(f"SELECT * FROM {table} ORDER BY {order}")
                out[table] = list(cur.fetchall())
        conn.commit()
        return out
    finally:
        conn.close()


def _archived(config, task_id: str):
    with archive.connection(config.db) as conn:
        task = archive.get_record(conn, task_id)
        events = _events(conn, task_id)
        return (task.to_json() if task else None), archive.get_logs(conn, task_id), events


def _events(conn, task_id: str) -> list:
    with conn.cursor() as cur:
        cur.execute("SELECT at, state, detail FROM task_events WHERE task_id=%s ORDER BY id", (task_id,))
        rows = [tuple(r.values()) for r in cur.fetchall()]
    conn.commit()
    return rows


# -- MariaDB ---------------------------------------------------------------------------

def test_a_dump_brings_every_archived_task_back_after_the_database_is_lost(cluster, pink_config, root_options,
                                                                            tmp_path):
    config = pink_config
    make_user(config, "alice")
    make_user(config, "root", admin=True)
    binary = bytes(range(256)) * 8 + b"\0end"  # logs are bytes: --hex-blob keeps them exact
    big = os.urandom(3 << 20)  # several log pieces (LOG_PIECE is 1 MiB)
    with archive.connection(config.db) as conn:
        for i in range(300):
            logs = binary if i % 3 == 0 else big if i == 7 else f"log of {i}\n".encode()
            assert archive.archive_task(conn, _task(f"{i:012x}", at=T0 + i), logs, expires_at=T0 + 86400,
                                        deleted=(i == 5))
    before = _tables(config)
    assert len(before["tasks"]) == 300 and len(before["task_logs"]) > 300

    out = json.loads(pink_backup("mariadb-dump", "--options-file", root_options, "--database",
                                 config.db.database, "--dir", tmp_path / "backups", "--keep-days", 14).stdout)
    dump = Path(out["file"])
    assert re.fullmatch(r"pink-mariadb-\d{8}T\d{6}Z\.sql\.zst", dump.name), dump.name
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600
    assert stat.S_IMODE(dump.parent.stat().st_mode) == 0o700
    assert [p.name for p in dump.parent.iterdir()] == [dump.name]  # no part file left
    sql = zstandard.ZstdDecompressor().stream_reader(dump.open("rb")).read()
    assert b"CREATE TABLE `tasks`" in sql and sql.rstrip().splitlines()[-1].startswith(b"-- Dump completed")
    assert cluster.state["db_root_password"].encode() not in sql

    cluster.drop_database(config.db.database)  # the database is lost
    with pytest.raises(Unavailable):
        db.connect(config.db)

    pink_backup("mariadb-load", dump, "--options-file", root_options)
    assert _tables(config) == before  # every row of every table, logs byte for byte
    with archive.connection(config.db) as conn:
        assert archive.get_logs(conn, f"{7:012x}") == big
        assert archive.get_logs(conn, f"{3:012x}") == binary
        assert archive.get_record(conn, f"{5:012x}") is None  # deleted stays deleted


def test_a_failed_dump_fails_and_a_damaged_one_is_refused_before_anything_is_dropped(cluster, pink_config,
                                                                                     root_options, tmp_path):
    config = pink_config
    with archive.connection(config.db) as conn:
        assert archive.archive_task(conn, _task("a" * 12), b"kept")
    backups = tmp_path / "backups"

    wrong = tmp_path / "wrong.cnf"
    wrong.write_text(f"[client]\nuser = root\npassword = not-it\nsocket = {cluster.db_socket}\n")
    wrong.chmod(0o600)
    failed = pink_backup("mariadb-dump", "--options-file", wrong, "--database", config.db.database,
                         "--dir", backups, check=False)
    assert failed.returncode == 1 and "Access denied" in failed.stderr, failed.stderr
    assert list(backups.iterdir()) == []  # neither a dump nor a part of one

    shared = tmp_path / "shared.cnf"
    shutil.copy(root_options, shared)
    shared.chmod(0o644)
    refused = pink_backup("mariadb-dump", "--options-file", shared, "--database", config.db.database,
                          "--dir", backups, check=False)
    assert refused.returncode == 1 and "readable by others" in refused.stderr

    missing = pink_backup("mariadb-dump", "--options-file", root_options, "--database", "no_such_db",
                          "--dir", backups, check=False)
    assert missing.returncode == 1 and list(backups.iterdir()) == []

    dump = Path(json.loads(pink_backup("mariadb-dump", "--options-file", root_options, "--database",
                                       config.db.database, "--dir", backups).stdout)["file"])
    sql = zstandard.ZstdDecompressor().stream_reader(dump.open("rb")).read()
    cut = tmp_path / dump.name
    cut.write_bytes(zstandard.ZstdCompressor().compress(sql[: len(sql) * 2 // 3]))  # a dump cut short
    damaged = tmp_path / ("x" + dump.name)
    damaged.write_bytes(dump.read_bytes()[:-40])  # a file cut short
    with archive.connection(config.db) as conn:
        assert archive.archive_task(conn, _task("b" * 12), b"after the dump")
    for bad in (cut, damaged):
        proc = pink_backup("mariadb-load", bad, "--options-file", root_options, check=False)
        assert proc.returncode == 1, proc.stdout
        assert "not a complete dump" in proc.stderr or "damaged" in proc.stderr, proc.stderr
        assert _archived(config, "b" * 12)[1] == b"after the dump"  # nothing was dropped
        assert pink_backup("verify", bad, check=False).returncode == 1
    assert json.loads(pink_backup("verify", dump).stdout)["sql_bytes"] == len(sql)


def test_old_backups_go_after_keep_days_but_never_the_newest(tmp_path):
    now = time.time()
    names = {days: backup.backup_name("mariadb", now - days * 86400) for days in (40, 20, 15, 13, 1)}
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a backup")
    stale = tmp_path / f".{names[1]}.1234.part"
    stale.write_bytes(b"")
    os.utime(stale, (now - 2 * 86400, now - 2 * 86400))
    removed = backup.prune(tmp_path, "mariadb", 14, now)
    assert sorted(p.name for p in removed) == sorted([names[40], names[20], names[15], stale.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[13], names[1], "notes.txt"])
    assert backup.newest(tmp_path, "mariadb").name == names[1]

    lone = tmp_path / "lone"
    lone.mkdir()
    old = lone / backup.backup_name("etcd", now - 100 * 86400)
    old.write_bytes(b"x")
    assert backup.prune(lone, "etcd", 14, now) == []  # backups stopped working: the last one stays
    assert json.loads(pink_backup("newest", "--dir", lone, "--kind", "etcd").stdout)["file"] == str(old)
    assert pink_backup("newest", "--dir", lone, "--kind", "mariadb", check=False).returncode == 1


# -- etcd ------------------------------------------------------------------------------

def _etcd_call(endpoint: str, method: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://{endpoint}/v3/{method}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.load(resp)


def _etcd_values(endpoint: str, prefix: str) -> dict[str, str]:
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    got = _etcd_call(endpoint, "kv/range", {"key": b64(prefix), "range_end": b64(end)})
    import base64
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]).decode()
            for kv in got.get("kvs", [])}


def _healthy(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=2) as resp:
            return json.load(resp).get("health") == "true"
    except OSError:
        return False


def test_an_etcd_snapshot_restores_every_member_of_a_new_cluster(cluster, pink_config, tmp_path):
    """What restore.yml does on the members: the same snapshot restored into
    each member's data dir as a new cluster of three, started together."""
    prefix = pink_config.etcd.prefix + "/probe/"
    for i in range(100):
        cluster.etcd("kv/put", {"key": b64(f"{prefix}{i:03d}"), "value": b64(json.dumps({"n": i}))})
    kept = _etcd_values(cluster.etcd_endpoint, prefix)
    assert len(kept) == 100

    out = json.loads(pink_backup("etcd-snapshot", "--endpoint", f"http://{cluster.etcd_endpoint}",
                                 "--dir", tmp_path / "backups", "--keep-days", 14).stdout)
    snapshot = Path(out["file"])
    assert re.fullmatch(r"pink-etcd-\d{8}T\d{6}Z\.db\.zst", snapshot.name)
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600
    assert out["status"]["totalKey"] >= 100 and out["status"]["revision"] > 0
    assert [p.name for p in snapshot.parent.iterdir()] == [snapshot.name]
    assert json.loads(pink_backup("verify", snapshot).stdout)["totalKey"] == out["status"]["totalKey"]

    cluster.etcd_delete_prefix(prefix)  # the data is lost
    assert cluster.etcd_count(prefix) == 0

    members = [(f"m{i}", free_port(), free_port()) for i in range(3)]  # name, client, peer
    initial = ",".join(f"{name}=http://127.0.0.1:{peer}" for name, _, peer in members)
    procs = []
    try:
        for name, client, peer in members:
            pink_backup("etcd-restore", snapshot, "--data-dir", tmp_path / name, "--name", name,
                        "--initial-cluster", initial, "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                        "--initial-cluster-token", "pink-restored")
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o700
        again = pink_backup("etcd-restore", snapshot, "--data-dir", tmp_path / "m0", "--name", "m0",
                            "--initial-cluster", initial, "--initial-advertise-peer-urls", "http://127.0.0.1:1",
                            "--initial-cluster-token", "pink-restored", check=False)
        assert again.returncode == 1 and "not empty" in again.stderr  # a member's data is never overwritten
        for name, client, peer in members:
            log = open(tmp_path / f"{name}.log", "wb")
            procs.append(subprocess.Popen(
                ["etcd", "--name", name, "--data-dir", str(tmp_path / name),
                 "--listen-client-urls", f"http://127.0.0.1:{client}",
                 "--advertise-client-urls", f"http://127.0.0.1:{client}",
                 "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--initial-cluster-token", "pink-restored"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        endpoints = [f"127.0.0.1:{client}" for _, client, _ in members]
        assert wait_until(lambda: all(_healthy(e) for e in endpoints), 60), \
            "\n".join((tmp_path / f"{n}.log").read_text()[-2000:] for n, _, _ in members)
        for endpoint in endpoints:
            assert _etcd_values(endpoint, prefix) == kept
        listed = _etcd_call(endpoints[0], "cluster/member/list", {})["members"]
        assert sorted(m["name"] for m in listed) == ["m0", "m1", "m2"]
        _etcd_call(endpoints[0], "kv/put", {"key": b64(prefix + "new"), "value": b64("written after")})
        assert wait_until(lambda: _etcd_values(endpoints[2], prefix + "new") == {prefix + "new": "written after"},
                          10)  # a working cluster, not three copies
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(15)


def test_a_snapshot_needs_roots_certificate_once_authentication_is_on(cluster, tmp_path):
    """Deployed etcd: TLS, client certificates, authentication (the etcd
    role's files/etcd-auth.sh). Root's certificate takes the snapshot (the
    role puts it on etcd_auth_host only, hence backup_etcd_host); PINK's own
    user may not, and a failed snapshot leaves no file."""
    pki = cluster.ssl_dir / "etcd"
    client, peer = free_port(), free_port()
    log = open(tmp_path / "etcd.log", "wb")
    proc = subprocess.Popen(
        ["etcd", "--name", "tls", "--data-dir", str(tmp_path / "data"),
         "--listen-client-urls", f"https://127.0.0.1:{client}",
         "--advertise-client-urls", f"https://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
         "--cert-file", str(pki / "member.pem"), "--key-file", str(pki / "member.key"),
         "--trusted-ca-file", str(pki / "ca.pem"), "--client-cert-auth"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        endpoint = f"https://127.0.0.1:{client}"
        script = REPO / "ansible" / "roles" / "etcd" / "files" / "etcd-auth.sh"
        argv = [str(script), endpoint, str(pki / "ca.pem"), str(pki), "member", "pink-web=readwrite:/pink/"]
        assert wait_until(lambda: subprocess.run(argv, capture_output=True).returncode == 0, 30), \
            (tmp_path / "etcd.log").read_text()[-3000:]
        key = tmp_path / "root.key"  # the role installs it 0600
        shutil.copy(pki / "root.key", key)
        key.chmod(0o600)
        web_key = tmp_path / "pink-web.key"
        shutil.copy(pki / "pink-web.key", web_key)
        web_key.chmod(0o600)

        denied = pink_backup("etcd-snapshot", "--endpoint", endpoint, "--cacert", pki / "ca.pem",
                             "--cert", pki / "pink-web.pem", "--key", web_key, "--dir", tmp_path / "b",
                             check=False)
        assert denied.returncode == 1 and "permission denied" in denied.stderr.lower(), denied.stderr
        assert list((tmp_path / "b").iterdir()) == []

        out = json.loads(pink_backup("etcd-snapshot", "--endpoint", endpoint, "--cacert", pki / "ca.pem",
                                     "--cert", pki / "root.pem", "--key", key, "--dir", tmp_path / "b").stdout)
        assert out["status"]["totalKey"] > 0  # authentication's own keys at least
    finally:
        proc.terminate()
        proc.wait(15)


# -- the journal: tasks finalized after the dump -----------------------------------------

def _output(config, task_id: str, present: bool = True) -> dict:
    path = Path(config.web.output_dir) / f"{task_id}-1.tar.zst"
    if present:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"output of " + task_id.encode())
    return {"stored": True, "host": config.host, "path": str(path), "size": 10, "sha256": "0" * 64,
            "copies": [config.host]}


def test_recover_brings_back_journaled_tasks_the_dump_lacks_and_says_what_it_cannot(pink_config):
    config = pink_config
    now = time.time()
    out_dir = config.web.output_dir
    kept = _task("a00000000001", at=now - 50, output=_output(config, "a00000000001"))
    gone = _task("a00000000002", at=now - 40, output=_output(config, "a00000000002", present=False))
    deleted = _task("a00000000003", at=now - 30)
    requeued = _task("a00000000004", state="failed", at=now - 20)
    pending = _task("a00000000005", at=now - 10)  # archived, not yet removed from etcd
    archived = _task("a00000000006", at=now - 5)
    nobody = _task("a00000000007", user="carol", at=now - 4)
    for task, logs, deleted_flag in ((kept, b"log 1", False), (gone, b"log 2", False), (deleted, b"", True),
                                     (requeued, b"log 4", False), (pending, b"log 5", False),
                                     (archived, b"log 6", False), (nobody, b"log 7", False)):
        path = journal.add(out_dir, task, logs, now + 86400, deleted_flag, now=task.created_at)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(journal.directory(out_dir)).st_mode) == 0o700
    bad = Path(journal.directory(out_dir)) / journal._day(now) / "a00000000008-1.rec.zst"
    bad.write_bytes(b"not zstd")
    make_user(config, "alice")
    with archive.connection(config.db) as conn:
        assert archive.archive_task(conn, archived, b"log 6")
    store = Store.from_config(config)
    live_again = _task("a00000000004", state="queued", at=now)
    live_again.attempt = 2
    store.create(store.keys.task(requeued.id), live_again.to_json())  # run again after its entry was written
    exported = _task("a00000000005", state="exported", at=now)
    store.create(store.keys.task(pending.id), exported.to_json())

    report = journal.recover(config, since=now - 3600)
    assert sorted(report["recovered"]) == [kept.id, gone.id, deleted.id, pending.id, nobody.id]
    assert report["expired"] == [gone.id]
    assert report["present"] == 1 and report["live"] == 1
    assert report["missing_users"] == ["carol"] and report["not_journaled"] is None
    assert len(report["unreadable"]) == 1 and "a00000000008" in report["unreadable"][0]

    record, logs, events = _archived(config, kept.id)
    assert record == {**kept.to_json(), "expires_at": now + 86400}
    assert logs == b"log 1" and [e[1] for e in events] == ["queued", "running", "succeeded"]
    record, logs, _ = _archived(config, gone.id)
    assert record["expired_at"] is not None and logs is None  # its output went after the dump
    assert _archived(config, deleted.id)[0] is None  # still deleted
    assert _archived(config, requeued.id)[0] is None  # its own finalize archives attempt 2
    assert _archived(config, pending.id)[1] == b"log 5"
    with archive.connection(config.db) as conn:
        assert archive.stored_output(conn, kept.id) == kept.output["path"]  # the sweep keeps the file

    again = journal.recover(config, since=now - 3600)
    assert again["recovered"] == [] and again["present"] == 6 and again["live"] == 1
    store.close()

    # Deleted after the dump, through this node: the dump's row (archived) and
    # a recovered one (kept) are deleted again, once; a tombstone older than
    # the dump's window is left alone.
    journal.add_deletion(out_dir, archived, now=now - 60)
    journal.add_deletion(out_dir, kept, now=now - 30)
    journal.add_deletion(out_dir, pending, now=now - 3 * 86400)
    report = journal.redelete(config, since=now - 3600)
    assert sorted(report["deleted"]) == [kept.id, archived.id] and report["unreadable"] == []
    record, logs, _ = _archived(config, kept.id)
    assert record is None and logs is None
    assert _archived(config, pending.id)[1] == b"log 5"
    assert journal.redelete(config, since=now - 3600)["deleted"] == []

    # A dump older than the journal reaches: said, with the window.
    old_day = Path(journal.directory(out_dir)) / journal._day(now - 30 * 86400)
    old_day.mkdir()
    assert journal.prune(out_dir, now=now) == 1 and not old_day.exists()
    report = journal.recover(config, since=now - 20 * 86400)
    assert "are in neither" in report["not_journaled"], report


def test_the_journal_keeps_fourteen_days_and_a_refused_write_never_holds_finalize(tmp_path):
    out_dir = str(tmp_path / "outputs")
    now = time.time()
    task = _task("b00000000001", at=now)
    for days in (0, 13, 14, 15, 40):
        journal.add(out_dir, task, b"x", None, False, now=now - days * 86400)
    root = Path(journal.directory(out_dir))
    assert journal.prune(out_dir, now=now) == 2
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == \
        sorted(journal._day(now - d * 86400) for d in (0, 13, 14))
    assert (root / journal.PRUNED_MARK).read_text().strip() == journal._day(now - 14 * 86400)
    assert journal.prune(out_dir, now=now) == 0

    header, logs = journal.read_entry(str(next((root / journal._day(now)).iterdir())))
    assert logs == b"x" and header["record"]["id"] == task.id

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / journal.DIRNAME).write_text("a file where the journal goes")
    assert journal.add(str(blocked), task, b"x", None, False) == ""  # finalize goes on without it


def test_each_sweep_drops_the_journal_days_past_keeping(pink_config):
    """The web host's sweep job (queue_workers.jobs.sweep) keeps the journal
    bounded, and leaves the days still kept alone."""
    from queue_workers import context, jobs

    now = time.time()
    task = _task("c00000000001", at=now)
    for days in (0, 20):
        journal.add(pink_config.web.output_dir, task, b"x", None, False, now=now - days * 86400)
    context.configure(pink_config.path)
    assert "1 journal days dropped" in jobs.sweep()
    root = Path(journal.directory(pink_config.web.output_dir))
    assert [p.name for p in root.iterdir() if p.is_dir()] == [journal._day(now)]
    assert "0 journal days dropped" in jobs.sweep()


def test_the_sweep_keeps_the_outputs_a_restore_needs(pink_config):
    """Before a restore the archive is empty (the database lost) or old (the
    dump loaded, `recover` not yet run): the sweep must not take every
    output for an orphan. An empty archive removes no output at all; a
    row-less output stays while the journal's days could still bring its row
    back (from any web node's journal: a second copy's task is journaled on
    the node that finalized it); an output whose row says expired, or that
    nothing names past those days, goes."""
    from pink import blob_store
    from queue_workers import context, jobs

    config, now = pink_config, time.time()
    out_dir = Path(config.web.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recent, orphan, expired = (_task(f"d0000000000{i}", at=now) for i in (1, 2, 3))
    ages = {recent.id: blob_store.SWEEP_GRACE + 60, orphan.id: journal.KEEP_DAYS * 86400 + 60,
            expired.id: blob_store.SWEEP_GRACE + 60}
    files = {t.id: out_dir / f"{t.id}-1.tar.zst" for t in (recent, orphan, expired)}
    for task_id, path in files.items():
        path.write_bytes(b"output")
        os.utime(path, (now - ages[task_id], now - ages[task_id]))
    context.configure(config.path)

    assert "0 expired outputs and 0 orphaned files removed" in jobs.sweep()  # an empty archive
    assert all(p.exists() for p in files.values())

    with archive.connection(config.db) as conn:
        assert archive.archive_task(conn, expired, b"x")
        with conn.cursor() as cur:
            cur.execute("UPDATE tasks SET expired_at=%s WHERE id=%s", (now, expired.id))
        conn.commit()
    jobs.sweep()
    assert [t for t, p in files.items() if p.exists()] == [recent.id]


def test_tasks_finalized_after_the_dump_come_back_from_the_journal(api, pink_processes, writer_archive, cluster,
                                                                  root_options, tmp_path):
    """The whole procedure on a running PINK: a dump, tasks finalized after
    it, the restore (PINK's web side stopped, the dump loaded, recover, PINK
    started again), and every task is back with its log and output."""
    config = api.config
    first = api.wait(api.submit(writer_archive, name="before-the-dump").json()["task"]["id"])
    assert first["state"] == "succeeded"
    dump = json.loads(pink_backup("mariadb-dump", "--options-file", root_options, "--database",
                                  config.db.database, "--dir", tmp_path / "backups").stdout)["file"]

    bob = Api(config, make_user(config, "bob"))  # an account made after the dump
    ok = api.wait(api.submit(writer_archive, name="after-ok").json()["task"]["id"])
    failed = api.wait(api.submit(writer_archive, cmd="/no/such/program").json()["task"]["id"])
    bobs = bob.wait(bob.submit(writer_archive, name="bobs").json()["task"]["id"])
    assert (ok["state"], failed["state"], bobs["state"]) == ("succeeded", "failed", "succeeded")
    after = sorted([ok["id"], failed["id"], bobs["id"]])
    before = {t: _archived(config, t) for t in after + [first["id"]]}
    output = api("GET", f"/tasks/{ok['id']}/output").content
    entries = Path(journal.directory(config.web.output_dir))
    assert sorted(p.name for p in entries.rglob("*.rec.zst")) == \
        sorted(f"{t}-1.rec.zst" for t in after + [first["id"]])

    for name in [n for n in pink_processes.started if "runner" not in n]:
        pink_processes.stop(name)
    pink_backup("mariadb-load", dump, "--options-file", root_options)
    for task_id in after:
        assert _archived(config, task_id) == (None, None, [])  # not in the dump
    assert _archived(config, first["id"]) == before[first["id"]]

    report = json.loads(pink_backup("recover", "--config", config.path, "--since", Path(dump).name).stdout)
    assert sorted(report["recovered"]) == after and report["present"] == 1, report
    assert report["missing_users"] == ["bob"] and report["expired"] == []
    for task_id in after:
        assert _archived(config, task_id) == before[task_id]
    assert json.loads(pink_backup("recover", "--config", config.path).stdout)["recovered"] == []

    pink_processes.web()
    pink_processes.worker()
    pink_processes.leader()
    assert api.task(ok["id"])["state"] == "succeeded"
    assert api("GET", f"/tasks/{ok['id']}/output").content == output
    logs = api("GET", f"/tasks/{failed['id']}/logs")
    assert logs.status_code == 200 and before[failed["id"]][1].decode().strip() in logs.text
    assert api.wait(api.submit(writer_archive, name="after-the-restore").json()["task"]["id"])["state"] == \
        "succeeded"


# -- the role and the playbooks ----------------------------------------------------------

def _render(template: str, **variables) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True)
    base = {"ansible_managed": "test", "pink_venv": "/opt/pink", "backup_dir": "/var/backups/pink",
            "backup_keep_days": 14, "backup_mariadb_options_file": "/etc/pink/backup-mariadb.cnf",
            "backup_mariadb_database": "pink", "backup_etcd_endpoint": "https://127.0.0.1:2379",
            "backup_etcd_pki_dir": "/etc/etcd/pki", "backup_mariadb_on_calendar": "*-*-* 03:00:00",
            "backup_etcd_on_calendar": "hourly", "backup_randomized_delay": "10min",
            "backup_mariadb_user": "root", "backup_mariadb_socket": "/run/mysqld/mysqld.sock",
            "backup_mariadb_password": ""}
    return env.from_string((ROLE / "templates" / template).read_text()).render(**{**base, **variables})


def test_the_backup_units_run_pink_backup_as_root_once_per_timer():
    for kind, command in (("mariadb", "mariadb-dump --options-file /etc/pink/backup-mariadb.cnf"),
                          ("etcd", "etcd-snapshot --endpoint https://127.0.0.1:2379 --cacert /etc/etcd/pki/ca.pem "
                                   "--cert /etc/etcd/pki/root.pem --key /etc/etcd/pki/root.key")):
        unit = _render("pink-backup.service.j2", backup_kind=kind)
        assert "Type=oneshot" in unit and "User=root" in unit and "UMask=0077" in unit
        assert "Restart=" not in unit  # a failed backup stays failed for monitoring to see
        execs = re.findall(r"(?m)^ExecStart=(.*)$", unit)
        assert execs == [f"/opt/pink/bin/pink-backup {command} " + execs[0].split(command + " ", 1)[1]]
        assert "--dir /var/backups/pink --keep-days 14" in execs[0] and "password" not in execs[0]
        timer = _render("pink-backup.timer.j2", backup_kind=kind)
        assert "Persistent=true" in timer and "WantedBy=timers.target" in timer
    options = _render("backup-mariadb.cnf.j2")
    assert "[client]" in options and "password" not in options  # root: the unix socket
    assert "password = s3cret-from-a-vault" in _render("backup-mariadb.cnf.j2",
                                                       backup_mariadb_password="s3cret-from-a-vault")
    tasks = (ROLE / "tasks" / "main.yml").read_text()
    assert re.search(r'dest: "\{\{ backup_mariadb_options_file \}\}"\n(.*\n){2}    mode: "0600"', tasks)
    assert (REPO / "setup.cfg").read_text().count("pink-backup = pink.backup_command:main") == 1


def test_the_mariadb_dump_is_consistent_and_complete():
    for flag in ("--single-transaction", "--routines", "--triggers", "--events", "--hex-blob"):
        assert flag in backup.MARIADB_DUMP_FLAGS


@pytest.mark.parametrize("book", ["backup.yml", "restore.yml"])
def test_the_playbooks_pass_ansibles_syntax_check(book):
    playbook = Path(sys.executable).parent / "ansible-playbook"
    if not playbook.exists():
        pytest.skip("ansible-playbook is not installed (pip install '.[deploy]')")
    out = subprocess.run([str(playbook), "--syntax-check", "-i", "ansible/inventory.example.ini",
                          f"ansible/{book}", "-e", "backup_from=backups/x"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_task_deleted_after_its_archive_leaves_a_tombstone_not_its_log(tmp_path):
    """Deleting an archived task (pink.control.delete_archived) rewrites its
    journal entry on the host that holds it as a deleted task's, so a restore
    brings its row back (usage counts it) but never its log, and leaves a
    tombstone there for `redelete`."""
    out_dir = str(tmp_path / "outputs")
    task = _task("b00000000002", at=time.time())
    path = journal.add(out_dir, task, b"a private log", None, False)
    assert os.path.exists(path)
    tombstone = journal.add_deletion(out_dir, task)
    header, logs = journal.read_entry(path)
    assert header["deleted"] and logs == b"" and b"private" not in zstandard.ZstdDecompressor().decompress(
        Path(path).read_bytes())
    assert journal._deletions(journal.directory(out_dir), None) == {task.id: tombstone}
    assert journal.add_deletion(str(tmp_path / "nothing-here"), task)  # no journal yet: made
