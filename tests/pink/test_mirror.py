"""The leader's mirror of etcd (`pink.store.Mirror`), against a real etcd:
it follows every change of the parts it holds, at one revision, and reads
everything again once its watch has failed. And what the store does with a
record that is not what its key should hold."""

from __future__ import annotations

import threading
import time

import pytest

from pink.errors import PinkError, Unavailable
from devcluster.ports import free_port
from devcluster.processes import wait_until
from pink.store import ENDPOINT_RETRY, Store
from pink.tasks import Params, new_record


def _task(task_id: str, name: str):
    return new_record(task_id, "alice", Params(name=name), {"sha256": "0" * 64, "size": 10}, "web1")


def test_a_mirror_follows_etcd_and_holds_only_its_parts(pink_config):
    store = Store.from_config(pink_config)
    keys = store.keys
    store.txn().put(keys.task("a"), _task("a", "one")).commit()
    changed = threading.Event()
    mirror = store.mirror((keys.tasks, keys.nodes), changed.set)
    try:
        mirror.fresh()
        assert [r.value.name for r in mirror.snapshot()[keys.tasks]] == ["one"]
        before = store.get(keys.task("a"))
        store.txn().put(keys.task("a"), _task("a", "two")).put(keys.node("r1"), {"name": "r1"}).commit()
        store.txn().put(keys.leader, {"holder": "x"}).put(keys.control("r1"), {"state": "stopped"}).commit()
        assert mirror.wait_past([(keys.task("a"), before.mod_revision)], 10)
        snap = mirror.snapshot()
        assert [r.value.name for r in snap[keys.tasks]] == ["two"]  # typed as the store reads it
        node = store.get(keys.node("r1"))
        assert [(r.key, r.create_revision) for r in snap[keys.nodes]] == [(node.key, node.create_revision)]
        assert set(snap) == {keys.tasks, keys.nodes}  # the leader key and controls were not asked for
        assert changed.is_set()

        current = store.get(keys.task("a"))
        store.delete(keys.task("a"))
        assert mirror.wait_past([(keys.task("a"), current.mod_revision)], 10)
        assert mirror.snapshot()[keys.tasks] == []
        assert not mirror.stale
    finally:
        mirror.close()
        store.close()


def test_a_mirror_reads_everything_again_once_its_watch_fails(pink_config, cluster):
    store = Store.from_config(pink_config)
    keys = store.keys
    changed = threading.Event()
    mirror = store.mirror((keys.tasks,), changed.set)
    try:
        mirror.fresh()
        changed.clear()
        cluster.kill("etcd")
        cluster.start_etcd()
        assert wait_until(lambda: mirror.stale, 30), "the mirror did not notice its watch failing"
        assert changed.is_set()  # the leader is woken to read again
        # Written while the mirror had no watch: only a fresh read can see it.
        assert wait_until(lambda: store.txn().put(keys.task("b"), _task("b", "one")).commit(), 30)
        mirror.fresh()
        assert [r.key for r in mirror.snapshot()[keys.tasks]] == [keys.task("b")]
        before = store.get(keys.task("b"))
        store.txn().put(keys.task("b"), _task("b", "two")).commit()
        assert mirror.wait_past([(keys.task("b"), before.mod_revision)], 10)  # and it watches again
        assert [r.value.name for r in mirror.snapshot()[keys.tasks]] == ["two"]
    finally:
        mirror.close()
        store.close()


def test_a_malformed_task_record_is_skipped_not_fatal(pink_config):
    """A record written by hand or by a bug must not stop the leader's
    passes or every listing: lists and the mirror skip it, a read names it."""
    store = Store.from_config(pink_config)
    keys = store.keys
    store.txn().put(keys.task("good"), _task("good", "fine")).put(keys.task("bad"), {"id": "bad"}).commit()
    mirror = store.mirror((keys.tasks,), lambda: None)
    try:
        assert [r.value.id for r in store.list(keys.tasks)] == ["good"]
        mirror.fresh()
        assert [r.value.id for r in mirror.snapshot()[keys.tasks]] == ["good"]
        with pytest.raises(PinkError) as caught:
            store.get(keys.task("bad"))
        assert caught.value.code == "malformed_record" and keys.task("bad") in caught.value.message
    finally:
        mirror.close()
        store.close()


