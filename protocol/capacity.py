"""Capacity: which of a compute node's execution slots runs an accepted job, and
which accepted jobs wait, in what order, and for how long a bid says they will.

A node has one slot per CUDA device and a few CPU slots. Accepting more jobs
than it has slots is what lets it keep every device busy, but an unbounded
backlog would promise ETAs it cannot keep, so the queue is bounded and a node
whose slots and queue are all taken answers BUSY instead of bidding. The same
decisions feed the bid itself: the ETA from the queue ahead of the job
(`eta`), the price from the load (`load_price`). All of it is pure so a unit
test reaches every branch; node/ holds the workers and asks these objects
what to start.

Threat: hostile requesters flood a node with accepts to crowd out everyone
else, and a requester may claim "high" priority for every job. The queue
bound caps what a flood can hold (the rest is told BUSY), the load price makes
holding it cost more, and priority only orders the queue: it never preempts a
running job, so a lying priority buys at most a place ahead of other waiters.
A job id the scheduler already holds is refused, so one job cannot take two
slots by being accepted twice.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PRIORITIES: tuple[str, ...] = ("urgent", "high", "normal", "low")
"""JobSpec priorities, first served first."""

SlotKind = Literal["cuda", "cpu"]

_KIND_ORDER: dict[str, int] = {"cuda": 0, "cpu": 1}


def _rank(priority: str) -> int:
    """Unknown priorities wait as "normal": the wire model validates them, and a
    scheduler that raised here would let one odd spec stop a node bidding."""
    try:
        return PRIORITIES.index(priority)
    except ValueError:
        return PRIORITIES.index("normal")


def _natural(name: str) -> tuple[str | int, ...]:
    """ "cuda:2" before "cuda:10": digits compare as numbers."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


@dataclass(frozen=True)
class Slot:
    name: str
    kind: SlotKind
    device_id: int


@dataclass(frozen=True)
class Admission:
    """What happened to an accepted job: it runs on `slots`, waits at `position`
    (1-based), or the node is busy and the requester should look elsewhere."""

    outcome: Literal["run", "queued", "busy"]
    slots: tuple[str, ...] = ()
    position: int | None = None


@dataclass(frozen=True)
class _Waiting:
    job_id: str
    rank: int
    seq: int
    kinds: frozenset[str] | None
    need: int
    model: str | None
    admitted_at: float

    @property
    def order(self) -> tuple[int, int]:
        return (self.rank, self.seq)


