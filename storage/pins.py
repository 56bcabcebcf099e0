"""Pins and garbage collection for a blockstore.

A pin is a (root CID, label) pair: the whole DAG under the root is kept
while at least one label holds it. Labels say *why* something is kept
("job:<id>" for a job's result, "added" for what the user stored, "user" for
an explicit pin), so deleting a job drops only its own reason and content
shared with another job or an explicit pin survives. Pins subject to
retention expire `retention` seconds after they were made; explicit pins do
not.

Garbage collection is mark and sweep: mark every block reachable from the
pinned roots (plus any roots the caller is still working on), then delete
the rest. Blocks younger than `grace_seconds` are spared, so a block written a
moment ago by an import or a fetch whose root is not pinned *yet* is not
swept out from under it.

The pin set lives in SQLite next to the blocks: it must survive a crash as
well as the blocks do, and a second table queues work for a remote IPFS
daemon (publish or unpin) so none of it is forgotten when the daemon is down.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from storage.blockstore import BaseBlockstore
from storage.cid import RAW, Cid
from storage.errors import StorageError
from storage.unixfs import block_links

__all__ = [
    "GcStats",
    "Pin",
    "PinStore",
    "RemoteOp",
    "collect_garbage",
    "reachable",
]

RemoteOp = Literal["publish", "unpin"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pins (
    cid TEXT NOT NULL,
    label TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (cid, label)
);
CREATE INDEX IF NOT EXISTS pins_label ON pins(label);
CREATE TABLE IF NOT EXISTS remote (
    cid TEXT PRIMARY KEY,
    op TEXT NOT NULL,
    queued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    done_at REAL,
    seconds REAL
);
"""


@dataclass(frozen=True, slots=True)
class Pin:
    cid: Cid
    label: str
    created_at: float
    expires: bool


@dataclass(frozen=True, slots=True)
class RemoteTask:
    cid: Cid
    op: RemoteOp
    queued_at: float
    attempts: int
    last_error: str | None
    done_at: float | None
    seconds: float | None


class PinStore:
    """The pin set and the remote-daemon queue, in one SQLite file.

    Safe to share between threads (the node calls it from the event loop and
    from worker threads); each call is one short transaction.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    # ---- pins ------------------------------------------------------------------

    def pin(self, cid: Cid, label: str, *, expires: bool = True, now: float | None = None) -> bool:
        """Pin `cid` for `label`; False if that exact pin existed (its age is kept)."""
        if not label:
            raise ValueError("a pin needs a label")
        with self._tx() as cur:
            cur.execute(
                "INSERT OR IGNORE INTO pins(cid, label, created_at, expires) VALUES (?,?,?,?)",
                (str(cid), label, time.time() if now is None else now, int(expires)),
            )
            return cur.rowcount == 1

    def unpin(self, cid: Cid, label: str | None = None) -> list[Cid]:
        """Drop one label's pin (or every pin) of `cid`; returns CIDs left with no pin."""
        with self._tx() as cur:
            if label is None:
                cur.execute("DELETE FROM pins WHERE cid = ?", (str(cid),))
            else:
                cur.execute("DELETE FROM pins WHERE cid = ? AND label = ?", (str(cid), label))
            return self._orphans(cur, [str(cid)] if cur.rowcount else [])

    def unpin_label(self, label: str) -> tuple[list[Cid], list[Cid]]:
        """Drop every pin held by `label`: (CIDs it pinned, those now unpinned altogether)."""
        with self._tx() as cur:
            rows = cur.execute("SELECT cid FROM pins WHERE label = ?", (label,)).fetchall()
            cur.execute("DELETE FROM pins WHERE label = ?", (label,))
            texts = [row[0] for row in rows]
            return [Cid.decode(t) for t in texts], self._orphans(cur, texts)

    def expire(self, retention_seconds: float, *, now: float | None = None) -> list[Pin]:
        """Drop expiring pins older than the retention period; returns the dropped pins."""
        cutoff = (time.time() if now is None else now) - retention_seconds
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT cid, label, created_at, expires FROM pins "
                "WHERE expires = 1 AND created_at < ?",
                (cutoff,),
            ).fetchall()
            cur.execute("DELETE FROM pins WHERE expires = 1 AND created_at < ?", (cutoff,))
        return [Pin(Cid.decode(c), label, at, bool(e)) for c, label, at, e in rows]

    @staticmethod
    def _orphans(cur: sqlite3.Cursor, texts: list[str]) -> list[Cid]:
        orphans = []
        for text in dict.fromkeys(texts):
            if cur.execute("SELECT 1 FROM pins WHERE cid = ? LIMIT 1", (text,)).fetchone() is None:
                orphans.append(Cid.decode(text))
        return orphans

    def is_pinned(self, cid: Cid) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM pins WHERE cid = ? LIMIT 1", (str(cid),))
            return row.fetchone() is not None

    def pins(self, cid: Cid | None = None, label: str | None = None) -> list[Pin]:
        query = "SELECT cid, label, created_at, expires FROM pins"
        clauses: list[str] = []
        args: list[str] = []
        if cid is not None:
            clauses.append("cid = ?")
            args.append(str(cid))
        if label is not None:
            clauses.append("label = ?")
            args.append(label)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at, cid, label", args).fetchall()
        return [Pin(Cid.decode(c), lbl, at, bool(e)) for c, lbl, at, e in rows]

    def roots(self) -> list[Cid]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT cid FROM pins").fetchall()
        return [Cid.decode(row[0]) for row in rows]

    # ---- remote daemon queue ------------------------------------------------------

    def queue_remote(self, cid: Cid, op: RemoteOp, *, now: float | None = None) -> None:
        """Ask for `cid` to be published to (or unpinned from) the remote daemon.

        One row per CID: the latest wish wins, so a publish followed by an
        unpin before the daemon came back does nothing at all on the daemon.
        """
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO remote(cid, op, queued_at) VALUES (?,?,?) "
                "ON CONFLICT(cid) DO UPDATE SET op = excluded.op, queued_at = excluded.queued_at,"
                " attempts = 0, last_error = NULL, done_at = NULL, seconds = NULL",
                (str(cid), op, time.time() if now is None else now),
            )

    def remote_pending(self, limit: int = 100) -> list[RemoteTask]:
        with self._lock:
            rows = self._db.execute(
                "SELECT cid, op, queued_at, attempts, last_error, done_at, seconds FROM remote "
                "WHERE done_at IS NULL ORDER BY queued_at LIMIT ?",
                (limit,),
            ).fetchall()
        return [_task(row) for row in rows]

    def remote_task(self, cid: Cid) -> RemoteTask | None:
        with self._lock:
            row = self._db.execute(
                "SELECT cid, op, queued_at, attempts, last_error, done_at, seconds FROM remote "
                "WHERE cid = ?",
                (str(cid),),
            ).fetchone()
        return None if row is None else _task(row)

    def remote_done(self, cid: Cid, op: RemoteOp, seconds: float) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE remote SET done_at = ?, seconds = ?, last_error = NULL "
                "WHERE cid = ? AND op = ? AND done_at IS NULL",
                (time.time(), seconds, str(cid), op),
            )

    def remote_failed(self, cid: Cid, op: RemoteOp, error: str) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE remote SET attempts = attempts + 1, last_error = ? "
                "WHERE cid = ? AND op = ? AND done_at IS NULL",
                (error[:1000], str(cid), op),
            )

    def remote_counts(self) -> dict[str, int]:
        with self._lock:
            pending, done = self._db.execute(
                "SELECT COALESCE(SUM(done_at IS NULL), 0), COALESCE(SUM(done_at IS NOT NULL), 0) "
                "FROM remote"
            ).fetchone()
        return {"pending": int(pending), "done": int(done)}


