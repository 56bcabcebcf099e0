"""Durable per-peer records (STUB: filled in by the reputation work, issue 10)."""

from __future__ import annotations

import time
from typing import Any

from node.jobs.store import JobDB
from protocol.reputation import STRANGER, Standing


class Reputation:
    def __init__(self, db: JobDB) -> None:
        self.db = db

    def observe(
        self,
        peer: str,
        outcome: str,
        *,
        role: str = "executor",
        latency: float | None = None,
        now: float | None = None,
    ) -> None:
        _ = (peer, outcome, role, latency, now or time.time())

    def standing(self, peer: str, now: float | None = None) -> Standing:
        return STRANGER

    def peers(self, now: float | None = None) -> list[dict[str, Any]]:
        return []
