"""peers.json: what a restarted node redials to rejoin its mesh."""

from __future__ import annotations

import json
from pathlib import Path

from node.transport.peers import PEERS_FILE, remembered_peers


def test_remembered_peers_skip_bootstrap_peers_and_cap_addresses(tmp_path: Path) -> None:
    peers = [
        {"peer_id": "12D3KooWA", "addrs": [f"/ip4/10.0.0.{i}/tcp/4001" for i in range(6)]},
        {"peer_id": "12D3KooWB", "addrs": ["/ip4/127.0.0.1/tcp/4002"]},
    ]
    (tmp_path / PEERS_FILE).write_text(json.dumps({"peers": peers}))
    addrs = remembered_peers(tmp_path, skip=["/ip4/127.0.0.1/tcp/4002/p2p/12D3KooWB"])
    assert addrs == [f"/ip4/10.0.0.{i}/tcp/4001/p2p/12D3KooWA" for i in range(4)]


def test_no_or_broken_peers_file_means_no_peers(tmp_path: Path) -> None:
    assert remembered_peers(tmp_path, skip=[]) == []
    (tmp_path / PEERS_FILE).write_text("{not json")
    assert remembered_peers(tmp_path, skip=[]) == []