class Scheduler:
    """Slots and the bounded queue of one compute node.

    Queued jobs start in (priority, age) order, with backfill: when slots free
    up, every queued job that fits starts, so a job that needs two slots while
    one is free does not hold back a later job that needs one. The price of
    backfill is that a wide job can wait while narrow ones keep the slots
    busy; its own timeout and the queue bound limit how long. Because every
    release starts whatever fits, no queued job ever fits the free slots, so a
    newly accepted job that fits them runs at once without jumping anyone.
    """

    def __init__(self, slots: Sequence[Slot], max_queue: int, warm_size: int = 4) -> None:
        if not slots:
            raise ValueError("a scheduler needs at least one slot")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, not {max_queue}")
        if warm_size < 0:
            raise ValueError(f"warm_size must be >= 0, not {warm_size}")
        names = [s.name for s in slots]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate slot names in {names}")
        self.slots: tuple[Slot, ...] = tuple(slots)
        self.max_queue = max_queue
        self.warm_size = warm_size
        self._holder: dict[str, str | None] = {s.name: None for s in self.slots}
        self._running: dict[str, tuple[str, ...]] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._queue: list[_Waiting] = []
        self._warm: dict[str, OrderedDict[str, None]] = {s.name: OrderedDict() for s in self.slots}
        self._seq = 0

    def _acceptable(self, kinds: frozenset[str] | None) -> list[Slot]:
        return [s for s in self.slots if kinds is None or s.kind in kinds]

    def can_ever_run(self, kinds: frozenset[str] | None, need: int) -> bool:
        """Whether this node has enough slots of the kinds, busy or not; a job
        that cannot ever run must be refused, never queued, or it would wait forever."""
        return 1 <= need <= len(self._acceptable(kinds))

    def _pick(
        self, kinds: frozenset[str] | None, need: int, model: str | None
    ) -> tuple[str, ...] | None:
        """Free slots for a job, or None when too few are free.

        Slots already holding the model's session come first (no load), then
        CUDA before CPU, so a job that accepts any device gets the fast one,
        then the lowest name.
        """
        free = [s for s in self._acceptable(kinds) if self._holder[s.name] is None]
        if len(free) < need:
            return None
        free.sort(
            key=lambda s: (
                model is None or model not in self._warm[s.name],
                _KIND_ORDER.get(s.kind, len(_KIND_ORDER)),
                _natural(s.name),
            )
        )
        return tuple(s.name for s in free[:need])

    def _start(self, job_id: str, chosen: tuple[str, ...]) -> None:
        for name in chosen:
            self._holder[name] = job_id
        self._running[job_id] = chosen

    def admit(
        self,
        job_id: str,
        priority: str,
        now: float,
        *,
        kinds: frozenset[str] | None = None,
        need: int = 1,
        model: str | None = None,
    ) -> Admission:
        """Run an accepted job now, queue it, or answer busy.

        Raises ValueError for a job id already held (an Accept replayed or
        sent twice must not take a second slot) and for a job this node can
        never run (the caller asks `can_ever_run` before bidding).
        """
        if job_id in self._running or job_id in self._waiting:
            raise ValueError(f"job {job_id} is already running or queued")
        if not self.can_ever_run(kinds, need):
            raise ValueError(f"job {job_id} needs {need} slot(s) of kinds {kinds}")
        chosen = self._pick(kinds, need, model)
        if chosen is not None:
            self._start(job_id, chosen)
            return Admission("run", slots=chosen)
        if len(self._queue) >= self.max_queue:
            return Admission("busy")
        entry = _Waiting(job_id, _rank(priority), self._seq, kinds, need, model, now)
        self._seq += 1
        self._waiting[job_id] = entry
        self._queue.append(entry)
        self._queue.sort(key=lambda w: w.order)
        return Admission("queued", position=self._queue.index(entry) + 1)

    def release(self, job_id: str) -> list[tuple[str, tuple[str, ...]]]:
        """The job ended however it ended, or was cancelled while it waited.

        Returns the queued jobs that start on the freed slots, in start order
        (priority, then age, each that fits: backfill). Releasing a job the
        scheduler does not hold returns [], so a cancel racing a finish is harmless.
        """
        entry = self._waiting.pop(job_id, None)
        if entry is not None:
            self._queue.remove(entry)
            return []
        chosen = self._running.pop(job_id, None)
        if chosen is None:
            return []
        for name in chosen:
            self._holder[name] = None
        started: list[tuple[str, tuple[str, ...]]] = []
        for waiting in list(self._queue):
            picked = self._pick(waiting.kinds, waiting.need, waiting.model)
            if picked is None:
                continue
            self._queue.remove(waiting)
            del self._waiting[waiting.job_id]
            self._start(waiting.job_id, picked)
            started.append((waiting.job_id, picked))
        return started

    def note_ran(self, slot: str, model: str) -> None:
        """The slot's worker now holds this model's session; it keeps the
        `warm_size` most recent ones, as the worker's own session cache does."""
        if slot not in self._warm:
            raise ValueError(f"unknown slot {slot!r}")
        if self.warm_size == 0:
            return
        warm = self._warm[slot]
        warm[model] = None
        warm.move_to_end(model)
        while len(warm) > self.warm_size:
            warm.popitem(last=False)

    def is_warm(self, model: str, kind: str | None = None) -> bool:
        """Whether some slot (of `kind`, if given) would run the model without loading it."""
        return any(
            model in self._warm[s.name] for s in self.slots if kind is None or s.kind == kind
        )

    def running(self) -> dict[str, tuple[str, ...]]:
        return dict(self._running)

    def queued(self) -> list[str]:
        return [w.job_id for w in self._queue]

    def position(self, job_id: str) -> int | None:
        entry = self._waiting.get(job_id)
        return None if entry is None else self._queue.index(entry) + 1

    def admitted_at(self, job_id: str) -> float | None:
        """When a queued job was accepted (the `now` given to `admit`), for the
        node to give up a job whose deadline passes while it waits."""
        entry = self._waiting.get(job_id)
        return None if entry is None else entry.admitted_at

    def free_for(self, kinds: frozenset[str] | None) -> int:
        """Free slots a job of these kinds could take."""
        return sum(1 for s in self._acceptable(kinds) if self._holder[s.name] is None)

    @property
    def free(self) -> int:
        return self.free_for(None)

    @property
    def busy(self) -> int:
        return len(self.slots) - self.free

    @property
    def full(self) -> bool:
        """Nothing more can be taken, not even a one-slot job: bids answer BUSY."""
        return self.free == 0 and len(self._queue) >= self.max_queue

    def ahead(self, priority: str) -> int:
        """Queued jobs a new job of this priority would wait behind: those of a
        higher or the same priority (the same priority came earlier)."""
        rank = _rank(priority)
        return sum(1 for w in self._queue if w.rank <= rank)

    def snapshot(self) -> dict[str, object]:
        return {
            "slots": len(self.slots),
            "busy": self.busy,
            "queued": len(self._queue),
            "max_queue": self.max_queue,
            "devices": [
                {
                    "slot": s.name,
                    "kind": s.kind,
                    "device_id": s.device_id,
                    "job": self._holder[s.name],
                }
                for s in self.slots
            ],
        }


