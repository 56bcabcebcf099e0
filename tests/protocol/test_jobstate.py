"""Job statuses and the legal moves the lifecycle table allows between them."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from protocol.errors import ErrorCode, MeshrunError
from protocol.jobstate import TERMINAL, JobStatus
from protocol.lifecycle import LEGAL_MOVES, can_move, transition

S = JobStatus
ALL = list(JobStatus)
statuses = st.sampled_from(ALL)

# The designed moves, written out independently of the module's table.
DESIGNED = {
    (S.PENDING, S.BIDDING),
    (S.BIDDING, S.ASSIGNED),
    (S.ASSIGNED, S.RUNNING),
    (S.RUNNING, S.COMPLETED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.TIMEOUT),
    (S.ASSIGNED, S.BIDDING),  # executor lost: retry with the next bid
    (S.RUNNING, S.BIDDING),
    (S.PENDING, S.CANCELING),
    (S.BIDDING, S.CANCELING),
    (S.ASSIGNED, S.CANCELING),
    (S.RUNNING, S.CANCELING),
    (S.CANCELING, S.CANCELED),
}


def reachable(start: JobStatus) -> set[JobStatus]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in LEGAL_MOVES[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_table_covers_every_status() -> None:
    assert set(LEGAL_MOVES) == set(JobStatus)
    assert {S.COMPLETED, S.FAILED, S.TIMEOUT, S.CANCELED} == TERMINAL
    for status in JobStatus:
        assert status.terminal == (status in TERMINAL)
        assert JobStatus(status.value) is status


def test_designed_moves_are_legal() -> None:
    for a, b in DESIGNED:
        assert can_move(a, b), (a, b)


def test_only_undesigned_moves_are_early_failures() -> None:
    """Beyond the diagram, a live job may only fail or time out early (no bids, etc.)."""
    for a, targets in LEGAL_MOVES.items():
        for b in targets:
            if (a, b) not in DESIGNED:
                assert b in {S.FAILED, S.TIMEOUT} and a is not S.CANCELING, (a, b)


def test_no_self_loops() -> None:
    for status in JobStatus:
        assert not can_move(status, status)


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_terminal_states_have_no_exits(status: JobStatus) -> None:
    assert LEGAL_MOVES[status] == frozenset()
    for new in JobStatus:
        with pytest.raises(MeshrunError) as info:
            transition(status, new)
        assert info.value.code == ErrorCode.ILLEGAL_TRANSITION


def test_canceled_only_via_canceling() -> None:
    assert [s for s in JobStatus if can_move(s, S.CANCELED)] == [S.CANCELING]
    assert LEGAL_MOVES[S.CANCELING] == {S.CANCELED}


def test_completed_only_from_running() -> None:
    assert [s for s in JobStatus if can_move(s, S.COMPLETED)] == [S.RUNNING]


def test_nothing_returns_to_pending() -> None:
    assert not any(can_move(s, S.PENDING) for s in JobStatus)


def test_every_status_reachable_from_pending() -> None:
    assert reachable(S.PENDING) == set(JobStatus)


@pytest.mark.parametrize("status", [s for s in JobStatus if s not in TERMINAL])
def test_every_live_status_can_finish(status: JobStatus) -> None:
    assert reachable(status) & TERMINAL
    assert S.CANCELED in reachable(status)  # a user can always cancel a live job


@given(statuses, statuses)
def test_transition_agrees_with_can_move(current: JobStatus, new: JobStatus) -> None:
    if can_move(current, new):
        assert transition(current, new) is new
    else:
        with pytest.raises(MeshrunError) as info:
            transition(current, new)
        err = info.value
        assert err.code == ErrorCode.ILLEGAL_TRANSITION
        assert err.details == {"from": current.value, "to": new.value}
        assert current.value in err.message and new.value in err.message


@settings(max_examples=300)
@given(st.lists(statuses, max_size=40))
def test_random_move_sequences(attempts: list[JobStatus]) -> None:
    state = S.PENDING
    path = [state]
    for new in attempts:
        try:
            moved = transition(state, new)
        except MeshrunError as exc:
            assert exc.code == ErrorCode.ILLEGAL_TRANSITION
            assert new not in LEGAL_MOVES[state]
            continue
        assert new in LEGAL_MOVES[state] and moved is new
        state = moved
        path.append(state)
    for before, after in itertools.pairwise(path):
        if after is S.CANCELED:
            assert before is S.CANCELING
        if after is S.COMPLETED:
            assert before is S.RUNNING
    assert all(s not in TERMINAL for s in path[:-1])  # nothing follows a terminal state


class JobLifecycle(RuleBasedStateMachine):
    """Attempt arbitrary moves; the model state only changes on accepted ones."""

    def __init__(self) -> None:
        super().__init__()
        self.state = S.PENDING
        self.history: list[JobStatus] = [S.PENDING]

    @rule(new=statuses)
    def attempt(self, new: JobStatus) -> None:
        legal = new in LEGAL_MOVES[self.state]
        try:
            result = transition(self.state, new)
        except MeshrunError as exc:
            assert not legal
            assert exc.code == ErrorCode.ILLEGAL_TRANSITION
            return
        assert legal and result is new
        self.history.append(new)
        self.state = new

    @rule(new=statuses)
    def attempt_only_legal(self, new: JobStatus) -> None:
        if can_move(self.state, new):
            self.history.append(transition(self.state, new))
            self.state = new

    @invariant()
    def terminal_is_final(self) -> None:
        assert all(s not in TERMINAL for s in self.history[:-1])

    @invariant()
    def can_still_finish(self) -> None:
        assert self.state in TERMINAL or reachable(self.state) & TERMINAL

    @invariant()
    def canceled_via_canceling(self) -> None:
        if self.state is S.CANCELED:
            assert self.history[-2] is S.CANCELING
        if self.state is S.COMPLETED:
            assert self.history[-2] is S.RUNNING


JobLifecycle.TestCase.settings = settings(max_examples=60, stateful_step_count=30)
TestJobLifecycle = JobLifecycle.TestCase
