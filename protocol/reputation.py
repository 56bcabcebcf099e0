"""What a node knows of each peer's past, as a pure function of its counters.

STUB: the scoring is filled in by the reputation work (issue 10); the shape of
`Standing` is the interface the job machine and the bid ranking use.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Standing:
    """A peer as the job machine sees it when its bid arrives.

    `score` in [0, 1] (0.5 for a stranger) enters bid ranking next to price and
    ETA; `excluded_until` (epoch seconds) keeps a peer caught returning wrong
    results out of every job until then; `audits_passed` counts the times its
    result agreed with another executor's, so sampling can audit strangers
    more often than proven peers.
    """

    score: float = 0.5
    excluded_until: float | None = None
    audits_passed: int = 0
    why: str = "no history"

    def excluded(self, now: float) -> bool:
        return self.excluded_until is not None and now < self.excluded_until


STRANGER = Standing()
