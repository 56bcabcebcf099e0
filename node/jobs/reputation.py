"""Durable per-peer records: protocol/reputation.py's pure records, one row per (peer, role).

The rows live in the job database (same connection, same WAL) so an
observation and the job event that caused it survive a crash together. The
table is bounded: every PeerID is free to mint, so a stranger army must not
grow it without end; past `limit` rows the least recently seen peers that are
not excluded go first (forgetting an excluded peer would lift its exclusion).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from node.jobs.store import JobDB
from protocol.reputation import OUTCOMES, STRANGER, PeerRecord, Standing, record, standing

SCHEMA = """
CREATE TABLE IF NOT EXISTS peer_records (
    peer TEXT NOT NULL,
    role TEXT NOT NULL,
    last_seen REAL NOT NULL,
    excluded_until REAL,
    record TEXT NOT NULL,
    PRIMARY KEY (peer, role)
);
CREATE INDEX IF NOT EXISTS peer_records_seen ON peer_records(last_seen);
"""

LIMIT = 10_000
"""Rows kept: ample for every peer a node really deals with, and small enough
(a few MB) that a flood of fresh keys costs nothing worth attacking."""


class Reputation:
    def __init__(self, db: JobDB, limit: int = LIMIT) -> None:
        self.db = db
        self.limit = limit
        db.connection.executescript(SCHEMA)

    def observe(
        self,
        peer: str,
        outcome: str,
        *,
        role: str = "executor",
        latency: float | None = None,
        now: float | None = None,
    ) -> None:
        """Add `outcome` to `peer`'s record; raises ValueError for an outcome `role` lacks."""
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            old = self._load(conn, peer, role)
            new = record(old or PeerRecord(role=role), outcome, latency, now)
            conn.execute(
                "INSERT INTO peer_records (peer, role, last_seen, excluded_until, record)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (peer, role) DO UPDATE SET"
                " last_seen = excluded.last_seen, excluded_until = excluded.excluded_until,"
                " record = excluded.record",
                (peer, role, new.last_seen, new.excluded_until, json.dumps(new.to_dict())),
            )
            if old is None:
                self._evict(conn, now)

    def record(self, peer: str, role: str = "executor") -> PeerRecord | None:
        return self._load(self.db.connection, peer, role)

    def standing(self, peer: str, now: float | None = None, *, role: str = "executor") -> Standing:
        rec = self.record(peer, role)
        if rec is None:
            return STRANGER
        return standing(rec, time.time() if now is None else now)

    def standings(self, peers: Iterable[str], now: float | None = None) -> dict[str, Standing]:
        """The executor standing of each of `peers` (strangers included), for bid ranking."""
        now = time.time() if now is None else now
        return {p: self.standing(p, now) for p in peers}

    def count(self, role: str | None = None) -> int:
        if role is None:
            row = self.db.connection.execute("SELECT COUNT(*) FROM peer_records").fetchone()
        else:
            row = self.db.connection.execute(
                "SELECT COUNT(*) FROM peer_records WHERE role = ?", (role,)
            ).fetchone()
        return int(row[0])

    def peers(
        self, now: float | None = None, *, limit: int | None = None, role: str | None = None
    ) -> list[dict[str, Any]]:
        """Known peers, most recently seen first, as `node.peers` shows them."""
        now = time.time() if now is None else now
        query = "SELECT peer, record FROM peer_records"
        args: list[Any] = []
        if role is not None:
            query += " WHERE role = ?"
            args.append(role)
        query += " ORDER BY last_seen DESC, peer, role"
        if limit is not None:
            query += " LIMIT ?"
            args.append(max(0, limit))
        rows = self.db.connection.execute(query, args).fetchall()
        return [_public(r["peer"], _decode(r["record"]), now) for r in rows]

    def _load(self, conn: sqlite3.Connection, peer: str, role: str) -> PeerRecord | None:
        if role not in OUTCOMES:
            raise ValueError(f"unknown peer role {role!r}")
        row = conn.execute(
            "SELECT record FROM peer_records WHERE peer = ? AND role = ?", (peer, role)
        ).fetchone()
        return None if row is None else _decode(row["record"])

    def _evict(self, conn: sqlite3.Connection, now: float) -> None:
        excess = int(conn.execute("SELECT COUNT(*) FROM peer_records").fetchone()[0]) - self.limit
        if excess <= 0:
            return
        conn.execute(
            "DELETE FROM peer_records WHERE rowid IN (SELECT rowid FROM peer_records"
            " ORDER BY COALESCE(excluded_until > ?, 0), last_seen LIMIT ?)",
            (now, excess),
        )


def _decode(text: str) -> PeerRecord:
    return PeerRecord.from_dict(json.loads(text))


def _public(peer: str, rec: PeerRecord, now: float) -> dict[str, Any]:
    held = standing(rec, now)
    return {
        "peer": peer,
        "role": rec.role,
        "score": round(held.score, 4),
        "why": held.why,
        "excluded_until": held.excluded_until,
        "audits_passed": held.audits_passed,
        "counts": {o: rec.counts.get(o, 0) for o in OUTCOMES[rec.role]},
        "latency": rec.latency,
        "last_seen": rec.last_seen,
    }
