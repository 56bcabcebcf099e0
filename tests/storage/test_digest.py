"""digest_tree: the re-derived CID and digests every verifier compares a receipt with."""

from __future__ import annotations

import hashlib

from storage.blockstore import MemoryBlockstore
from storage.digest import digest_tree


def test_digest_tree_matches_the_store_and_hashlib() -> None:
    files = {"output.json": b"{}", "outputs/y.npy": b"\x93NUMPY" + bytes(300_000)}
    cid, digests = digest_tree(files)
    assert cid == str(MemoryBlockstore().add_tree(files))
    assert digests == {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
    tampered = {**files, "outputs/y.npy": files["outputs/y.npy"][:-1] + b"\x01"}
    other, changed = digest_tree(tampered)
    assert other != cid and changed["outputs/y.npy"] != digests["outputs/y.npy"]
