"""Fuzzing the dag-pb/UnixFS decoders and the bounded walkers built on them.

Blocks come from untrusted peers: whatever the bytes, decoding and walking
must fail only with the storage error family (never an IndexError, an
OverflowError or a hang), and a walk that accepts a DAG must have stayed
within its budget.
"""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from storage.cid import Cid, cid_for_raw, encode_uvarint
from storage.errors import ContentTooLarge, MalformedBlock, StorageError
from storage.unixfs import (
    FT_DIRECTORY,
    FT_FILE,
    DagWalk,
    PBLink,
    UnixFSData,
    decode_pbnode,
    decode_unixfs,
    encode_pbnode,
    encode_unixfs,
    iter_file,
    read_tree,
)
from tests.storage.bombs import pb_cid

U64 = (1 << 64) - 1


def _field(number: int, wire_type: int, payload: bytes | int) -> bytes:
    key = encode_uvarint(number << 3 | wire_type)
    if isinstance(payload, int):
        return key + encode_uvarint(payload)
    return key + encode_uvarint(len(payload)) + payload


_CID_BYTES = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda b: cid_for_raw(b).to_bytes(), st.binary(max_size=8)),
    st.builds(lambda b: pb_cid(b).to_bytes(), st.binary(max_size=8)),
)
_VARINT = st.one_of(st.integers(0, 300), st.integers(0, U64), st.just(U64 + 1))
_LINK = st.builds(
    lambda h, name, tsize: _field(1, 2, h) + _field(2, 2, name) + _field(3, 0, tsize),
    _CID_BYTES,
    st.binary(max_size=6),
    _VARINT,
)
_UNIXFS = st.builds(
    lambda t, data, fsize, sizes: (
        _field(1, 0, t)
        + (b"" if data is None else _field(2, 2, data))
        + (b"" if fsize is None else _field(3, 0, fsize))
        + b"".join(_field(4, 0, s) for s in sizes)
    ),
    st.integers(0, 7),
    st.none() | st.binary(max_size=10),
    st.none() | _VARINT,
    st.lists(_VARINT, max_size=4),
)
_PBNODE = st.builds(
    lambda links, data, junk: (
        b"".join(_field(2, 2, link) for link in links)
        + (b"" if data is None else _field(1, 2, data))
        + junk
    ),
    st.lists(_LINK, max_size=4),
    st.none() | _UNIXFS | st.binary(max_size=10),
    st.just(b"") | st.binary(max_size=4),
)


@settings(max_examples=200)
@given(_PBNODE)
def test_decoders_raise_only_storage_errors(block: bytes) -> None:
    with contextlib.suppress(MalformedBlock):
        node = decode_pbnode(block)
        if node.data is not None:
            decode_unixfs(node.data)


@settings(max_examples=200)
@given(_PBNODE, st.integers(0, 1 << 20))
def test_one_block_walks_and_reads_raise_only_storage_errors(block: bytes, budget: int) -> None:
    root = pb_cid(block)
    walk = DagWalk(root, max_bytes=budget)
    try:
        walk.visit(root, block)
    except StorageError:
        pass
    else:
        assert walk.dag_size is not None and walk.dag_size <= budget
    get = {root: block}.__getitem__
    with contextlib.suppress(StorageError, KeyError):  # KeyError: a child not in this store
        out = b"".join(iter_file(get, root, max_bytes=budget))
        assert len(out) <= budget
    with contextlib.suppress(StorageError, KeyError):
        read_tree(get, root, max_bytes=budget, max_entries=100)


def _maybe_lie(draw: st.DrawFn, truth: int) -> int:
    """Mostly the truth (so that some DAGs get through); else a little more or less, or anything."""
    kind = draw(st.integers(0, 11))
    if kind == 0:
        return draw(st.integers(0, 2 * truth + 2))
    return {1: max(truth - 1, 0), 2: truth + 1}.get(kind, truth)


@st.composite
def _dags(draw: st.DrawFn) -> tuple[Cid, dict[Cid, bytes], bool]:
    """A small file or directory DAG whose declared sizes may lie anywhere."""
    blocks: dict[Cid, bytes] = {}
    level: list[tuple[Cid, int, int]] = []  # (cid, content, cumulative size)
    for data in draw(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=4)):
        cid = cid_for_raw(data)
        blocks[cid] = data
        level.append((cid, len(data), len(data)))
    for _ in range(draw(st.integers(1, 3))):
        nodes = []
        for _ in range(draw(st.integers(1, 3))):
            children = draw(st.lists(st.sampled_from(level), min_size=1, max_size=5))
            sizes = tuple(_maybe_lie(draw, c[1]) for c in children)
            filesize = None if draw(st.integers(0, 3)) == 0 else _maybe_lie(draw, sum(sizes))
            data = encode_unixfs(UnixFSData(FT_FILE, filesize=filesize, blocksizes=sizes))
            links = [PBLink(c[0], "", _maybe_lie(draw, c[2])) for c in children]
            block = encode_pbnode(links, data)
            cid = pb_cid(block)
            blocks[cid] = block
            real = sum(c[1] for c in children)
            nodes.append((cid, real, len(block) + sum(c[2] for c in children)))
        level = nodes
    root = level[0][0]
    is_dir = draw(st.booleans())
    if is_dir:
        names = draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=4, unique=True))
        entries = [(name, draw(st.sampled_from(level))) for name in names]
        links = [PBLink(c[0], name, _maybe_lie(draw, c[2])) for name, c in entries]
        block = encode_pbnode(links, encode_unixfs(UnixFSData(FT_DIRECTORY)))
        root = pb_cid(block)
        blocks[root] = block
    return root, blocks, is_dir


@settings(max_examples=200)
@given(_dags(), st.just(1 << 40) | st.integers(0, 20_000))
def test_lying_dags_are_caught_or_within_budget(
    dag: tuple[Cid, dict[Cid, bytes], bool], budget: int
) -> None:
    root, blocks, is_dir = dag
    walk = DagWalk(root, max_bytes=budget)
    queue = [root]
    try:
        while queue:
            cid = queue.pop()
            queue += walk.visit(cid, blocks[cid])
    except StorageError:
        walked = False
    else:
        walked = True
        assert walk.dag_size is not None and walk.dag_size <= budget
        assert walk.visited_bytes <= walk.dag_size
    try:
        if is_dir:
            files = read_tree(blocks.__getitem__, root, max_bytes=budget)
            total = sum(len(v) for v in files.values())
        else:
            total = len(b"".join(iter_file(blocks.__getitem__, root, max_bytes=budget)))
    except ContentTooLarge:
        # Whatever the walk accepted is within budget as a tree: reading cannot pass it.
        assert not walked
    except StorageError:
        pass
    else:
        assert total <= budget