def test_a_read_goes_to_another_member_when_the_first_is_gone(pink_config):
    """pyetcd raises for the call that finds a member dead and only moves on at the next; a read
    retries once, so the first read after a member dies still answers (a write does not retry)."""
    etcd = pink_config.etcd
    seeded = Store.from_config(pink_config)
    seeded.txn().put(seeded.keys.task("f"), _task("f", "failover")).commit()
    seeded.close()
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there
    for _ in range(8):  # pyetcd starts at a random member: 8 new clients all miss the dead one 1 time in 256
        store = Store([gone, *etcd.endpoints], etcd.prefix, ca=etcd.ca, cert=etcd.cert, key=etcd.key)
        try:
            assert store.get(store.keys.task("f")).value.name == "failover"
        finally:
            store.close()


def test_a_write_that_found_a_member_dead_moves_the_client_off_it(pink_config):
    """A process that writes less often than pyetcd's failure mark lasts (a leader
    campaigning once a second) is not sent back to the dead member for ever: the
    write that failed there moved the client to a live one (the lab's web1 kill
    left web2's leader failing for minutes)."""
    etcd = pink_config.etcd
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there
    store = Store([gone, *etcd.endpoints], etcd.prefix, ca=etcd.ca, cert=etcd.cert, key=etcd.key)
    try:
        for write in (lambda: store.lease(10).revoke(), lambda: store.grant(10)):  # a campaign's, a submit's
            store._client._current_endpoint_label = gone  # as if it had picked the member that died
            with pytest.raises(Unavailable):
                write()
            time.sleep(ENDPOINT_RETRY + 0.2)  # the dead member's mark has lapsed
            write()
    finally:
        store.close()


def test_a_watch_is_cancelled_even_after_the_client_moved_members(pink_config):
    """A watch made before a call failed on a member (pyetcd then makes a new
    watcher) is still cancelled by its cancel, not left streaming for ever."""
    etcd = pink_config.etcd
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there
    store = Store([*etcd.endpoints, gone], etcd.prefix, ca=etcd.ca, cert=etcd.cert, key=etcd.key)
    try:
        store._client._current_endpoint_label = etcd.endpoints[0]
        woken = threading.Event()
        cancel = store.watch_prefix(store.keys.prefix + "/moved/", woken.set)
        store._client._current_endpoint_label = gone  # a call now fails there, and the client moves
        with pytest.raises(Unavailable):
            store.grant(10)
        cancel()
        store.txn().put(store.keys.prefix + "/moved/x", {"v": 1}).commit()
        assert not woken.wait(2.0), "the cancelled watch still delivered a change"
    finally:
        store.close()


def test_a_watch_without_deletes_is_woken_by_writes_only(pink_config):
    """The runner watches its assignments with `deletes=False`: a task leaving
    it needs no new read, and etcd leaves those events out."""
    store = Store.from_config(pink_config)
    prefix = store.keys.assignments("watched")
    calls = []
    cancel = store.watch_prefix(prefix, lambda: calls.append(1), deletes=False)
    try:
        store.txn().put(prefix + "a", {"task": "a"}).commit()
        assert wait_until(lambda: len(calls) == 1, timeout=10)
        store.delete(prefix + "a")
        store.txn().put(prefix + "b", {"task": "b"}).commit()
        assert wait_until(lambda: len(calls) >= 2, timeout=10)
        threading.Event().wait(0.5)  # events come in revision order: a deletion's would have come before
        assert len(calls) == 2
    finally:
        cancel()
        store.delete(prefix + "b")
        store.close()
