"""The other process of the result-fetch benchmark: a libp2p peer holding one file.

Run as ``python -m benchmarks.peer DATA_DIR MIB [HOST]``. It imports MIB MiB of
seeded random bytes into an on-disk blockstore, starts the node's mesh (so it
serves blocks exactly as a compute node serves a result), opens a plain TCP
listener that sends the same bytes (the raw-copy baseline), writes
``peer.json`` with its addresses and the CID, and serves until killed. Both
listeners bind HOST (127.0.0.1 unless given: a testbed host's address).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import trio

from crypto.keys import Identity
from node.content.blocks import BitswapStore, serve_block_exchange
from node.transport.mesh import start_mesh
from storage.blockstore import Blockstore

PEER_FILE = "peer.json"


def payload(mib: int) -> bytes:
    """The same bytes on both sides without shipping them: seeded random."""
    return np.random.default_rng(mib).bytes(mib << 20)


def _serve_tcp(sock: socket.socket, data: bytes) -> None:
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.sendall(data)


async def _serve(data_dir: Path, mib: int, host: str = "127.0.0.1") -> None:
    data = payload(mib)
    store = Blockstore(data_dir / "peer-blocks")
    cid = store.add_bytes(data)
    listener = socket.create_server((host, 0))
    threading.Thread(target=_serve_tcp, args=(listener, data), daemon=True).start()
    identity = Identity.generate()
    async with start_mesh(identity, [f"/ip4/{host}/tcp/0"], BitswapStore(store)) as mesh:
        serve_block_exchange(mesh, store)
        info = {
            "multiaddr": f"{mesh.listen_addrs()[0]}/p2p/{mesh.peer_id}",
            "peer_id": mesh.peer_id,
            "cid": str(cid),
            "tcp_host": host,
            "tcp_port": listener.getsockname()[1],
            "bytes": len(data),
        }
        tmp = data_dir / (PEER_FILE + ".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, data_dir / PEER_FILE)
        await trio.sleep_forever()


def main(argv: list[str]) -> int:
    trio.run(_serve, Path(argv[0]), int(argv[1]), *argv[2:3])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
