"""Re-derive what a result tree claims to be: its root CID and each file's sha256.

The inputs of protocol.receipts.result_checks, computed once for the requester,
the CLI's `verify`, REST downloads and the demo, so they cannot drift apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from storage.blockstore import MemoryBlockstore


def digest_tree(files: Mapping[str, bytes]) -> tuple[str, dict[str, str]]:
    """The CID the tree builds to (Kubo's, CIDv1 raw leaves) and every file's sha256 (hex)."""
    root = MemoryBlockstore().add_tree(dict(files))
    return str(root), {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}
