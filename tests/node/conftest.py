"""A live node shared by the HTTP API tests (REST, WebSocket, OpenAPI).

One devstack (1 requester + 1 compute) for the whole session, because starting
real node processes is the slow part and these tests only read and submit.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node.dev.devstack import Devstack


@pytest.fixture(scope="session")
def api_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    with Devstack(tmp_path_factory.mktemp("api-stack"), compute=1, bid_window=0.5) as stack:
        yield stack
