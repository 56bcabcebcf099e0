"""Durable job records: jobs, their event log, bids and receipts in SQLite (WAL).

SQLite because a node is one process with one writer and the data must survive
a crash; WAL so readers (RPC calls) never block the writer. Writes are small
and synchronous=NORMAL keeps them sub-millisecond, so they run inline on the
event loop rather than paying a thread hop each.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.jobs.bus import EventBus
from protocol.errors import ErrorCode, MeshrunError
from protocol.jobstate import JobStatus
from protocol.lifecycle import LogEvent, Move

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    status TEXT NOT NULL,
    substate TEXT,
    progress REAL NOT NULL DEFAULT 0,
    spec_envelope BLOB NOT NULL,
    spec TEXT NOT NULL,
    requester TEXT NOT NULL,
    executor TEXT,
    result_cid TEXT,
    receipt_envelope BLOB,
    receipt TEXT,
    error TEXT,
    retry_count INTEGER NOT NULL DEFAULT 0,
    verification TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    type TEXT NOT NULL,
    peer TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    cid TEXT NOT NULL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bids (
    job_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    kind TEXT NOT NULL,
    envelope BLOB NOT NULL,
    body TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (job_id, provider)
);
"""


@dataclass
class JobRecord:
    job_id: str
    role: str
    status: JobStatus
    spec: dict[str, Any]
    spec_envelope: bytes
    requester: str
    created_at: float
    updated_at: float
    substate: str | None = None
    progress: float = 0.0
    executor: str | None = None
    result_cid: str | None = None
    receipt: dict[str, Any] | None = None
    receipt_envelope: bytes | None = None
    error: dict[str, Any] | None = None
    retry_count: int = 0
    verification: dict[str, Any] | None = None
    started_at: float | None = None
    completed_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """The shape `job.get` returns: JSON-safe, no raw envelopes."""
        spec = self.spec
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "substate": self.substate,
            "progress": self.progress,
            "executor": self.executor,
            "result_cid": self.result_cid,
            "receipt": self.receipt,
            "receipt_envelope_b64": (
                base64.b64encode(self.receipt_envelope).decode() if self.receipt_envelope else None
            ),
            "error": self.error,
            "retry_count": self.retry_count,
            "verification": self.verification,
            "spec_envelope_b64": base64.b64encode(self.spec_envelope).decode(),
            "model_cid": spec.get("model_cid"),
            "inputs_cid": spec.get("inputs_cid"),
            "requester": self.requester,
            "timeout_seconds": spec.get("timeout_seconds"),
            "max_price": spec.get("max_price"),
            "priority": spec.get("priority", "normal"),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "updated_at": self.updated_at,
        }


def _row_to_record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        role=row["role"],
        status=JobStatus(row["status"]),
        substate=row["substate"],
        progress=row["progress"],
        spec=json.loads(row["spec"]),
        spec_envelope=bytes(row["spec_envelope"]),
        requester=row["requester"],
        executor=row["executor"],
        result_cid=row["result_cid"],
        receipt=json.loads(row["receipt"]) if row["receipt"] else None,
        receipt_envelope=bytes(row["receipt_envelope"]) if row["receipt_envelope"] else None,
        error=json.loads(row["error"]) if row["error"] else None,
        retry_count=row["retry_count"],
        verification=json.loads(row["verification"]) if row["verification"] else None,
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        updated_at=row["updated_at"],
    )


