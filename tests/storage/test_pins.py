"""Pins, garbage collection and retention (storage.pins), on the real on-disk blockstore."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.blockstore import BaseBlockstore, Blockstore
from storage.cid import Cid
from storage.pins import PinStore, collect_garbage, reachable

EMPTY_LOG = {"logs/stdout.log": b"", "logs/stderr.log": b""}


@pytest.fixture(params=["packs", "files"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BaseBlockstore]:
    made = Blockstore(tmp_path / "blocks", layout=request.param)
    yield made
    made.close()


@pytest.fixture()
def pins(tmp_path: Path) -> Iterator[PinStore]:
    p = PinStore(tmp_path / "pins.sqlite")
    yield p
    p.close()


def test_labels_are_reasons_and_the_last_one_out_unpins(
    pins: PinStore, store: BaseBlockstore
) -> None:
    cid = store.add_bytes(b"shared result")
    assert pins.pin(cid, "job:a")
    assert not pins.pin(cid, "job:a")  # the same reason twice is one pin
    assert pins.pin(cid, "job:b")
    assert pins.unpin_label("job:a") == ([cid], [])
    assert pins.is_pinned(cid)
    assert pins.unpin_label("job:b") == ([cid], [cid])
    assert not pins.is_pinned(cid)
    assert pins.unpin(cid) == []
    with pytest.raises(ValueError):
        pins.pin(cid, "")


def test_pins_survive_a_restart(tmp_path: Path, store: BaseBlockstore) -> None:
    cid = store.add_bytes(b"durable")
    first = PinStore(tmp_path / "p.sqlite")
    first.pin(cid, "user", expires=False)
    first.close()
    again = PinStore(tmp_path / "p.sqlite")
    [pin] = again.pins()
    assert (pin.cid, pin.label, pin.expires) == (cid, "user", False)
    again.close()


def test_gc_keeps_pinned_dags_and_blocks_they_share(pins: PinStore, store: BaseBlockstore) -> None:
    a = store.add_tree({"output.json": b'{"job": "a"}', **EMPTY_LOG})
    b = store.add_tree({"output.json": b'{"job": "b"}', **EMPTY_LOG})
    pins.pin(a, "job:a")
    pins.pin(b, "job:b")
    kept = set(store.iter_cids())
    loose = store.add_bytes(random.Random(4).randbytes(600_000))  # 3 leaves and a root
    # An hour later, every block is past the grace period.
    stats = collect_garbage(store, pins.roots(), grace_seconds=60, now=time.time() + 3600)
    assert stats.removed == 4
    assert 600_000 < stats.freed_bytes < 601_000
    assert not store.has(loose)
    assert set(store.iter_cids()) == kept
    # Deleting job a: only a's own blocks go; the empty log file b also uses stays.
    _, orphans = pins.unpin_label("job:a")
    assert orphans == [a]
    candidates = list(reachable(store, [a]).values())
    stats = collect_garbage(store, pins.roots(), candidates=candidates)
    assert stats.removed == 2  # a's directory node and its output.json
    assert store.read_tree(b) == {"output.json": b'{"job": "b"}', **EMPTY_LOG}
    assert store.missing_blocks(a)


def test_young_blocks_are_spared(pins: PinStore, store: BaseBlockstore) -> None:
    fresh = store.add_bytes(b"just written, root not pinned yet")
    stats = collect_garbage(store, pins.roots(), grace_seconds=60)
    assert (stats.removed, stats.spared_young) == (0, 1)
    assert store.has(fresh)
    assert collect_garbage(store, pins.roots(), grace_seconds=0).removed == 1


def test_retention_expires_only_expiring_pins_older_than_it(
    pins: PinStore, store: BaseBlockstore
) -> None:
    now = time.time()
    old = store.add_bytes(b"old result")
    new = store.add_bytes(b"new result")
    kept = store.add_bytes(b"pinned by hand")
    pins.pin(old, "job:old", now=now - 8 * 86400)
    pins.pin(new, "job:new", now=now - 86400)
    pins.pin(kept, "user", expires=False, now=now - 30 * 86400)
    expired = pins.expire(7 * 86400, now=now)
    assert [(p.cid, p.label) for p in expired] == [(old, "job:old")]
    collect_garbage(store, pins.roots())
    assert not store.has(old)
    assert store.has(new) and store.has(kept)


def test_remote_queue_latest_wish_wins(pins: PinStore) -> None:
    cid = Cid.decode("bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e")
    pins.queue_remote(cid, "publish")
    pins.remote_failed(cid, "publish", "daemon down")
    [task] = pins.remote_pending()
    assert (task.op, task.attempts, task.last_error) == ("publish", 1, "daemon down")
    pins.queue_remote(cid, "unpin")
    [task] = pins.remote_pending()
    assert (task.op, task.attempts) == ("unpin", 0)
    pins.remote_done(cid, "publish", 1.0)  # a stale completion changes nothing
    assert pins.remote_pending()
    pins.remote_done(cid, "unpin", 0.1)
    assert pins.remote_pending() == []
    assert pins.remote_counts() == {"pending": 0, "done": 1}
