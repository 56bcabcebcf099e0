"""Settlements, signed and received (STUB: filled in by the settlement work, issue 10)."""

from __future__ import annotations

from node.jobs.store import JobDB


class Ledger:
    def __init__(self, db: JobDB) -> None:
        self.db = db
