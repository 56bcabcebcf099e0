"""Verification policies: how many executors answer a job and when their answers settle it.

A receipt proves who answered and that the bytes are the ones it named, not
that the answer is right. Re-execution is the practical check on an open
network (Proof of Sampling, arXiv 2405.00295): run the job again elsewhere,
always (`redundant:K`) or at random (`sample:P`), and compare the outputs
within a tolerance, since GPU and multi-threaded CPU inference is not
bit-reproducible. Everything here is pure: the requester's job machine
(protocol/lifecycle.py) asks these functions what to do next and its driver
does the fetching and the tensor comparison (protocol/compare.py).

Threat: the executors of one job may lie, collude in pairs, or copy each
other's digests; a majority of agreeing executors is the strongest claim a
requester can make without running the model itself. An executor whose answer
is outvoted is disputed, paid nothing and, through the reputation record,
excluded from later jobs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import ErrorCode, MeshrunError
from protocol.messages import VERIFICATION_PATTERN
from protocol.reputation import Standing

TRUST_AFTER = 3
"""Audits a peer must have passed before sampling treats it at the job's rate."""

STRANGER_AUDIT = 0.5
"""How often sampling audits a peer with fewer than TRUST_AFTER passed audits.

A fixed rate P lets a cheater win 1/P jobs on average before its first audit
(10 at P = 0.1, and more than 10 a third of the time). Auditing unproven peers
at one in two catches a cheater within 10 wins with probability 1 - 2^-10,
while an honest peer leaves this rate after a few agreeing audits, so it adds
little to the compute a long-running network spends.
"""


class Kind(StrEnum):
    NONE = "none"
    RECEIPT = "receipt"
    REDUNDANT = "redundant"
    SAMPLE = "sample"


@dataclass(frozen=True)
class Policy:
    kind: Kind
    k: int = 1
    p: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Policy:
        if not re.fullmatch(VERIFICATION_PATTERN, text):
            raise MeshrunError(
                ErrorCode.INVALID_SPEC,
                f"unknown verification policy {text!r}: use receipt, redundant:K (K 2..9) "
                "or sample:P (P between 0 and 1)",
                {"verification": text},
            )
        name, _, arg = text.partition(":")
        kind = Kind(name)
        if kind == Kind.REDUNDANT:
            return cls(kind, k=int(arg))
        if kind == Kind.SAMPLE:
            return cls(kind, p=float(arg))
        return cls(kind)

    def __str__(self) -> str:
        if self.kind == Kind.REDUNDANT:
            return f"redundant:{self.k}"
        if self.kind == Kind.SAMPLE:
            return f"sample:{self.p:g}"
        return self.kind.value

    @property
    def multi(self) -> bool:
        """Whether this policy may run a job on more than one executor."""
        return self.kind in (Kind.REDUNDANT, Kind.SAMPLE)

    def executors(self, audited: bool) -> int:
        """Executors started at once when bidding closes."""
        if self.kind == Kind.REDUNDANT:
            return self.k
        return 2 if audited and self.kind == Kind.SAMPLE else 1

    def quorum(self, audited: bool) -> int:
        """Agreeing answers that settle the job: a strict majority of the executors."""
        return self.executors(audited) // 2 + 1

    def tiebreaks(self, audited: bool) -> int:
        """Extra executors a split may call on (one, as the issue of record asks)."""
        return 1 if self.executors(audited) > 1 else 0


def audit_probability(policy: Policy, standing: Standing) -> float:
    if policy.kind != Kind.SAMPLE or policy.p <= 0:
        return 0.0
    if standing.audits_passed < TRUST_AFTER:
        return max(policy.p, STRANGER_AUDIT)
    return policy.p


def should_audit(policy: Policy, standing: Standing, draw: float) -> bool:
    """`draw` is uniform in [0, 1), drawn by the driver where the executor cannot see it."""
    return draw < audit_probability(policy, standing)


Pair = frozenset[int]


