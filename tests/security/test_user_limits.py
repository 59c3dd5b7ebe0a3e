"""etcd filled by one user: per-user limits on live tasks and record sizes,
checked at the cost of the user's own tasks (issue 18)."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from pink import archive, control, db, image_archive, lifecycle, recipes
from pink.config import LimitsConfig
from pink.errors import BadRequest, TooManyRequests
from pink.fate import Archived
from pink.store import Store
from pink.tasks import Params, new_id, new_record
from tests.helpers import Api, make_user

IMAGE = {"sha256": "0" * 64, "size": 1000}


def _record(user: str, **params):
    return new_record(new_id(), user, Params(**params), dict(IMAGE), "web1")


def test_one_user_cannot_fill_etcd_with_reruns(control_plane, pink_config, writer_archive):
    """A user cannot fill etcd's quota (which would stop the whole cluster) with
    reruns, which need no upload: at live_tasks_per_user, shipped as 500, their
    next task is refused with 429 naming the limit, concurrent reruns never pass
    it, and another user can still submit."""
    limit = LimitsConfig().live_tasks_per_user
    assert pink_config.limits.live_tasks_per_user == limit == 500  # the shipped default, not a test's
    alice = control_plane
    first = alice.submit(writer_archive)
    assert first.status_code == 201, first.text
    first_id = first.json()["task"]["id"]

    def rerun(_):
        return alice("POST", f"/tasks/{first_id}/rerun").status_code

    with ThreadPoolExecutor(4) as pool:  # one user's reruns at once: the count is compared, not raced
        codes = list(pool.map(rerun, range(limit + 20)))
    assert codes.count(201) == limit - 1 and codes.count(429) == 21, sorted(set(codes))
    refused = alice("POST", f"/tasks/{first_id}/rerun")
    assert refused.status_code == 429
    assert "500 live tasks (live_tasks_per_user = 500)" in refused.json()["message"], refused.text
    assert alice.submit(writer_archive).status_code == 429  # every door counts the same tasks
    store = Store.from_config(pink_config)
    assert len(store.list(store.keys.owned("alice"))) == limit
    bob = Api(pink_config, make_user(pink_config, "bob"))
    assert bob.submit(writer_archive).status_code == 201


def test_parameters_over_record_bytes_are_refused(pink_config):
    """A user cannot put more than record_bytes (shipped 64 KiB) of parameters
    into one etcd record: such a task is refused with 400 naming the limit, and
    nothing is written."""
    assert pink_config.limits.record_bytes == LimitsConfig().record_bytes == 64 * 2**10
    store = Store.from_config(pink_config)
    big = _record("carol", env={"DATA": "x" * 70_000})
    with pytest.raises(BadRequest) as refused:
        control.create(store, pink_config, big, None)
    assert "record_bytes = 65536" in refused.value.message and refused.value.status == 400
    assert store.get(store.keys.task(big.id)) is None and store.list(store.keys.owned("carol")) == []
    fits = _record("carol", env={"DATA": "x" * 60_000})
    assert control.create(store, pink_config, fits, None) == (fits.id, True)


def _blob(archive, where: tuple[int, int]) -> bytes:
    with open(archive, "rb") as fh:
        fh.seek(where[0])
        return fh.read(where[1])


def test_image_tags_are_truncated_not_stored_whole(web, writer_archive):
    """A user cannot make each task record ~100 KB with image tags: an image
    named by 100 tags of 500 characters is accepted, and its record keeps at
    most 16 tags of at most 256 characters (and a recipe that agrees)."""
    api = Api(web, make_user(web, "dora"))
    info = image_archive.inspect(writer_archive)
    recipe, where = recipes.Recipe.from_archive(writer_archive, info)
    tags = [f"pink/t{n:03d}-{'x' * 480}:v" for n in range(recipes.MAX_TAGS - 5)] + [
        f"pink/short{n}:v" for n in range(5)]
    plan = api("POST", "/uploads", json={
        "config": base64.b64encode(_blob(writer_archive, where[recipe.config])).decode(),
        "layout": info.layout, "repo_tags": tags,
        "layers": [{"digest": d, "size": recipe.sizes[d]} for d in recipe.layers]})
    assert plan.status_code == 201, plan.text
    upload = plan.json()["upload"]
    for digest in plan.json()["missing"]:
        r = api("PUT", f"/uploads/{upload}/blobs/{digest}", data=_blob(writer_archive, where[digest]))
        assert r.status_code == 201, r.text
    made = api("POST", f"/uploads/{upload}/commit", json={"proofs": {}})
    assert made.status_code == 201, made.text
    task = made.json()["task"]
    assert task["image"]["repo_tags"] == [f"pink/short{n}:v" for n in range(5)]
    store = Store.from_config(web)
    record = store.get(store.keys.task(task["id"])).value
    kept = recipes.Recipe.from_dict(record.image["recipe"])  # still valid: key and tags agree
    assert kept.repo_tags == tuple(task["image"]["repo_tags"]) and record.image["sha256"] == kept.key
    assert len(json.dumps(record.to_json())) < 16_000  # not the ~100 KB the tags would have taken


def test_the_limit_check_reads_only_the_users_own_tasks(pink_config):
    """A submit does not cost more as other users' live tasks grow: the per-user
    checks read the user's own index entries (and, for queued_per_user, their own
    records), never the other users' tasks; an archived task leaves the index."""
    store = Store.from_config(pink_config)
    for n in range(300):
        control.create(store, pink_config, _record(f"other{n % 30}"), None)
    mine = [_record("erin") for _ in range(3)]
    for record in mine:
        control.create(store, pink_config, record, None)

    store.keys_read = 0
    control.create(store, pink_config, _record("erin"), None)
    assert store.keys_read <= 4 + 1, store.keys_read  # erin's 4 index entries and her gate, of 304 tasks

    pink_config.limits.queued_per_user = 100
    store.keys_read = 0
    control.create(store, pink_config, _record("erin"), None)
    assert store.keys_read <= 2 * 5 + 1, store.keys_read  # her index and her own 5 records
    pink_config.limits.queued_per_user = 3
    with pytest.raises(TooManyRequests, match="queued_per_user = 3"):
        control.create(store, pink_config, _record("erin"), None)

    assert control.limits_of(store, pink_config, "erin")["live_tasks_per_user"] == {"limit": 500, "used": 5}
    _archived(store, store.get(store.keys.task(mine[0].id)))
    assert store.get(store.keys.owner("erin", mine[0].id)) is None
    assert control.holdings(store, "erin").live == 4


