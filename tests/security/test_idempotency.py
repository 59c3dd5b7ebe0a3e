"""Safe retries: every door that creates a task honours an Idempotency-Key
header (issue 18), so a client that got 502/503/504 can send again."""

from __future__ import annotations

import base64
import threading
import uuid

from pink import control, idempotency, image_archive, lifecycle, possession, recipes
from pink.fate import Archived
from pink.store import Store
from pink.tasks import Params, new_id, new_record
from tests.helpers import Api, make_user

HEADER = "Idempotency-Key"


def _key() -> dict:
    return {HEADER: str(uuid.uuid4())}


def _submit(api: Api, archive, headers: dict, **params):
    with open(archive, "rb") as fh:
        return api("POST", "/tasks", params=params, data=fh,
                   headers={"Content-Type": "application/x-tar", **headers})


def _tasks_of(store: Store, user: str) -> list[str]:
    return [r.key.rsplit("/", 1)[1] for r in store.list(store.keys.owned(user))]


def test_a_retried_submit_makes_one_task(web, writer_archive):
    """A user retrying a submit with the same Idempotency-Key gets the first task
    back (200, same body shape as the 201) and never a second task; the key is
    remembered for a day (its etcd lease), per user, and bound to the request's
    parameters (422 for others)."""
    alice = Api(web, make_user(web, "alice"))
    store = Store.from_config(web)
    key = _key()
    first = _submit(alice, writer_archive, key, name="once")
    assert first.status_code == 201, first.text
    again = _submit(alice, writer_archive, key, name="once")
    assert again.status_code == 200, again.text
    assert again.json()["task"]["id"] == first.json()["task"]["id"]
    assert set(again.json()["task"]) == set(first.json()["task"])
    assert _tasks_of(store, "alice") == [first.json()["task"]["id"]]  # exactly one record

    other = _submit(alice, writer_archive, key, name="twice")
    assert other.status_code == 422 and HEADER in other.json()["message"], other.text

    bob = Api(web, make_user(web, "bob"))
    theirs = _submit(bob, writer_archive, key, name="once")  # keys are per user
    assert theirs.status_code == 201 and theirs.json()["task"]["id"] != first.json()["task"]["id"]

    entries = store.list(store.keys.idempotencies("alice"))
    assert len(entries) == 1 and entries[0].value["task"] == first.json()["task"]["id"]
    left, granted = store.lease_ttl(entries[0].lease)
    assert granted == idempotency.TTL == 86400 and 86000 < left <= 86400


def test_concurrent_requests_with_one_key_make_one_task(web, writer_archive):
    """Two requests with one key at once (a client that retried too early) make
    exactly one task: both answers name it."""
    alice = Api(web, make_user(web, "alice"))
    key, answers = _key(), []
    go = threading.Barrier(3)

    def send():
        go.wait()
        answers.append(_submit(alice, writer_archive, key))

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in answers) == [200, 200, 201], [r.text for r in answers]
    assert len({r.json()["task"]["id"] for r in answers}) == 1
    assert len(_tasks_of(Store.from_config(web), "alice")) == 1


def test_bad_keys_are_refused_clearly(web, writer_archive):
    """A malformed Idempotency-Key is refused with 400 saying what a key may be,
    before anything is stored."""
    alice = Api(web, make_user(web, "alice"))
    for bad in ("k" * 256, "caf\u00e9"):
        r = _submit(alice, writer_archive, {HEADER: bad})
        assert r.status_code == 400 and "1 to 255 printable ASCII" in r.json()["message"], r.text
    assert _tasks_of(Store.from_config(web), "alice") == []
    assert _submit(alice, writer_archive, {HEADER: "k" * 255}).status_code == 201


def test_rerun_and_upload_commit_honour_the_key(web, writer_archive):
    """The rerun and upload-session commit doors make one task per key as well."""
    alice = Api(web, make_user(web, "alice"))
    store = Store.from_config(web)
    source = _submit(alice, writer_archive, {}).json()["task"]["id"]
    key = _key()
    runs = [alice("POST", f"/tasks/{source}/rerun", params={"name": "again"}, headers=key) for _ in range(2)]
    assert [r.status_code for r in runs] == [201, 200], [r.text for r in runs]
    assert runs[0].json()["task"]["id"] == runs[1].json()["task"]["id"]
    assert alice("POST", f"/tasks/{source}/rerun", params={"name": "other"}, headers=key).status_code == 422

    info = image_archive.inspect(writer_archive)
    recipe, where = recipes.Recipe.from_archive(writer_archive, info)
    with open(writer_archive, "rb") as fh:
        def blob(digest):
            fh.seek(where[digest][0])
            return fh.read(where[digest][1])
        plan = alice("POST", "/uploads", json={
            "config": base64.b64encode(blob(recipe.config)).decode(), "layout": info.layout,
            "layers": [{"digest": d, "size": recipe.sizes[d]} for d in recipe.layers],
            "repo_tags": list(recipe.repo_tags)}).json()
        proofs = {d: possession.proof(lambda o, n, d=d: (fh.seek(where[d][0] + o), fh.read(n))[1], c)
                  for d, c in plan["challenges"].items()}
    key = _key()
    commits = [alice("POST", f"/uploads/{plan['upload']}/commit", json={"proofs": proofs}, headers=key)
               for _ in range(2)]  # the second after the first closed the session
    assert [r.status_code for r in commits] == [201, 200], [r.text for r in commits]
    assert commits[0].json()["task"]["id"] == commits[1].json()["task"]["id"]
    assert len(_tasks_of(store, "alice")) == 3  # the source, one rerun, one commit


def test_idempotency_keys_stay_bounded_per_user(pink_config):
    """A user cannot pile up Idempotency-Keys in etcd beyond live_tasks_per_user
    (shipped 500) by submitting and finishing tasks: past it, each new key
    replaces their oldest one, and a submit is never refused for keys."""
    limit = pink_config.limits.live_tasks_per_user
    assert limit == 500
    store = Store.from_config(pink_config)
    claims = [idempotency.claim(f"key-{n}", "submit", params={}) for n in range(limit + 3)]
    for claim in claims:
        record = new_record(new_id(), "fay", Params(), {"sha256": "0" * 64, "size": 1}, "web1")
        assert control.create(store, pink_config, record, claim) == (record.id, True)
        _archived(store, store.get(store.keys.task(record.id)))  # finished: its key stays a day
    kept = store.list(store.keys.idempotencies("fay"))
    assert len(kept) == limit
    assert store.get(store.keys.idempotency("fay", claims[0].digest)) is None  # the oldest went first
    assert store.get(store.keys.idempotency("fay", claims[-1].digest)) is not None


def _archived(store, rec):
    """Remove the record as finalize does once the archive row is written."""
    return lifecycle.apply(store, rec, Archived(rec.value.attempt, rec.value.state))
