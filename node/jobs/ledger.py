"""Settlements, signed (requester) and received (compute), in the node's SQLite file.

A requester's signed settlements are an outbox: written before the first
delivery attempt, so one signed just before a crash is still delivered after
the restart, and `job.stats` can sum what was spent from the same rows. A
compute node's received settlements are its earnings: the signed envelopes
are kept as they arrived, so every line of an export can be re-checked offline
with the requester's public key. Rows are only ever written for jobs this node
submitted or ran (one per job and executor), so the ledger grows with real
work, never with what a peer sends.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from node.jobs.store import JobDB
from protocol.lifecycle import LogEvent
from protocol.messages import Settlement
from protocol.settlement import export_line

SCHEMA = """
CREATE TABLE IF NOT EXISTS settlements_signed (
    receipt_cid TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    price REAL NOT NULL,
    outcome TEXT NOT NULL,
    settled_at REAL NOT NULL,
    envelope BLOB NOT NULL,
    status TEXT NOT NULL DEFAULT 'unsent',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    ack_envelope BLOB,
    updated_at REAL NOT NULL,
    UNIQUE (job_id, provider)
);
CREATE INDEX IF NOT EXISTS settlements_signed_status
    ON settlements_signed(status, next_attempt_at);
CREATE TABLE IF NOT EXISTS settlements_received (
    job_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    requester TEXT NOT NULL,
    receipt_cid TEXT NOT NULL,
    result_cid TEXT NOT NULL,
    price REAL NOT NULL,
    policy TEXT NOT NULL,
    outcome TEXT NOT NULL,
    settled_at REAL NOT NULL,
    envelope BLOB NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (job_id, provider)
);
CREATE INDEX IF NOT EXISTS settlements_received_at ON settlements_received(settled_at);
"""

UNSENT, DELIVERED, REFUSED, ABANDONED = "unsent", "delivered", "refused", "abandoned"
MAX_UNSETTLED = 1000  # listed; the count and amount cover them all
_UNSETTLED = (
    "j.role = 'compute' AND j.status = 'completed'"
    " AND NOT EXISTS (SELECT 1 FROM settlements_received s WHERE s.job_id = j.job_id)"
)
_LAST_ACCEPT = "SELECT MAX(x.seq) FROM events x WHERE x.job_id = j.job_id AND x.type = ?"


@dataclass(frozen=True)
class Outgoing:
    """One settlement this node signed, and how its delivery stands."""

    receipt_cid: str
    job_id: str
    provider: str
    price: float
    outcome: str
    settled_at: float
    envelope: bytes
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str | None

    def public(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "provider": self.provider,
            "receipt_cid": self.receipt_cid,
            "price": self.price,
            "outcome": self.outcome,
            "settled_at": self.settled_at,
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }


def _outgoing(row: sqlite3.Row) -> Outgoing:
    return Outgoing(
        receipt_cid=row["receipt_cid"],
        job_id=row["job_id"],
        provider=row["provider"],
        price=row["price"],
        outcome=row["outcome"],
        settled_at=row["settled_at"],
        envelope=bytes(row["envelope"]),
        status=row["status"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
    )


class Ledger:
    def __init__(self, db: JobDB) -> None:
        self.db = db
        self._conn = db.connection
        self._conn.executescript(SCHEMA)

    # ---- requester: the outbox ----------------------------------------------------

    def record_signed(
        self, settlement: Settlement, envelope: bytes, now: float | None = None
    ) -> Outgoing:
        """Keep a signed settlement until its executor acknowledges it.

        Idempotent per (job, executor): a second call returns the first row
        untouched, so a replayed effect never signs a second, different
        settlement for work already settled.
        """
        at = time.time() if now is None else now
        self._conn.execute(
            "INSERT OR IGNORE INTO settlements_signed (receipt_cid, job_id, provider, price,"
            " outcome, settled_at, envelope, next_attempt_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                settlement.receipt_cid,
                settlement.job_id,
                settlement.provider,
                settlement.price,
                settlement.outcome,
                settlement.settled_at,
                envelope,
                at,
                at,
            ),
        )
        found = self.signed_for(settlement.job_id, settlement.provider)
        assert found is not None
        return found

    def signed(self, receipt_cid: str) -> Outgoing | None:
        row = self._conn.execute(
            "SELECT * FROM settlements_signed WHERE receipt_cid = ?", (receipt_cid,)
        ).fetchone()
        return _outgoing(row) if row else None

    def signed_for(self, job_id: str, provider: str) -> Outgoing | None:
        row = self._conn.execute(
            "SELECT * FROM settlements_signed WHERE job_id = ? AND provider = ?",
            (job_id, provider),
        ).fetchone()
        return _outgoing(row) if row else None

    def signed_for_job(self, job_id: str) -> list[Outgoing]:
        rows = self._conn.execute(
            "SELECT * FROM settlements_signed WHERE job_id = ? ORDER BY settled_at", (job_id,)
        ).fetchall()
        return [_outgoing(r) for r in rows]

    def undelivered(self, limit: int = 1000) -> list[Outgoing]:
        """Settlements still to deliver, the one due soonest first."""
        rows = self._conn.execute(
            "SELECT * FROM settlements_signed WHERE status = ? ORDER BY next_attempt_at LIMIT ?",
            (UNSENT, limit),
        ).fetchall()
        return [_outgoing(r) for r in rows]

    def mark_delivered(self, receipt_cid: str, ack_envelope: bytes | None = None) -> None:
        self._finish(receipt_cid, DELIVERED, None, ack_envelope)

    def mark_refused(self, receipt_cid: str, reason: str, ack_envelope: bytes) -> None:
        """The executor answered, signed, that it will not record it: resending cannot help."""
        self._finish(receipt_cid, REFUSED, reason, ack_envelope)

    def mark_failed(self, receipt_cid: str, error: str, retry_at: float | None) -> None:
        """One more delivery failed; try again at `retry_at`, or never (None)."""
        self._conn.execute(
            "UPDATE settlements_signed SET attempts = attempts + 1, last_error = ?,"
            " next_attempt_at = COALESCE(?, next_attempt_at), status = ?, updated_at = ?"
            " WHERE receipt_cid = ? AND status = ?",
            (
                error[:512],
                retry_at,
                UNSENT if retry_at is not None else ABANDONED,
                time.time(),
                receipt_cid,
                UNSENT,
            ),
        )

    def _finish(
        self, receipt_cid: str, status: str, error: str | None, ack_envelope: bytes | None
    ) -> None:
        self._conn.execute(
            "UPDATE settlements_signed SET status = ?, last_error = ?, ack_envelope = ?,"
            " updated_at = ? WHERE receipt_cid = ?",
            (status, error, ack_envelope, time.time(), receipt_cid),
        )

    def spent(self, since: float | None = None) -> float:
        """What this node signed it owes, settled at or after `since`."""
        row = self._conn.execute(
            "SELECT COALESCE(SUM(price), 0) FROM settlements_signed WHERE settled_at >= ?",
            (since if since is not None else float("-inf"),),
        ).fetchone()
        return round(float(row[0]), 9)

    # ---- compute: what it earned ----------------------------------------------------

    def record_received(self, settlement: Settlement, envelope: bytes) -> bool:
        """Record a settlement already checked; False when this job was settled before."""
        cursor = self._conn.execute(
            "INSERT OR IGNORE INTO settlements_received (job_id, provider, requester,"
            " receipt_cid, result_cid, price, policy, outcome, settled_at, envelope, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                settlement.job_id,
                settlement.provider,
                settlement.requester,
                settlement.receipt_cid,
                settlement.result_cid,
                settlement.price,
                settlement.policy,
                settlement.outcome,
                settlement.settled_at,
                envelope,
                time.time(),
            ),
        )
        return cursor.rowcount == 1

    def received_envelope(self, job_id: str, provider: str) -> bytes | None:
        row = self._conn.execute(
            "SELECT envelope FROM settlements_received WHERE job_id = ? AND provider = ?",
            (job_id, provider),
        ).fetchone()
        return bytes(row[0]) if row else None

    def earnings(self, since: float | None = None, until: float | None = None) -> dict[str, Any]:
        """Settled earnings in [since, until) by UTC day and by requester, and what is
        still unsettled. Disputed settlements count as jobs that earned 0."""
        where, args = self._window(since, until)
        total, jobs, disputed = self._conn.execute(
            "SELECT COALESCE(SUM(price), 0), COUNT(*),"
            f" COALESCE(SUM(outcome = 'disputed'), 0) FROM settlements_received WHERE {where}",
            args,
        ).fetchone()
        by_day = [
            {"day": day, "amount": round(amount, 9), "jobs": n}
            for day, amount, n in self._conn.execute(
                "SELECT date(settled_at, 'unixepoch') AS day, SUM(price), COUNT(*)"
                f" FROM settlements_received WHERE {where} GROUP BY day ORDER BY day",
                args,
            )
        ]
        by_requester = [
            {"requester": requester, "amount": round(amount, 9), "jobs": n}
            for requester, amount, n in self._conn.execute(
                "SELECT requester, SUM(price) AS amount, COUNT(*)"
                f" FROM settlements_received WHERE {where}"
                " GROUP BY requester ORDER BY amount DESC, requester",
                args,
            )
        ]
        unsettled = self.unsettled()
        count, amount = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(json_extract(e.data, '$.price')), 0)"
            f" FROM jobs j LEFT JOIN events e ON e.seq = ({_LAST_ACCEPT})"
            f" WHERE {_UNSETTLED}",
            (LogEvent.BID_ACCEPTED.value,),
        ).fetchone()
        return {
            "total": round(float(total), 9),
            "settled_jobs": int(jobs),
            "disputed_jobs": int(disputed),
            "by_day": by_day,
            "by_requester": by_requester,
            "unsettled": unsettled,
            "unsettled_jobs": int(count),
            "unsettled_amount": round(float(amount), 9),
        }

    def unsettled(self, limit: int = MAX_UNSETTLED) -> list[dict[str, Any]]:
        """Jobs this node ran to completion that no settlement names yet, newest first."""
        rows = self._conn.execute(
            "SELECT j.job_id, j.requester, j.completed_at, e.data AS accepted"
            f" FROM jobs j LEFT JOIN events e ON e.seq = ({_LAST_ACCEPT})"
            f" WHERE {_UNSETTLED} ORDER BY j.completed_at DESC LIMIT ?",
            (LogEvent.BID_ACCEPTED.value, limit),
        ).fetchall()
        return [
            {
                "job_id": row["job_id"],
                "requester": row["requester"],
                "price": _accepted_price(row["accepted"]),
                "completed_at": row["completed_at"],
            }
            for row in rows
        ]

    def export(
        self,
        since: float | None = None,
        until: float | None = None,
        *,
        after: int = 0,
        limit: int | None = None,
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(cursor, line) per received settlement in the order they were recorded.

        The cursor is the row's position: pass the last one as `after` for the
        next page, so a long export pages without holding the ledger open.
        """
        where, args = self._window(since, until)
        query = (
            "SELECT rowid, * FROM settlements_received"
            f" WHERE rowid > ? AND {where} ORDER BY rowid"
            + (" LIMIT ?" if limit is not None else "")
        )
        params: list[Any] = [after, *args, *([limit] if limit is not None else [])]
        for row in self._conn.execute(query, params).fetchall():
            yield int(row["rowid"]), export_line(bytes(row["envelope"]))

    @staticmethod
    def _window(since: float | None, until: float | None) -> tuple[str, list[Any]]:
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if since is not None:
            where.append("settled_at >= ?")
            args.append(since)
        if until is not None:
            where.append("settled_at < ?")
            args.append(until)
        return " AND ".join(where), args


def _accepted_price(data: str | None) -> float | None:
    if not data:
        return None
    price = json.loads(data).get("price")
    return float(price) if isinstance(price, (int, float)) else None