def test_index_entries_an_older_leader_left_do_not_hold_the_user_back(pink_config):
    """A user at live_tasks_per_user whose index still lists tasks an older
    process retired without their entry (a rolling upgrade) is not refused for
    them: the check drops entries whose record is gone, and counts the rest."""
    store = Store.from_config(pink_config)
    pink_config.limits.live_tasks_per_user = 4
    records = [_record("fay") for _ in range(4)]
    for record in records:
        control.create(store, pink_config, record, None)
    for record in records[:2]:  # retired as a version without the index did: the record alone
        assert store.txn().delete(store.keys.task(record.id)).commit()
    control.create(store, pink_config, _record("fay"), None)
    assert store.get(store.keys.owner("fay", records[0].id)) is None
    assert control.holdings(store, "fay").live == 3
    control.create(store, pink_config, _record("fay"), None)
    with pytest.raises(TooManyRequests, match="live_tasks_per_user = 4"):
        control.create(store, pink_config, _record("fay"), None)


def test_a_page_of_the_biggest_records_reads_back(pink_config):
    """Records as big as one user may make them (parameters at record_bytes plus
    image metadata) still list in pages: gRPC's default 4 MiB answer limit
    would fail a page of them, and with it every listing of live tasks."""
    store = Store.from_config(pink_config)
    big = "x" * (LimitsConfig().record_bytes - 1024)
    for n in range(120):
        assert store.txn().put(f"{pink_config.etcd.prefix}/big/{n:04d}", {"v": big}).commit()
    assert len(store.list(f"{pink_config.etcd.prefix}/big/")) == 120


def _archived(store, rec):
    """Remove the record as finalize does once the archive row is written."""
    return lifecycle.apply(store, rec, Archived(rec.value.attempt, rec.value.state))


def test_a_users_task_list_reads_only_their_own_live_tasks(pink_config):
    """`GET /tasks` does not cost more as other users' queues grow: a user's
    page reads their index and their own records, never the other live tasks;
    an admin's listing of everyone still shows the whole queue."""
    store = Store.from_config(pink_config)
    for n in range(200):
        control.create(store, pink_config, _record(f"crowd{n % 20}"), None)
    mine = [_record("fay") for _ in range(3)]
    for record in mine:
        control.create(store, pink_config, record, None)
    conn = db.connect(pink_config.db)
    try:
        db.migrate(conn)  # the archive's tables (pink-web makes them as it starts)
        store.keys_read = 0
        page, _ = control.history_page(store, conn, archive.Query(user="fay"))
        assert store.keys_read <= 2 * 3, store.keys_read  # her 3 index entries and her 3 records, of 203
        assert sorted(t.id for t in page) == sorted(r.id for r in mine)
        everyone, _ = control.history_page(store, conn, archive.Query(user=None, limit=500))
        assert {r.id for r in mine} <= {t.id for t in everyone} and len(everyone) >= 203
    finally:
        conn.close()