COLD_START = 0.5
"""Seconds a cold run is guessed to spend on loading a session, beyond a second warm run."""


class RunTimes:
    """Recent run time (seconds) per (model, slot kind, cold/warm), as an EWMA,
    bounded (LRU of max_models) since model ids come from requesters.

    An EWMA follows a model whose inputs grow or a device that slows down
    without letting one odd run decide the next ETA. Only `record` refreshes a
    model's place in the LRU: estimates are asked for every bid, including
    bids on jobs this node never gets.
    """

    def __init__(self, max_models: int = 256, alpha: float = 0.3, default: float = 0.5) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, not {max_models}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], not {alpha}")
        if not (math.isfinite(default) and default >= 0):
            raise ValueError(f"default must be a finite number >= 0, not {default}")
        self.max_models = max_models
        self.alpha = alpha
        self.default = default
        self._times: OrderedDict[str, dict[tuple[str, bool], float]] = OrderedDict()

    def record(self, model: str, kind: str, cold: bool, seconds: float) -> None:
        """A clock that jumped gives a non-finite or negative time; it would
        poison every later estimate, so it is ignored."""
        if not (math.isfinite(seconds) and seconds >= 0):
            return
        times = self._times.setdefault(model, {})
        self._times.move_to_end(model)
        old = times.get((kind, cold))
        times[(kind, cold)] = (
            seconds if old is None else self.alpha * seconds + (1 - self.alpha) * old
        )
        while len(self._times) > self.max_models:
            self._times.popitem(last=False)

    def _known(self, model: str, kind: str, cold: bool) -> float | None:
        """The model's time on `kind`, from the other warmth when only that is known.

        Cold from warm is `2 * warm + COLD_START`: loading reads and optimises
        the whole graph, which costs about a run more, plus a fixed start. Warm
        from cold is `cold / 2`, the same guess turned round (ignoring the
        fixed part, so a warm guess is never negative). Both lean the way an
        honest bid should: a cold guess high, a warm guess never above cold.
        """
        times = self._times.get(model)
        if times is None:
            return None
        exact = times.get((kind, cold))
        if exact is not None:
            return exact
        other = times.get((kind, not cold))
        if other is None:
            return None
        return 2 * other + COLD_START if cold else other / 2

    def estimate(self, model: str, kind: str, cold: bool) -> float:
        """The model's own time; else the mean of every known model on this kind
        (a new model is most like the ones this node runs); else `default`."""
        known = self._known(model, kind, cold)
        if known is not None:
            return known
        others = [t for m in self._times if (t := self._known(m, kind, cold)) is not None]
        return sum(others) / len(others) if others else self.default


MIN_ETA = 0.05
"""The least ETA a bid promises: no job finishes in no time."""


def eta(
    scheduler: Scheduler,
    priority: str,
    run_seconds: float,
    need: int = 1,
    *,
    kinds: frozenset[str] | None = None,
) -> float:
    """The ETA a bid promises: the run itself, plus the wait when the job would queue.

    The wait is a rough wave model: the jobs ahead and this one spread over
    the node's slots, each taking about `run_seconds`, so the wait is
    `run_seconds * (ahead + 1) / slots`. It is rough (the jobs ahead run other
    models), but it never shrinks as the queue grows, so a busier node never
    promises sooner. A nonsense `run_seconds` (negative, NaN, infinite) counts
    as 0 so the answer stays finite.
    """
    run = run_seconds if math.isfinite(run_seconds) and run_seconds > 0 else 0.0
    ahead = scheduler.ahead(priority)
    acceptable = [s for s in scheduler.slots if kinds is None or s.kind in kinds]
    if scheduler.free_for(kinds) >= need and ahead == 0:
        return max(MIN_ETA, run)
    wait = run * (ahead + 1) / max(len(acceptable), 1)
    return max(MIN_ETA, wait + run)


LOAD_PREMIUM = 0.25
"""How much dearer a bid gets per unit of load (jobs held per slot)."""

MAX_LOAD = 2.0
"""Load beyond which the price stops rising: a full queue is answered BUSY anyway."""


def load_price(base: float, busy: int, queued: int, slots: int) -> float:
    """The price a bid asks: dearer as the node fills, so a flood of accepts
    pays more for every slot it holds and quiet nodes win the next bids.

    Capped at `MAX_LOAD` so the price stays predictable; an idle node asks
    exactly `base`.
    """
    held = max(busy, 0) + max(queued, 0)
    if held == 0:
        return base
    load = MAX_LOAD if slots <= 0 else min(held / slots, MAX_LOAD)
    return base * (1 + LOAD_PREMIUM * load)
