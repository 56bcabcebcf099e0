"""Capacity (protocol.capacity): slots, the bounded priority queue, ETAs, run times, load price."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.capacity import (
    LOAD_PREMIUM,
    MAX_LOAD,
    MIN_ETA,
    PRIORITIES,
    Admission,
    RunTimes,
    Scheduler,
    Slot,
    eta,
    load_price,
)

CUDA = frozenset({"cuda"})
CPU_ONLY = frozenset({"cpu"})


def cuda(i: int) -> Slot:
    return Slot(f"cuda:{i}", "cuda", i)


def cpu(i: int) -> Slot:
    return Slot(f"cpu:{i}", "cpu", i)


def three_cpu(max_queue: int = 2) -> Scheduler:
    return Scheduler([cpu(0), cpu(1), cpu(2)], max_queue=max_queue)


# --- construction -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slots", "max_queue", "warm_size"),
    [([], 1, 4), ([cpu(0)], -1, 4), ([cpu(0), cpu(0)], 1, 4), ([cpu(0)], 1, -1)],
)
def test_a_scheduler_refuses_nonsense_configuration(
    slots: list[Slot], max_queue: int, warm_size: int
) -> None:
    with pytest.raises(ValueError):
        Scheduler(slots, max_queue, warm_size)


def test_a_new_scheduler_is_idle() -> None:
    s = Scheduler([cuda(0), cpu(0)], max_queue=0)
    assert s.slots == (cuda(0), cpu(0)) and s.max_queue == 0
    assert (s.free, s.busy, s.full) == (2, 0, False)
    assert s.running() == {} and s.queued() == []
    assert s.snapshot() == {
        "slots": 2,
        "busy": 0,
        "queued": 0,
        "max_queue": 0,
        "devices": [
            {"slot": "cuda:0", "kind": "cuda", "device_id": 0, "job": None},
            {"slot": "cpu:0", "kind": "cpu", "device_id": 0, "job": None},
        ],
    }


# --- admission --------------------------------------------------------------------------


def test_three_slots_run_three_jobs_and_the_fourth_queues() -> None:
    s = three_cpu()
    assert [s.admit(j, "normal", 0.0).outcome for j in "abc"] == ["run"] * 3
    assert s.running() == {"a": ("cpu:0",), "b": ("cpu:1",), "c": ("cpu:2",)}
    assert s.admit("d", "normal", 1.0) == Admission("queued", position=1)
    assert (s.free, s.busy, s.full) == (0, 3, False)
    assert s.queued() == ["d"] and s.position("d") == 1 and s.position("a") is None
    assert s.admitted_at("d") == 1.0 and s.admitted_at("a") is None
    snap = s.snapshot()
    assert snap["busy"] == 3 and snap["queued"] == 1
    assert [d["job"] for d in snap["devices"]] == ["a", "b", "c"]  # type: ignore[attr-defined]


def test_a_full_queue_answers_busy() -> None:
    s = three_cpu(max_queue=1)
    for j in "abcd":
        s.admit(j, "normal", 0.0)
    assert s.full
    assert s.admit("e", "high", 0.0) == Admission("busy")
    assert "e" not in s.queued() and "e" not in s.running()
    # Busy left no trace: the same id may be accepted later.
    assert s.release("a") == [("d", ("cpu:0",))]
    assert s.admit("e", "high", 0.0) == Admission("queued", position=1)


def test_no_queue_means_busy_as_soon_as_the_slots_are_taken() -> None:
    s = Scheduler([cpu(0)], max_queue=0)
    assert s.admit("a", "normal", 0.0).outcome == "run"
    assert s.full
    assert s.admit("b", "normal", 0.0).outcome == "busy"


def test_a_job_id_already_held_is_refused() -> None:
    s = Scheduler([cpu(0)], max_queue=1)
    s.admit("a", "normal", 0.0)
    s.admit("b", "normal", 0.0)
    for job in ("a", "b"):
        with pytest.raises(ValueError):
            s.admit(job, "normal", 0.0)


def test_a_job_the_node_can_never_run_is_refused() -> None:
    s = Scheduler([cpu(0), cpu(1)], max_queue=4)
    assert not s.can_ever_run(CUDA, 1)
    assert not s.can_ever_run(None, 3)
    assert not s.can_ever_run(None, 0)
    assert s.can_ever_run(None, 2) and s.can_ever_run(CPU_ONLY, 1)
    for kinds, need in ((CUDA, 1), (None, 3), (None, 0)):
        with pytest.raises(ValueError):
            s.admit("x", "normal", 0.0, kinds=kinds, need=need)
    assert s.running() == {} and s.queued() == []


def test_an_unknown_priority_waits_as_normal() -> None:
    s = Scheduler([cpu(0)], max_queue=4)
    s.admit("run", "normal", 0.0)
    s.admit("low", "low", 0.0)
    s.admit("odd", "urgent!!", 0.0)
    s.admit("normal", "normal", 0.0)
    s.admit("high", "high", 0.0)
    assert s.queued() == ["high", "odd", "normal", "low"]
    assert s.ahead("whatever") == s.ahead("normal") == 3


# --- order of starts --------------------------------------------------------------------


def test_freed_slots_go_high_then_normal_then_low_then_oldest() -> None:
    s = Scheduler([cpu(0)], max_queue=10)
    s.admit("running", "low", 0.0)
    for job, priority in [
        ("low1", "low"),
        ("normal1", "normal"),
        ("high1", "high"),
        ("low2", "low"),
        ("normal2", "normal"),
        ("high2", "high"),
    ]:
        s.admit(job, priority, 0.0)
    assert s.position("high1") == 1 and s.position("low2") == 6
    order = []
    current = "running"
    while True:
        started = s.release(current)
        if not started:
            break
        assert len(started) == 1
        current = started[0][0]
        assert started[0][1] == ("cpu:0",)
        order.append(current)
    assert order == ["high1", "high2", "normal1", "normal2", "low1", "low2"]


def test_ahead_counts_the_waiters_a_new_job_would_wait_behind() -> None:
    s = Scheduler([cpu(0)], max_queue=10)
    s.admit("run", "normal", 0.0)
    s.admit("h", "high", 0.0)
    s.admit("n", "normal", 0.0)
    s.admit("l", "low", 0.0)
    assert (s.ahead("high"), s.ahead("normal"), s.ahead("low")) == (1, 2, 3)


def test_backfill_a_wide_job_does_not_hold_back_a_narrow_one() -> None:
    s = Scheduler([cpu(0), cpu(1)], max_queue=4)
    s.admit("a", "normal", 0.0)
    s.admit("b", "normal", 0.0)
    assert s.admit("wide", "high", 0.0, need=2).outcome == "queued"
    assert s.admit("narrow", "low", 0.0).outcome == "queued"
    assert s.queued() == ["wide", "narrow"]
    assert s.release("a") == [("narrow", ("cpu:0",))]
    assert s.queued() == ["wide"]
    assert s.release("b") == []
    assert s.release("narrow") == [("wide", ("cpu:0", "cpu:1"))]


def test_a_job_that_fits_runs_beside_a_wide_job_that_waits() -> None:
    s = Scheduler([cpu(0), cpu(1)], max_queue=4)
    s.admit("a", "normal", 0.0)
    s.admit("wide", "high", 0.0, need=2)
    # One slot is free; the wide job cannot use it alone, so a newcomer does.
    assert s.admit("b", "low", 0.0) == Admission("run", slots=("cpu:1",))


def test_one_release_may_start_several_waiters() -> None:
    s = Scheduler([cpu(0), cpu(1), cpu(2)], max_queue=4)
    s.admit("wide", "normal", 0.0, need=3)
    for job in ("x", "y", "z"):
        s.admit(job, "normal", 0.0)
    started = s.release("wide")
    assert started == [("x", ("cpu:0",)), ("y", ("cpu:1",)), ("z", ("cpu:2",))]


def test_releasing_a_queued_job_frees_its_place_only() -> None:
    s = Scheduler([cpu(0)], max_queue=2)
    s.admit("a", "normal", 0.0)
    s.admit("b", "normal", 0.0)
    s.admit("c", "normal", 0.0)
    assert s.release("b") == []
    assert s.queued() == ["c"] and s.position("c") == 1 and s.busy == 1
    assert s.admit("d", "normal", 0.0).position == 2


def test_release_is_idempotent() -> None:
    s = Scheduler([cpu(0)], max_queue=2)
    s.admit("a", "normal", 0.0)
    s.admit("b", "normal", 0.0)
    assert s.release("a") == [("b", ("cpu:0",))]
    assert s.release("a") == []
    assert s.release("never") == []
    assert s.running() == {"b": ("cpu:0",)}


# --- kinds, width, warmth ---------------------------------------------------------------


def test_a_cuda_job_never_lands_on_a_cpu_slot() -> None:
    s = Scheduler([cuda(0), cpu(0), cpu(1)], max_queue=2)
    assert s.admit("g1", "normal", 0.0, kinds=CUDA).slots == ("cuda:0",)
    assert s.admit("g2", "high", 0.0, kinds=CUDA).outcome == "queued"
    assert s.free == 2
    # A CPU job is not held back by the CUDA job waiting ahead of it.
    assert s.admit("c1", "low", 0.0, kinds=CPU_ONLY).slots == ("cpu:0",)
    assert s.release("c1") == []
    assert s.release("g1") == [("g2", ("cuda:0",))]


def test_a_job_of_any_kind_prefers_cuda_then_the_lowest_name() -> None:
    s = Scheduler([cpu(0), cuda(10), cuda(2)], max_queue=0)
    assert s.admit("a", "normal", 0.0).slots == ("cuda:2",)
    assert s.admit("b", "normal", 0.0).slots == ("cuda:10",)
    assert s.admit("c", "normal", 0.0).slots == ("cpu:0",)


def test_a_job_needing_two_slots_takes_two_and_frees_both() -> None:
    s = Scheduler([cuda(0), cuda(1), cpu(0)], max_queue=2)
    assert s.admit("batch", "normal", 0.0, kinds=CUDA, need=2).slots == ("cuda:0", "cuda:1")
    assert s.busy == 2 and s.free == 1
    assert s.admit("g", "normal", 0.0, kinds=CUDA).outcome == "queued"
    assert s.release("batch") == [("g", ("cuda:0",))]
    assert s.busy == 1 and s.free_for(CUDA) == 1


def test_a_slot_holding_the_model_is_preferred() -> None:
    s = Scheduler([cuda(0), cuda(1), cpu(0)], max_queue=2)
    s.note_ran("cuda:1", "resnet")
    assert s.is_warm("resnet") and s.is_warm("resnet", "cuda")
    assert not s.is_warm("resnet", "cpu") and not s.is_warm("bert")
    assert s.admit("a", "normal", 0.0, model="resnet").slots == ("cuda:1",)
    assert s.admit("b", "normal", 0.0, model="bert").slots == ("cuda:0",)
    s.release("a")
    s.release("b")
    s.note_ran("cpu:0", "bert")
    # Warmth beats CUDA-first for a job that takes any kind.
    assert s.admit("c", "normal", 0.0, model="bert").slots == ("cpu:0",)


def test_a_queued_job_starts_on_a_warm_slot_when_several_free() -> None:
    s = Scheduler([cpu(0), cpu(1)], max_queue=2)
    s.note_ran("cpu:1", "m")
    s.admit("wide", "normal", 0.0, need=2)
    s.admit("q", "normal", 0.0, model="m")
    assert s.release("wide") == [("q", ("cpu:1",))]


def test_warm_sessions_are_an_lru_per_slot() -> None:
    s = Scheduler([cpu(0)], max_queue=0, warm_size=2)
    s.note_ran("cpu:0", "a")
    s.note_ran("cpu:0", "b")
    s.note_ran("cpu:0", "a")
    s.note_ran("cpu:0", "c")
    assert s.is_warm("a") and s.is_warm("c") and not s.is_warm("b")
    with pytest.raises(ValueError):
        s.note_ran("cuda:7", "a")


def test_no_warm_tracking_when_warm_size_is_zero() -> None:
    s = Scheduler([cpu(0)], max_queue=0, warm_size=0)
    s.note_ran("cpu:0", "a")
    assert not s.is_warm("a")


# --- ETA --------------------------------------------------------------------------------


def test_eta_is_the_run_alone_when_a_slot_is_free() -> None:
    s = three_cpu()
    assert eta(s, "normal", 2.0) == 2.0
    assert eta(s, "normal", 0.0) == MIN_ETA
    assert eta(s, "normal", 2.0, need=3) == 2.0


def test_eta_waits_when_the_slots_are_taken() -> None:
    s = three_cpu(max_queue=10)
    for j in "abc":
        s.admit(j, "normal", 0.0)
    assert eta(s, "normal", 3.0) == pytest.approx(3.0 * 1 / 3 + 3.0)
    s.admit("d", "normal", 0.0)
    assert eta(s, "normal", 3.0) == pytest.approx(3.0 * 2 / 3 + 3.0)
    assert eta(s, "high", 3.0) == pytest.approx(3.0 * 1 / 3 + 3.0)


def test_eta_counts_only_slots_of_the_jobs_kinds() -> None:
    s = Scheduler([cuda(0), cpu(0), cpu(1)], max_queue=4)
    s.admit("g", "normal", 0.0, kinds=CUDA)
    assert eta(s, "normal", 1.0) == 1.0
    assert eta(s, "normal", 1.0, kinds=CUDA) == pytest.approx(1.0 / 1 + 1.0)
    assert eta(s, "normal", 1.0, need=3) == pytest.approx(1.0 / 3 + 1.0)


def test_eta_waits_behind_a_queue_even_with_a_free_slot() -> None:
    s = Scheduler([cpu(0), cpu(1)], max_queue=4)
    s.admit("a", "normal", 0.0)
    s.admit("wide", "normal", 0.0, need=2)
    assert eta(s, "normal", 1.0) == pytest.approx(1.0 * 2 / 2 + 1.0)


@pytest.mark.parametrize("run", [-1.0, math.nan, math.inf, -math.inf])
def test_eta_of_a_nonsense_run_time_is_finite(run: float) -> None:
    s = Scheduler([cpu(0)], max_queue=2)
    assert eta(s, "normal", run) == MIN_ETA
    s.admit("a", "normal", 0.0)
    assert eta(s, "normal", run) == MIN_ETA


@given(
    priorities=st.lists(st.sampled_from([*PRIORITIES, "odd"]), max_size=30),
    asked=st.sampled_from([*PRIORITIES, "odd"]),
    run=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    need=st.integers(min_value=1, max_value=2),
    free_slots=st.booleans(),
)
def test_eta_never_shrinks_as_the_queue_grows(
    priorities: list[str], asked: str, run: float, need: int, free_slots: bool
) -> None:
    s = Scheduler([cpu(0), cpu(1)], max_queue=len(priorities))
    if not free_slots:
        s.admit("x", "normal", 0.0)
        s.admit("y", "normal", 0.0)
    before = eta(s, asked, run, need)
    for i, p in enumerate(priorities):
        s.admit(f"q{i}", p, 0.0, need=2)
        now = eta(s, asked, run, need)
        assert math.isfinite(now) and now >= MIN_ETA and now >= before
        before = now


# --- run times --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_models": 0},
        {"alpha": 0.0},
        {"alpha": 1.5},
        {"default": -1.0},
        {"default": math.inf},
    ],
)
def test_run_times_refuse_nonsense_configuration(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RunTimes(**kwargs)  # type: ignore[arg-type]


def test_run_times_are_an_ewma() -> None:
    t = RunTimes(alpha=0.5)
    t.record("m", "cuda", False, 2.0)
    assert t.estimate("m", "cuda", False) == 2.0
    t.record("m", "cuda", False, 4.0)
    assert t.estimate("m", "cuda", False) == pytest.approx(3.0)
    t.record("m", "cuda", False, 4.0)
    assert t.estimate("m", "cuda", False) == pytest.approx(3.5)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_run_times_ignore_a_nonsense_time(bad: float) -> None:
    t = RunTimes(default=0.7)
    t.record("m", "cpu", True, bad)
    assert t.estimate("m", "cpu", True) == 0.7
    t.record("m", "cpu", True, 1.0)
    t.record("m", "cpu", True, bad)
    assert t.estimate("m", "cpu", True) == 1.0


def test_run_times_guess_the_other_warmth() -> None:
    t = RunTimes()
    t.record("warm-only", "cuda", False, 1.0)
    t.record("cold-only", "cuda", True, 3.0)
    assert t.estimate("warm-only", "cuda", True) == pytest.approx(2 * 1.0 + 0.5)
    assert t.estimate("cold-only", "cuda", False) == pytest.approx(1.5)
    # The guess never makes a warm run slower than a cold one.
    assert t.estimate("cold-only", "cuda", False) <= t.estimate("cold-only", "cuda", True)


def test_run_times_fall_back_to_the_kind_then_the_default() -> None:
    t = RunTimes(default=0.9)
    assert t.estimate("new", "cuda", False) == 0.9
    t.record("a", "cuda", False, 1.0)
    t.record("b", "cuda", False, 3.0)
    t.record("c", "cpu", False, 100.0)
    assert t.estimate("new", "cuda", False) == pytest.approx(2.0)
    assert t.estimate("new", "cuda", True) == pytest.approx((2.5 + 6.5) / 2)
    # A known model with no time on this kind counts as new on it.
    assert t.estimate("c", "cuda", False) == pytest.approx(2.0)
    assert t.estimate("a", "tpu", False) == 0.9


def test_run_times_keep_the_most_recently_run_models() -> None:
    t = RunTimes(max_models=2, default=0.0)
    t.record("a", "cpu", False, 1.0)
    t.record("b", "cpu", False, 2.0)
    t.estimate("a", "cpu", False)  # estimating does not keep a model
    t.record("a", "cpu", True, 5.0)  # running it does
    t.record("c", "cpu", False, 3.0)
    assert t.estimate("a", "cpu", False) == 1.0
    assert t.estimate("c", "cpu", False) == 3.0
    assert t.estimate("b", "cpu", False) == pytest.approx((1.0 + 3.0) / 2)


# --- load price -------------------------------------------------------------------------


def test_an_idle_node_asks_exactly_its_base_price() -> None:
    assert load_price(1.3, 0, 0, 4) == 1.3
    assert load_price(1.3, 0, 0, 0) == 1.3
    assert load_price(1.3, -2, -1, 4) == 1.3


def test_the_price_rises_with_load_up_to_a_cap() -> None:
    assert load_price(1.0, 2, 0, 4) == pytest.approx(1 + LOAD_PREMIUM * 0.5)
    assert load_price(1.0, 4, 4, 4) == pytest.approx(1 + LOAD_PREMIUM * 2.0)
    assert load_price(1.0, 4, 400, 4) == pytest.approx(1 + LOAD_PREMIUM * MAX_LOAD)
    assert load_price(1.0, 1, 0, 0) == pytest.approx(1 + LOAD_PREMIUM * MAX_LOAD)


@given(
    base=st.floats(min_value=0, max_value=1e9, allow_nan=False),
    busy=st.integers(min_value=-5, max_value=100),
    queued=st.integers(min_value=-5, max_value=1000),
    slots=st.integers(min_value=-1, max_value=64),
)
def test_the_price_stays_within_its_bounds(base: float, busy: int, queued: int, slots: int) -> None:
    price = load_price(base, busy, queued, slots)
    assert base <= price <= base * (1 + LOAD_PREMIUM * MAX_LOAD)


# --- property: random admit/release sequences -------------------------------------------

KINDS_CHOICES = [None, CUDA, CPU_ONLY]
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("admit"),
            st.sampled_from([*PRIORITIES, "odd"]),
            st.sampled_from(KINDS_CHOICES),
            st.integers(min_value=1, max_value=3),
            st.sampled_from([None, "m1", "m2"]),
        ),
        st.tuples(st.just("release"), st.integers(min_value=0, max_value=40)),
        st.tuples(st.just("note"), st.integers(min_value=0, max_value=3), st.sampled_from(["m1"])),
    ),
    max_size=60,
)


def check_invariants(s: Scheduler) -> None:
    held = [name for names in s.running().values() for name in names]
    assert len(held) == len(set(held)), "a slot is assigned to two jobs"
    assert s.busy == len(held) and s.free == len(s.slots) - len(held)
    devices = s.snapshot()["devices"]
    assert isinstance(devices, list)
    assert {d["slot"]: d["job"] for d in devices if d["job"] is not None} == {
        name: job for job, names in s.running().items() for name in names
    }
    assert len(s.queued()) <= s.max_queue
    assert [s.position(j) for j in s.queued()] == list(range(1, len(s.queued()) + 1))
    assert not set(s.queued()) & set(s.running())


@settings(max_examples=200)
@given(steps=ops, max_queue=st.integers(min_value=0, max_value=5))
def test_random_admits_and_releases_keep_the_books_straight(
    steps: list[tuple[object, ...]], max_queue: int
) -> None:
    slots = [cuda(0), cuda(1), cpu(0), cpu(1)]
    kind_of = {slot.name: slot.kind for slot in slots}
    s = Scheduler(slots, max_queue=max_queue)
    wanted: dict[str, frozenset[str] | None] = {}
    widths: dict[str, int] = {}
    ids = 0
    waiting: set[str] = set()

    def started(job: str, names: tuple[str, ...]) -> None:
        kinds = wanted[job]
        assert len(names) == widths[job]
        assert kinds is None or all(kind_of[n] in kinds for n in names)
        waiting.discard(job)

    for step in steps:
        if step[0] == "admit":
            _, priority, kinds, need, model = step
            assert isinstance(priority, str) and isinstance(need, int)
            job = f"j{ids}"
            ids += 1
            if not s.can_ever_run(kinds, need):  # type: ignore[arg-type]
                continue
            wanted[job], widths[job] = kinds, need  # type: ignore[assignment]
            got = s.admit(job, priority, 0.0, kinds=kinds, need=need, model=model)  # type: ignore[arg-type]
            if got.outcome == "run":
                started(job, got.slots)
            elif got.outcome == "queued":
                waiting.add(job)
                assert s.position(job) == got.position
            else:
                assert len(s.queued()) == max_queue
        elif step[0] == "release":
            index = step[1]
            assert isinstance(index, int)
            job = f"j{index}"
            waiting.discard(job)
            for other, names in s.release(job):
                started(other, names)
        else:
            _, index, model = step
            assert isinstance(index, int) and isinstance(model, str)
            s.note_ran(slots[index].name, model)
        check_invariants(s)
        # Backfill leaves no waiter that would fit the free slots.
        for job in s.queued():
            assert s.free_for(wanted[job]) < widths[job]
    while s.running():
        for other, names in s.release(next(iter(s.running()))):
            started(other, names)
        check_invariants(s)
    assert not waiting and s.queued() == [] and s.free == len(slots)
