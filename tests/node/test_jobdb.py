"""The job database: legal moves only, atomic events, survives reopening."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.jobdb import JobDB
from protocol.errors import ErrorCode, MeshrunError
from protocol.jobstate import JobStatus


def _db(tmp_path: Path) -> JobDB:
    return JobDB(tmp_path / "jobs.sqlite")


def test_moves_follow_the_state_machine_and_log_events(tmp_path: Path) -> None:
    db = _db(tmp_path)
    db.create("job1", "requester", {"model_cid": "m", "inputs_cid": "i"}, b"env", "me", "me")
    db.move("job1", JobStatus.BIDDING, "Published")
    with pytest.raises(MeshrunError) as illegal:
        db.move("job1", JobStatus.COMPLETED, "Completed")
    assert illegal.value.code == ErrorCode.ILLEGAL_TRANSITION
    assert db.get("job1").status == JobStatus.BIDDING
    db.move("job1", JobStatus.ASSIGNED, "BidAccepted", peer="p1", executor="p1")
    record = db.move("job1", JobStatus.RUNNING, "ExecutionStarted", peer="p1")
    assert record.started_at is not None
    record = db.move("job1", JobStatus.COMPLETED, "Completed", result_cid="bafy", receipt={"a": 1})
    assert record.completed_at is not None and record.receipt == {"a": 1}
    types = [e["type"] for e in db.events("job1")]
    assert types == ["Created", "Published", "BidAccepted", "ExecutionStarted", "Completed"]
    with pytest.raises(MeshrunError):
        db.move("job1", JobStatus.FAILED, "Failed")


def test_records_survive_reopening(tmp_path: Path) -> None:
    db = _db(tmp_path)
    db.create("a", "requester", {}, b"x", "me", None)
    db.move("a", JobStatus.BIDDING, "Published")
    db.create("b", "requester", {}, b"y", "me", None)
    db.move("b", JobStatus.FAILED, "Failed", error={"code": "NO_BIDS"})
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
        lambda: db.move("nope", JobStatus.BIDDING, "x"),
    ):
        with pytest.raises(MeshrunError) as err:
            call()
        assert err.value.code == ErrorCode.JOB_NOT_FOUND