class JobDB:
    def __init__(self, path: Path, bus: EventBus | None = None) -> None:
        self.bus = bus
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
        if "verification" not in columns:  # a data dir from before verification policies
            self._conn.execute("ALTER TABLE jobs ADD COLUMN verification TEXT")

    def close(self) -> None:
        self._conn.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The node's one SQLite connection, for the other durable tables in this file
        (node/jobs/reputation.py, node/jobs/ledger.py): one writer, one WAL."""
        return self._conn

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._tx()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def create(
        self,
        job_id: str,
        role: str,
        spec: dict[str, Any],
        spec_envelope: bytes,
        requester: str,
        move: Move,
    ) -> JobRecord:
        """Insert a job in the state its machine's first move chose, and log that move."""
        if move.source is not None or move.role.value != role:
            raise MeshrunError(
                ErrorCode.ILLEGAL_TRANSITION, f"{move.trigger} does not create a {role} job"
            )
        now = time.time()
        fields = _encode_fields(dict(move.fields))
        columns = {
            "job_id": job_id,
            "role": role,
            "status": move.target.value,
            "spec_envelope": spec_envelope,
            "spec": json.dumps(spec, default=_json_default),
            "requester": requester,
            "created_at": now,
            "updated_at": now,
            **fields,
        }
        names = ", ".join(columns)
        marks = ", ".join("?" * len(columns))
        with self._tx() as db:
            db.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(columns.values()))
            event = self._event(db, job_id, move.log, move.peer, dict(move.data), now)
        record = self.get(job_id)
        self._announce(event, record)
        return record

    def get(self, job_id: str) -> JobRecord:
        row = self._conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise MeshrunError(ErrorCode.JOB_NOT_FOUND, f"no job with id {job_id}")
        return _row_to_record(row)

    def find(self, job_id: str) -> JobRecord | None:
        try:
            return self.get(job_id)
        except MeshrunError:
            return None

    def list_jobs(self, status: str | None = None, limit: int = 100) -> list[JobRecord]:
        if status:
            rows = self._conn.execute(
                "SELECT * FROM jobs WHERE status = ? ORDER BY created_at DESC LIMIT ?",
                (status, limit),
            ).fetchall()
        else:
            rows = self._conn.execute(
                "SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_row_to_record(r) for r in rows]

    def query_jobs(
        self,
        status: str | None,
        since: float | None,
        until: float | None,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[JobRecord], int, str | None]:
        """A page of jobs, newest first, plus the total and the cursor of the next page.

        The cursor is the (created_at, job_id) of the last row shown, so pages stay
        stable while new jobs arrive (keyset pagination, not OFFSET).
        """
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if status:
            where.append("status = ?")
            args.append(status)
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        if until is not None:
            where.append("created_at < ?")
            args.append(until)
        clause = " AND ".join(where)
        total = self._conn.execute(f"SELECT COUNT(*) FROM jobs WHERE {clause}", args).fetchone()[0]
        page_where, page_args = clause, list(args)
        if cursor:
            created, job_id = _decode_cursor(cursor)
            page_where += " AND (created_at < ? OR (created_at = ? AND job_id < ?))"
            page_args += [created, created, job_id]
        rows = self._conn.execute(
            f"SELECT * FROM jobs WHERE {page_where} ORDER BY created_at DESC, job_id DESC LIMIT ?",
            [*page_args, limit + 1],
        ).fetchall()
        records = [_row_to_record(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = records[-1]
            next_cursor = _encode_cursor(last.created_at, last.job_id)
        return records, int(total), next_cursor

    def last_event(self, job_id: str, type_: LogEvent) -> dict[str, Any] | None:
        row = self._conn.execute(
            "SELECT * FROM events WHERE job_id = ? AND type = ? ORDER BY seq DESC LIMIT 1",
            (job_id, type_.value),
        ).fetchone()
        if row is None:
            return None
        return {
            "seq": row["seq"],
            "at": row["at"],
            "type": row["type"],
            "peer": row["peer"],
            "data": json.loads(row["data"]),
        }

    def stats(self, since: float | None) -> dict[str, Any]:
        args: list[Any] = [] if since is None else [since]
        window = "" if since is None else " AND j.created_at >= ?"
        by_status = {
            row[0]: row[1]
            for row in self._conn.execute(
                f"SELECT status, COUNT(*) FROM jobs j WHERE role = 'requester'{window}"
                " GROUP BY status",
                args,
            )
        }
        row = self._conn.execute(
            "SELECT AVG(j.completed_at - j.created_at), COUNT(*) FROM jobs j"
            f" WHERE role = 'requester' AND status = 'completed'{window}",
            args,
        ).fetchone()
        # What was spent is what this node signed it owes (node/jobs/ledger.py): a
        # disputed result pays 0 and a deleted job's settlement still counts.
        spent = 0.0
        if self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'settlements_signed'"
        ).fetchone():
            spent = self._conn.execute(
                "SELECT COALESCE(SUM(price), 0) FROM settlements_signed"
                + ("" if since is None else " WHERE settled_at >= ?"),
                args,
            ).fetchone()[0]
        total = sum(by_status.values())
        finished = sum(n for s, n in by_status.items() if JobStatus(s).terminal)
        completed = by_status.get("completed", 0)
        return {
            "total": total,
            "by_status": by_status,
            "success_rate": (completed / finished) if finished else None,
            "average_completion_seconds": row[0],
            "total_spent": round(spent, 9),
        }

    def delete(self, job_id: str) -> None:
        with self._tx() as db:
            for table in ("events", "bids", "jobs"):
                db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))

    def add_model(self, name: str, cid: str) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO models (name, cid, added_at) VALUES (?, ?, ?)",
            (name, cid, time.time()),
        )

    def model_cid(self, name: str) -> str:
        row = self._conn.execute("SELECT cid FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise MeshrunError(
                ErrorCode.MODEL_NOT_FOUND,
                f"no model named {name!r} in this node's catalog (add one with model.add)",
            )
        return str(row["cid"])

    def models(self) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT * FROM models ORDER BY name").fetchall()
        return [{"name": r["name"], "cid": r["cid"], "added_at": r["added_at"]} for r in rows]

    def recent_outcomes(self, limit: int) -> list[dict[str, Any]]:
        """Price paid and wall time of this requester's latest completed jobs."""
        rows = self._conn.execute(
            "SELECT j.job_id, j.created_at, j.completed_at,"
            " (SELECT data FROM events e WHERE e.job_id = j.job_id AND e.type = ?"
            "  ORDER BY seq DESC LIMIT 1) AS accepted"
            " FROM jobs j WHERE j.role = 'requester' AND j.status = 'completed'"
            " ORDER BY j.completed_at DESC LIMIT ?",
            (LogEvent.BID_ACCEPTED.value, limit),
        ).fetchall()
        outcomes = []
        for row in rows:
            accepted = json.loads(row["accepted"]) if row["accepted"] else {}
            outcomes.append(
                {
                    "job_id": row["job_id"],
                    "price": accepted.get("price"),
                    "duration": (row["completed_at"] or row["created_at"]) - row["created_at"],
                }
            )
        return outcomes

    def unfinished(self) -> list[JobRecord]:
        terminal = tuple(s.value for s in JobStatus if s.terminal)
        marks = ",".join("?" * len(terminal))
        rows = self._conn.execute(
            f"SELECT * FROM jobs WHERE status NOT IN ({marks})", terminal
        ).fetchall()
        return [_row_to_record(r) for r in rows]

    def apply(self, job_id: str, move: Move) -> JobRecord:
        """Record a move a job machine decided: the status and its event, atomically.

        The only way a status changes. The record must still be in the move's
        source state (compare-and-set), so two writers can never both move a job
        and a stale machine can never overwrite a newer state.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise MeshrunError(ErrorCode.JOB_NOT_FOUND, f"no job with id {job_id}")
            current = JobStatus(row["status"])
            if current != move.source:
                raise MeshrunError(
                    ErrorCode.ILLEGAL_TRANSITION,
                    f"job {job_id} is {current.value}, not {move.source}: "
                    f"cannot take '{move.trigger.value}'",
                    {"from": current.value, "to": move.target.value},
                )
            updates = {
                "status": move.target.value,
                "updated_at": now,
                **_encode_fields(dict(move.fields)),
            }
            if move.target == JobStatus.RUNNING:
                updates["started_at"] = now
            if move.target.terminal:
                updates["completed_at"] = now
            sets = ", ".join(f"{k} = ?" for k in updates)
            db.execute(f"UPDATE jobs SET {sets} WHERE job_id = ?", (*updates.values(), job_id))
            logged = self._event(db, job_id, move.log, move.peer, dict(move.data), now)
        record = self.get(job_id)
        self._announce(logged, record)
        return record

    def set_verification(self, job_id: str, summary: dict[str, Any]) -> None:
        """What the job's verification policy has seen so far (shown by `job.get`)."""
        self._conn.execute(
            "UPDATE jobs SET verification = ?, updated_at = ? WHERE job_id = ?",
            (json.dumps(summary, default=_json_default), time.time(), job_id),
        )

    def set_progress(self, job_id: str, substate: str | None, progress: float) -> None:
        self._conn.execute(
            "UPDATE jobs SET substate = ?, progress = ?, updated_at = ? WHERE job_id = ?",
            (substate, progress, time.time(), job_id),
        )

    def add_event(
        self,
        job_id: str,
        type_: LogEvent,
        peer: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        with self._tx() as db:
            event = self._event(db, job_id, type_, peer, data or {}, time.time())
            # Three columns, not the whole record (its spec and receipt decoded)
            # only to stamp the event: a job logs a dozen events or more.
            row = db.execute(
                "SELECT status, substate, progress FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        if row is None:
            raise MeshrunError(ErrorCode.JOB_NOT_FOUND, f"no job with id {job_id}")
        self._publish(event, row["status"], row["substate"], row["progress"])

    def _announce(self, event: dict[str, Any], record: JobRecord) -> None:
        self._publish(event, record.status.value, record.substate, record.progress)

    def _publish(
        self, event: dict[str, Any], status: str, substate: str | None, progress: float | None
    ) -> None:
        """Tell the bus about a logged event, stamped with the job's state after it."""
        if self.bus is not None:
            self.bus.publish(
                {**event, "status": status, "substate": substate, "progress": progress}
            )

    def events(self, job_id: str) -> list[dict[str, Any]]:
        self.get(job_id)
        rows = self._conn.execute(
            "SELECT * FROM events WHERE job_id = ? ORDER BY seq", (job_id,)
        ).fetchall()
        return [
            {
                "seq": r["seq"],
                "at": r["at"],
                "type": r["type"],
                "peer": r["peer"],
                "data": json.loads(r["data"]),
            }
            for r in rows
        ]

    def add_bid(
        self, job_id: str, provider: str, kind: str, envelope: bytes, body: dict[str, Any]
    ) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO bids VALUES (?, ?, ?, ?, ?, ?)",
            (
                job_id,
                provider,
                kind,
                envelope,
                json.dumps(body, default=_json_default),
                time.time(),
            ),
        )

    def bids(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT * FROM bids WHERE job_id = ? ORDER BY received_at", (job_id,)
        ).fetchall()
        return [
            {"provider": r["provider"], "kind": r["kind"], **json.loads(r["body"])} for r in rows
        ]

    def bid_envelopes(self, job_id: str) -> list[bytes]:
        """The signed bids (not refusals) kept for a job, oldest first: a restarted
        requester re-opens them rather than trust what it wrote of them."""
        rows = self._conn.execute(
            "SELECT envelope FROM bids WHERE job_id = ? AND kind = 'bid' ORDER BY received_at",
            (job_id,),
        ).fetchall()
        return [bytes(r["envelope"]) for r in rows]

    @staticmethod
    def _event(
        db: sqlite3.Connection,
        job_id: str,
        type_: LogEvent,
        peer: str | None,
        data: dict[str, Any],
        at: float,
    ) -> dict[str, Any]:
        encoded = json.dumps(data, default=_json_default)
        cursor = db.execute(
            "INSERT INTO events (job_id, at, type, peer, data) VALUES (?, ?, ?, ?, ?)",
            (job_id, at, type_.value, peer, encoded),
        )
        return {
            "job_id": job_id,
            "seq": cursor.lastrowid,
            "at": at,
            "type": type_.value,
            "peer": peer,
            "data": json.loads(encoded),
        }


def _encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(created_at), str(job_id)
    except (ValueError, TypeError) as exc:
        raise MeshrunError(ErrorCode.INVALID_PARAMS, f"invalid cursor {cursor!r}") from exc


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def _encode_fields(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key in ("receipt", "error", "verification") and value is not None:
            out[key] = json.dumps(value, default=_json_default)
        elif isinstance(value, JobStatus):
            out[key] = value.value
        else:
            out[key] = value
    return out
