"""One devstack shared by the adversarial tests that need real node processes.

A requester and one honest compute node, started once per session; tests add
the misbehaving compute nodes they need (`Devstack.add_bad`) and remove them
when done, so each attack meets exactly one bad node beside the honest one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node.dev.devstack import Devstack
from tests.adversarial.stack_helpers import run_job


@pytest.fixture(scope="session")
def adversarial_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    with Devstack(tmp_path_factory.mktemp("adversarial"), compute=1, bid_window=2.0) as stack:
        # One ordinary job first: the requester's memory after its first job is the
        # baseline the attacks are measured against (imports, caches, SQLite pages).
        job = run_job(stack)
        assert job["status"] == "completed", job
        yield stack
