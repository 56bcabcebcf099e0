"""The network testbed (node/dev/testnet.py): hosts in their own network namespaces.

Needs root, iproute2, nftables and iptables (scripts/sysdeps.sh installs the
last two); skipped with the reason where any is missing. CI runs as root.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node.dev.devstack import Devstack
from node.dev.testnet import Testnet, available

RTT_MS = 50.0
LOSS = 0.01


@pytest.fixture(scope="session")
def testnet_ok() -> None:
    reason = available()
    if reason is not None:
        pytest.skip(f"network testbed unavailable: {reason}")


@pytest.fixture(scope="module")
def wan(testnet_ok: None) -> Iterator[Testnet]:
    """3 hosts, 50 ms RTT and 1 % loss between every pair."""
    with Testnet(hosts=3, rtt_ms=RTT_MS, loss=LOSS) as net:
        yield net


@pytest.fixture(scope="module")
def wan_stack(wan: Testnet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devstack]:
    """1 requester (host 0) + 2 compute nodes (hosts 1, 2), each in its own namespace."""
    with wan.devstack(tmp_path_factory.mktemp("testnet"), compute=2, bid_window=1.0) as stack:
        yield stack
