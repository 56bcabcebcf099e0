"""Every vector a real IPFS node produced must come out of our importer unchanged."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from storage.blockstore import MemoryBlockstore
from storage.cid import Cid
from storage.unixfs import FileImporter, iter_file
from tests.storage.kubo_reference import kubo_add

VECTORS = json.loads((Path(__file__).parent / "data" / "cid_vectors.json").read_text())["vectors"]


@pytest.mark.parametrize("vec", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vec: dict[str, object]) -> None:
    size = vec["size"]
    assert isinstance(size, int)
    data = random.Random(42).randbytes(size)
    assert hashlib.sha256(data).hexdigest() == vec["sha256"], "recipe no longer reproduces"

    store = MemoryBlockstore()
    importer = FileImporter(store.put)
    # Odd write sizes so chunk boundaries never line up with writes.
    step = 100_003
    for i in range(0, len(data), step):
        importer.write(data[i : i + step])
    result = importer.finish()
    assert result.cid == Cid.decode(str(vec["cidv1_raw_leaves"]))
    assert str(result.cid) == vec["cidv1_raw_leaves"]
    assert result.size == size
    assert b"".join(iter_file(store.get, result.cid)) == data

    # The Kubo-shaped reference agrees, including on dag-pb leaves (CIDv0).
    ref_cid, ref_size, ref_blocks = kubo_add(data)
    assert (ref_cid, ref_size) == (result.cid, result.dag_size)
    assert set(ref_blocks) == set(store.iter_cids())
    v0, _, _ = kubo_add(data, raw_leaves=False, cid_version=0)
    assert str(v0) == vec["cidv0"]