def _task(row: tuple[str, str, float, int, str | None, float | None, float | None]) -> RemoteTask:
    cid, op, queued_at, attempts, last_error, done_at, seconds = row
    kind: RemoteOp = "unpin" if op == "unpin" else "publish"
    return RemoteTask(Cid.decode(cid), kind, queued_at, attempts, last_error, done_at, seconds)


# ---- garbage collection -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GcStats:
    marked: int
    removed: int
    freed_bytes: int
    spared_young: int
    seconds: float


def reachable(store: BaseBlockstore, roots: Iterable[Cid]) -> dict[bytes, Cid]:
    """The blocks under `roots` that are present here, by multihash.

    Keyed by multihash because a v0 and a v1 link name the same bytes.
    Absent blocks end the walk below them (there is nothing to keep), and so
    do blocks that fail to decode or verify: a corrupt block protects nothing.
    """
    seen: dict[bytes, Cid] = {}
    stack = list(roots)
    while stack:
        cid = stack.pop()
        if cid.multihash in seen or not store.has(cid):
            continue
        seen[cid.multihash] = cid
        if cid.codec == RAW:
            continue
        try:
            stack.extend(block_links(cid, store.get(cid)))
        except (StorageError, ValueError):
            continue
    return seen


def _age_and_size(store: BaseBlockstore, cid: Cid, now: float) -> tuple[float, int]:
    written = store.written_at(cid)
    if written is None:  # absent, or a store that does not know (memory)
        return float("inf"), store.size_of(cid) or 0
    return now - written, store.size_of(cid) or 0


def collect_garbage(
    store: BaseBlockstore,
    roots: Iterable[Cid],
    *,
    grace_seconds: float = 0.0,
    candidates: Iterable[Cid] | None = None,
    now: float | None = None,
) -> GcStats:
    """Delete blocks not reachable from `roots` (only among `candidates` if given).

    `candidates` makes a targeted collection cheap: after a job's result is
    unpinned, only that DAG's blocks need checking, not the whole store.
    Blocks younger than `grace_seconds` are spared (see the module docstring).
    """
    started = time.perf_counter()
    now = time.time() if now is None else now
    keep = reachable(store, roots)
    pool = store.iter_cids() if candidates is None else iter(list(candidates))
    removed = freed = young = 0
    done: set[bytes] = set()
    with store.batch():
        for cid in pool:
            if cid.multihash in keep or cid.multihash in done:
                continue
            done.add(cid.multihash)
            age, size = _age_and_size(store, cid, now)
            if age < grace_seconds:
                young += 1
                continue
            if store.delete(cid):
                removed += 1
                freed += size
    if removed:
        store.maintain()
    return GcStats(len(keep), removed, freed, young, time.perf_counter() - started)
