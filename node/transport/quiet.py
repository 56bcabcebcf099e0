"""Aggregated warnings: a flood of junk costs the log one line per peer per window.

Measured before this existed: 35,500 junk gossip messages in 40 s wrote about
24,000 WARNING lines on every compute node. Now the first few drops of a kind
from a peer are logged at once (the operator sees who and why right away, and
a handful of mistakes is logged in full), later ones within the window are
only counted, and when the window ends one line
says "dropped N more <what> from <peer> in the last 10 s (<kind>; last: ...)".
A window with nothing new ends the peer's entry, so the next drop is again
logged at once; while drops keep coming, only the summaries are written. At
most `max_keys` (peer, kind) pairs are tracked; past that, drops are counted
under the peer "others".

Windows are flushed when the next drop arrives and by :func:`flush_all`, which
the mesh calls every second, so a summary never waits for more junk.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 10.0
MAX_KEYS = 256
IMMEDIATE = 3  # drops per (peer, kind) logged at once before counting starts
OTHERS = "others"

_registry: weakref.WeakSet[QuietLog] = weakref.WeakSet()


@dataclass
class _Tally:
    started: float
    what: str
    level: int
    prep: str
    shown: int = 1
    count: int = 0
    last: str = ""


class QuietLog:
    """Drops logged per (peer, kind): a few at once, then one summary line per window."""

    def __init__(
        self,
        logger: logging.Logger,
        window: float = WINDOW_S,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
        immediate: int = IMMEDIATE,
    ) -> None:
        self.logger = logger
        self.window = window
        self.immediate = immediate
        self.max_keys = max_keys
        self.clock = clock
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._next_flush = float("inf")
        self.total = 0  # drops seen, logged or not
        _registry.add(self)

    def dropped(
        self,
        what: str,
        peer: str,
        kind: str,
        detail: str,
        level: int = logging.WARNING,
        prep: str = "from",
    ) -> None:
        """Note that `what` (e.g. "job spec") `prep` `peer` was dropped, for reason `kind`."""
        now = self.clock()
        self.total += 1
        if now >= self._next_flush:
            self.flush(now)
        key = (peer, kind)
        tally = self._tallies.get(key)
        if tally is None and len(self._tallies) >= self.max_keys:
            key = (OTHERS, kind)
            tally = self._tallies.get(key)
        if tally is None:
            self._tallies[key] = _Tally(now, what, level, prep)
            self._next_flush = min(self._next_flush, now + self.window)
            self.logger.log(level, "dropped %s %s %s: %s", what, prep, peer, detail)
            return
        if tally.shown < self.immediate and key[0] != OTHERS:
            tally.shown += 1
            self.logger.log(level, "dropped %s %s %s: %s", what, prep, peer, detail)
            return
        tally.count += 1
        tally.last = f"{detail} ({prep} {peer})" if key[0] == OTHERS else detail
        tally.level = max(tally.level, level)

    def flush(self, now: float | None = None) -> None:
        """Write one summary line per (peer, kind) whose window ended with drops in it."""
        now = self.clock() if now is None else now
        if now < self._next_flush:
            return
        for key, tally in list(self._tallies.items()):
            if now - tally.started < self.window:
                continue
            if tally.count == 0:
                del self._tallies[key]
                continue
            peer, kind = key
            self.logger.log(
                tally.level,
                "dropped %d more %ss %s %s in the last %.0f s (%s; last: %s)",
                tally.count,
                tally.what,
                tally.prep,
                peer,
                now - tally.started,
                kind,
                tally.last,
            )
            tally.started, tally.count = now, 0
        self._next_flush = min(
            (t.started + self.window for t in self._tallies.values()), default=float("inf")
        )


def flush_all() -> None:
    """Flush every live QuietLog (the mesh calls this once a second)."""
    for quiet in list(_registry):
        quiet.flush()


__all__ = ["QuietLog", "flush_all"]
