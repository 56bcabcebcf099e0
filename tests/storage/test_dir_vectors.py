"""Directory CIDs produced by a real IPFS node (js-ipfs 0.66.1), see data/dir_vectors.json."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from storage.blockstore import MemoryBlockstore
from storage.unixfs import build_directory, import_bytes

DATA = json.loads((Path(__file__).parent / "data" / "dir_vectors.json").read_text())


def _content(spec: Any) -> bytes:
    if isinstance(spec, str):
        return spec.encode("utf-8")
    if "seed" in spec:
        return random.Random(spec["seed"]).randbytes(spec["size"])
    return str(spec["repeat"]).encode() * int(spec["times"])


@pytest.mark.parametrize("vec", DATA["vectors"], ids=[v["name"] for v in DATA["vectors"]])
def test_directory_vector(vec: dict[str, Any]) -> None:
    files = {path: _content(spec) for path, spec in vec["files"].items()}
    store = MemoryBlockstore()
    imported = {path: import_bytes(data, store.put) for path, data in files.items()}
    result = build_directory(imported, store.put, empty_dirs=vec["empty_dirs"])
    assert str(result.cid) == vec["cid"]
    assert result.dag_size == vec["dag_size"]
    if not vec["empty_dirs"]:
        assert store.add_tree(files) == result.cid
    assert store.read_tree(result.cid) == files