def pair(a: int, b: int) -> Pair:
    return frozenset((a, b))


def groups(answers: Mapping[int, Mapping[str, str]], same: Mapping[Pair, bool]) -> list[list[int]]:
    """Answers (attempt → output digests) that agree, joined: equal digests agree
    without any tensor fetched; other pairs agree when a comparison said so.

    Largest group first, then the one holding the earliest attempt.
    """
    parent = {a: a for a in answers}

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    ids = sorted(answers)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            if agree(answers, same, a, b):
                parent[root(a)] = root(b)
    joined: dict[int, list[int]] = {}
    for a in ids:
        joined.setdefault(root(a), []).append(a)
    return sorted(joined.values(), key=lambda g: (-len(g), g[0]))


def agree(
    answers: Mapping[int, Mapping[str, str]], same: Mapping[Pair, bool], a: int, b: int
) -> bool:
    if dict(answers[a]) == dict(answers[b]):
        return True
    return same.get(pair(a, b), False)


def undecided(answers: Mapping[int, Mapping[str, str]], same: Mapping[Pair, bool]) -> list[Pair]:
    """Pairs whose digests differ and whose tensors nobody has compared yet."""
    ids = sorted(answers)
    return [
        pair(a, b)
        for i, a in enumerate(ids)
        for b in ids[i + 1 :]
        if dict(answers[a]) != dict(answers[b]) and pair(a, b) not in same
    ]


class Next(StrEnum):
    WAIT = "wait"  # executors are still running, or comparisons are under way
    COMPARE = "compare"  # compare the tensors of `pairs`
    ACCEPT = "accept"  # `winners` agree in a quorum
    TIEBREAK = "tiebreak"  # no quorum with everyone answered: start one more executor
    MISMATCH = "mismatch"  # no quorum and nobody left to ask


@dataclass(frozen=True)
class Decision:
    next: Next
    winners: tuple[int, ...] = ()
    losers: tuple[int, ...] = ()
    pairs: tuple[Pair, ...] = ()


def decide(
    quorum: int,
    answers: Mapping[int, Mapping[str, str]],
    same: Mapping[Pair, bool],
    *,
    running: int,
    comparing: Iterable[Pair] = (),
    can_add: bool,
) -> Decision:
    """What settles the job next, given the answers so far.

    `running`: executors that may still answer; `comparing`: pairs whose tensor
    comparison is under way; `can_add`: whether one more executor may be started
    (a tie-break left and a bid to give it to).
    """
    found = groups(answers, same)
    busy = set(comparing)
    if found and len(found[0]) >= quorum:
        winners = tuple(found[0])
        losers = tuple(a for g in found[1:] for a in g)
        # A loser is disputed only after its tensors met a winner's: digests that
        # differ may still be honest noise within the tolerance.
        unheard = tuple(
            pair(x, winners[0]) for x in losers if not any(pair(x, w) in same for w in winners)
        )
        todo = tuple(p for p in unheard if p not in busy)
        if todo:
            return Decision(Next.COMPARE, pairs=todo)
        if unheard:
            return Decision(Next.WAIT)
        return Decision(Next.ACCEPT, winners, losers)
    todo = tuple(p for p in undecided(answers, same) if p not in busy)
    if todo:
        return Decision(Next.COMPARE, pairs=todo)
    if running > 0 or busy:
        return Decision(Next.WAIT)
    # Everyone answered and no group is big enough: could any group still reach quorum?
    if can_add and found and len(found[0]) + 1 >= quorum:
        return Decision(Next.TIEBREAK)
    return Decision(Next.MISMATCH, losers=tuple(sorted(answers)))


__all__ = [
    "STRANGER_AUDIT",
    "TRUST_AFTER",
    "Decision",
    "Kind",
    "Next",
    "Pair",
    "Policy",
    "agree",
    "audit_probability",
    "decide",
    "groups",
    "pair",
    "should_audit",
    "undecided",
]
