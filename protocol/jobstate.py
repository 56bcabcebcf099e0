"""The job state machine (DESIGN §4): the only legal moves, in one table.

Every status change in the node goes through `transition`, so an illegal move
is a bug that raises rather than a record that silently lies.
"""

from __future__ import annotations

from enum import StrEnum

from protocol.errors import ErrorCode, MeshrunError


class JobStatus(StrEnum):
    PENDING = "pending"
    BIDDING = "bidding"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELING = "canceling"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELED})

_S = JobStatus
LEGAL_MOVES: dict[JobStatus, frozenset[JobStatus]] = {
    _S.PENDING: frozenset({_S.BIDDING, _S.FAILED, _S.CANCELING}),
    # bidding → failed: no bid arrived (NO_BIDS) or retries ran out.
    _S.BIDDING: frozenset({_S.ASSIGNED, _S.FAILED, _S.TIMEOUT, _S.CANCELING}),
    # assigned/running → bidding: the executor was lost; retry with the next bid.
    _S.ASSIGNED: frozenset({_S.RUNNING, _S.BIDDING, _S.FAILED, _S.TIMEOUT, _S.CANCELING}),
    _S.RUNNING: frozenset({_S.COMPLETED, _S.FAILED, _S.TIMEOUT, _S.BIDDING, _S.CANCELING}),
    _S.CANCELING: frozenset({_S.CANCELED}),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.TIMEOUT: frozenset(),
    _S.CANCELED: frozenset(),
}


def can_move(current: JobStatus, new: JobStatus) -> bool:
    return new in LEGAL_MOVES[current]


def transition(current: JobStatus, new: JobStatus) -> JobStatus:
    if not can_move(current, new):
        raise MeshrunError(
            ErrorCode.ILLEGAL_TRANSITION,
            f"a job cannot move from {current.value} to {new.value}",
            {"from": current.value, "to": new.value},
        )
    return new
