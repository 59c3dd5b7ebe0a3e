"""A lost database comes back from a backup (issue 19): `make backup` takes a
dump, tasks go on finishing and one archived task is deleted, then the db
host loses MariaDB's data for good (its data directory is replaced by a new
empty one, as on a reinstalled machine). `make deploy` sets the empty
MariaDB up again and `make restore BACKUP=...` loads the dump and recovers
from the web hosts' journals what finished after it. Every archived task is
back with its log and output, and the one deleted after the dump stays
deleted (its tombstone), as roles/backup/README.md says. The lab must be up.
"""

from __future__ import annotations

import re
import time

import pytest

from devcluster import lab as devlab
from pink.errors import PinkError
from tests.cluster.lab import make

FINALIZED = 240  # seconds for a finished task to reach the archive


def _archived(lab, archive, name: str) -> str:
    """Submit a short task and wait until its row is in MariaDB; its id."""
    task = lab.client.submit(archive, name=name, env={"SECONDS": "1"})["id"]
    assert lab.client.wait(task, patience=120)["state"] == "succeeded"
    deadline = time.monotonic() + FINALIZED
    while not lab.db(f"SELECT id FROM tasks WHERE id = '{task}'"):
        assert time.monotonic() < deadline, f"task {task} never reached the archive"
        time.sleep(1)
    return task


def _lose_the_database(lab) -> None:
    """What a dead disk leaves: MariaDB's data directory gone, a new empty one
    made as the package makes it on a reinstalled machine."""
    lab.sh("db", "systemctl stop mariadb && rm -rf /var/lib/mysql && mkdir /var/lib/mysql "
                 "&& chown mysql:mysql /var/lib/mysql "
                 "&& mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null "
                 "&& systemctl start mariadb")


def _has_pink_db(lab) -> bool:
    out = lab.sh("db", "mariadb --batch --skip-column-names -e \"SHOW DATABASES LIKE 'pink'\"")
    return bool(out.strip())


def _wait_answers(lab, task: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return lab.client.get(task)
        except PinkError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


@pytest.mark.timeout(3600)
def test_a_lost_database_is_restored_with_every_archived_task(lab, archive):
    before = _archived(lab, archive, "restore-before")
    deleted = _archived(lab, archive, "restore-deleted")

    out = make("backup")
    backup = re.search(r"make restore BACKUP=(\S+?)\"?$", out, re.M).group(1)
    assert (devlab.REPO / backup).is_dir(), out[-2000:]

    after = _archived(lab, archive, "restore-after")  # finished after the dump: only the journal has it
    lab.client.cancel(deleted)  # deleted after the dump
    assert lab.db(f"SELECT expired_at IS NOT NULL FROM tasks WHERE id = '{deleted}'") == [["1"]]

    _lose_the_database(lab)
    assert not _has_pink_db(lab), "the database survived its loss"
    make("deploy")
    make("restore", f"BACKUP={backup}")

    rows = dict(lab.db(f"SELECT id, state FROM tasks WHERE id IN ('{before}', '{after}', '{deleted}')"))
    assert rows == {before: "succeeded", after: "succeeded", deleted: "succeeded"}, rows
    for task in (before, after):
        got = _wait_answers(lab, task)
        assert got["state"] == "succeeded" and not got.get("expired_at"), got
        assert lab.db(f"SELECT COUNT(*) FROM task_logs WHERE task_id = '{task}'") != [["0"]], task
        assert lab.client.download(task, devlab.LAB_DIR / f"restored-{task}.tar"), task
    assert lab.db(f"SELECT deleted_at IS NOT NULL, expired_at IS NOT NULL FROM tasks WHERE id = '{deleted}'") \
        == [["1", "1"]], "the task deleted after the dump came back"
    assert lab.db(f"SELECT COUNT(*) FROM task_logs WHERE task_id = '{deleted}'") == [["0"]]
    listed = {t["id"] for t in lab.client.page(limit=50)[0]}
    assert {before, after} <= listed and deleted not in listed
    _archived(lab, archive, "restore-again")  # and PINK goes on archiving
