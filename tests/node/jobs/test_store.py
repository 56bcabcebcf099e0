"""The job database: only moves a job machine decided, atomic events, survives reopening."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.jobs.store import JobDB
from protocol.errors import ErrorCode, MeshrunError
from protocol.jobstate import JobStatus
from protocol.lifecycle import LogEvent, Move, Role, Trigger

S = JobStatus
CREATED = Move(Role.REQUESTER, Trigger.SUBMITTED, None, S.PENDING, LogEvent.CREATED, "me")
PUBLISHED = Move(Role.REQUESTER, Trigger.PUBLISHED, S.PENDING, S.BIDDING, LogEvent.PUBLISHED, None)


def _db(tmp_path: Path) -> JobDB:
    return JobDB(tmp_path / "jobs.sqlite")


def move(source: JobStatus, trigger: Trigger, log: LogEvent, **fields: object) -> Move:
    from protocol.lifecycle import TABLE

    target = TABLE[Role.REQUESTER, source, trigger]
    return Move(Role.REQUESTER, trigger, source, target, log, "p1", {}, fields)


def test_moves_follow_the_machine_and_log_events(tmp_path: Path) -> None:
    db = _db(tmp_path)
    db.create("job1", "requester", {"model_cid": "m", "inputs_cid": "i"}, b"env", "me", CREATED)
    db.apply("job1", PUBLISHED)
    # A move from a state the record is not in (a stale machine, a second writer) is refused.
    with pytest.raises(MeshrunError) as stale:
        db.apply("job1", PUBLISHED)
    assert stale.value.code == ErrorCode.ILLEGAL_TRANSITION
    assert db.get("job1").status == S.BIDDING
    db.apply("job1", move(S.BIDDING, Trigger.BID_ACCEPTED, LogEvent.BID_ACCEPTED, executor="p1"))
    record = db.apply(
        "job1", move(S.ASSIGNED, Trigger.EXECUTION_STARTED, LogEvent.EXECUTION_STARTED)
    )
    assert record.started_at is not None and record.executor == "p1"
    db.set_progress("job1", "processing", 50.0)
    assert db.get("job1").progress == 50.0
    done = move(
        S.RUNNING, Trigger.RESULT_VERIFIED, LogEvent.COMPLETED, result_cid="bafy", receipt={"a": 1}
    )
    record = db.apply("job1", done)
    assert record.completed_at is not None and record.receipt == {"a": 1}
    types = [e["type"] for e in db.events("job1")]
    assert types == ["Created", "Published", "BidAccepted", "ExecutionStarted", "Completed"]
    assert db.last_event("job1", LogEvent.BID_ACCEPTED)["peer"] == "p1"  # type: ignore[index]
    assert db.last_event("job1", LogEvent.RETRIED) is None


def test_a_create_must_be_a_creating_move_of_the_same_role(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with pytest.raises(MeshrunError):
        db.create("x", "requester", {}, b"e", "me", PUBLISHED)
    accepted = Move(Role.COMPUTE, Trigger.ACCEPTED, None, S.ASSIGNED, LogEvent.BID_ACCEPTED, "r")
    with pytest.raises(MeshrunError):
        db.create("x", "requester", {}, b"e", "me", accepted)
    record = db.create("x", "compute", {}, b"e", "r", accepted)
    assert record.status == S.ASSIGNED and record.role == "compute"


def test_records_survive_reopening(tmp_path: Path) -> None:
    db = _db(tmp_path)
    db.create("a", "requester", {}, b"x", "me", CREATED)
    db.apply("a", PUBLISHED)
    db.create("b", "requester", {}, b"y", "me", CREATED)
    db.apply(
        "b", move(S.PENDING, Trigger.NOT_RESUMABLE, LogEvent.FAILED, error={"code": "NO_BIDS"})
    )
    db.add_bid("a", "peer", "bid", b"env", {"price": 1.0})
    db.close()
    again = _db(tmp_path)
    assert {r.job_id for r in again.unfinished()} == {"a"}
    assert again.get("b").error == {"code": "NO_BIDS"}
    assert again.bids("a") == [{"provider": "peer", "kind": "bid", "price": 1.0}]
    assert [r.job_id for r in again.list_jobs(status="failed")] == ["b"]


def test_unknown_job_is_a_coded_error(tmp_path: Path) -> None:
    db = _db(tmp_path)
    for call in (
        lambda: db.get("nope"),
        lambda: db.events("nope"),
        lambda: db.apply("nope", PUBLISHED),
    ):
        with pytest.raises(MeshrunError) as err:
            call()
        assert err.value.code == ErrorCode.JOB_NOT_FOUND


def test_the_store_has_no_way_to_write_a_status_besides_a_move(tmp_path: Path) -> None:
    db = _db(tmp_path)
    assert not hasattr(db, "move") and not hasattr(db, "update")
    with pytest.raises(ValueError, match="cannot set"):
        Move(Role.REQUESTER, Trigger.PUBLISHED, S.PENDING, S.BIDDING, LogEvent.PUBLISHED, None,
             fields={"status": "completed"})  # fmt: skip


def test_every_logged_event_reaches_the_bus_with_the_jobs_state_after_it(tmp_path: Path) -> None:
    from node.jobs.bus import EventBus

    bus = EventBus()
    db = JobDB(tmp_path / "jobs.sqlite", bus)
    with bus.subscribe() as events:
        db.create("job1", "requester", {}, b"env", "me", CREATED)
        db.apply("job1", PUBLISHED)
        db.set_progress("job1", "processing", 40.0)
        db.add_event("job1", LogEvent.BID_RECEIVED, "p1", {"price": 2.0})
        got = [events.receive_nowait() for _ in range(3)]
    assert [e["type"] for e in got] == ["Created", "Published", "BidReceived"]
    last = got[-1]
    assert (last["status"], last["substate"], last["progress"]) == ("bidding", "processing", 40.0)
    assert last["data"] == {"price": 2.0} and last["peer"] == "p1"
    assert last["seq"] == db.events("job1")[-1]["seq"]
    with pytest.raises(MeshrunError) as err:
        db.add_event("nobody", LogEvent.BID_RECEIVED)
    assert err.value.code is ErrorCode.JOB_NOT_FOUND
