from __future__ import annotations

import base64
import contextlib
import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.cid import DAG_PB, RAW, Cid, cid_for_raw, sha256_multihash
from storage.errors import (
    CorruptBlock,
    MalformedBlock,
    PathNotFound,
    UnexpectedNodeType,
    UnsupportedDag,
)
from storage.unixfs import (
    FT_DIRECTORY,
    FT_FILE,
    FT_HAMT_SHARD,
    FT_SYMLINK,
    MAX_DEPTH,
    BlockSink,
    FileImporter,
    ImportResult,
    PBLink,
    UnixFSData,
    build_directory,
    build_tree,
    decode_pbnode,
    decode_unixfs,
    encode_pbnode,
    encode_unixfs,
    import_bytes,
    import_stream,
    iter_file,
    list_directory,
    read_tree,
    resolve_path,
)
from tests.storage.kubo_reference import kubo_add

Blocks = dict[Cid, bytes]


def sink_into(blocks: Blocks) -> BlockSink:
    def sink(cid: Cid, data: bytes) -> None:
        blocks[cid] = data

    return sink


def pb_cid(block: bytes) -> Cid:
    return Cid(1, DAG_PB, sha256_multihash(block))


# --- import shape ------------------------------------------------------------


@settings(deadline=None, max_examples=300)
@given(
    chunk_size=st.integers(1, 8),
    max_links=st.integers(2, 5),
    data=st.data(),
)
def test_streaming_import_matches_kubo_layout(
    chunk_size: int, max_links: int, data: st.DataObject
) -> None:
    # Up to three full levels plus change, so every depth transition is hit.
    limit = chunk_size * max_links**3 + 2 * chunk_size
    size = data.draw(st.integers(0, limit), label="size")
    content = random.Random(size).randbytes(size)
    cuts = sorted(data.draw(st.lists(st.integers(0, size), max_size=6), label="cuts"))
    blocks: Blocks = {}
    importer = FileImporter(sink_into(blocks), chunk_size=chunk_size, max_links=max_links)
    prev = 0
    for cut in [*cuts, size]:
        importer.write(content[prev:cut])
        prev = cut
    result = importer.finish()

    ref_cid, ref_size, ref_blocks = kubo_add(content, chunk_size=chunk_size, max_links=max_links)
    assert result == ImportResult(ref_cid, ref_size, size)
    assert blocks == ref_blocks
    one_shot = import_bytes(content, sink_into({}), chunk_size=chunk_size, max_links=max_links)
    assert one_shot == result
    assert b"".join(iter_file(blocks.__getitem__, result.cid)) == content


@pytest.mark.parametrize("max_links", [2, 3, 4])
def test_boundaries_around_full_trees(max_links: int) -> None:
    chunk = 3
    for depth in (1, 2, 3):
        full = chunk * max_links**depth
        for size in (full - 1, full, full + 1, full + chunk, full + chunk + 1):
            content = bytes(range(256)) * (size // 256 + 1)
            content = content[:size]
            res = import_bytes(content, sink_into({}), chunk_size=chunk, max_links=max_links)
            assert res.cid == kubo_add(content, chunk_size=chunk, max_links=max_links)[0]


def test_lone_leftover_leaf_is_wrapped() -> None:
    blocks: Blocks = {}
    res = import_bytes(b"abcdefg", sink_into(blocks), chunk_size=2, max_links=3)
    # 4 leaves, 3 per node: root -> [node(ab,cd,ef), node(g)], not [node, g].
    root = decode_pbnode(blocks[res.cid])
    assert len(root.links) == 2
    assert all(link.cid.codec == DAG_PB for link in root.links)
    wrapper = decode_pbnode(blocks[root.links[1].cid])
    assert [link.cid for link in wrapper.links] == [cid_for_raw(b"g")]
    assert [link.tsize for link in wrapper.links] == [1]


def test_single_chunk_and_empty_file_are_raw_blocks() -> None:
    for content in (b"", b"x", b"y" * 16):
        blocks: Blocks = {}
        res = import_bytes(content, sink_into(blocks), chunk_size=16)
        assert res.cid == cid_for_raw(content)
        assert blocks == {res.cid: content}
        assert res.dag_size == len(content)


def test_importer_emits_leaves_as_it_goes() -> None:
    blocks: Blocks = {}
    importer = FileImporter(sink_into(blocks), chunk_size=4, max_links=174)
    importer.write(b"abc")
    assert blocks == {}
    importer.write(b"defghijk")
    assert set(blocks) == {cid_for_raw(b"abcd"), cid_for_raw(b"efgh")}
    res = importer.finish()
    assert importer.finish() == res
    with pytest.raises(ValueError, match="after finish"):
        importer.write(b"more")


def test_import_stream_accepts_any_buffer_types() -> None:
    parts: list[bytes | bytearray | memoryview] = [b"ab", bytearray(b"cde"), memoryview(b"fghij")]
    res = import_stream(parts, sink_into({}), chunk_size=3)
    assert res == import_bytes(b"abcdefghij", sink_into({}), chunk_size=3)


def test_repeated_chunks_share_a_leaf() -> None:
    blocks: Blocks = {}
    res = import_bytes(b"\0" * 40, sink_into(blocks), chunk_size=4, max_links=10)
    assert len(blocks) == 2
    assert res.dag_size == len(blocks[res.cid]) + 40
    assert b"".join(iter_file(blocks.__getitem__, res.cid)) == b"\0" * 40


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        FileImporter(sink_into({}), chunk_size=0)
    with pytest.raises(ValueError):
        FileImporter(sink_into({}), max_links=1)


# --- directories ---------------------------------------------------------------


def _b32(raw: bytes) -> str:
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def _hand_link(cid_bytes: bytes, name: bytes, tsize: int) -> bytes:
    body = b"\x0a" + bytes([len(cid_bytes)]) + cid_bytes + b"\x12" + bytes([len(name)]) + name
    body += b"\x18" + bytes([tsize])
    return b"\x12" + bytes([len(body)]) + body


def test_directory_bytes_assembled_by_hand() -> None:
    """Pins the directory format without going through our own encoder."""
    raw_a = b"\x01\x55\x12\x20" + hashlib.sha256(b"hello").digest()
    raw_b = b"\x01\x55\x12\x20" + hashlib.sha256(b"world").digest()
    dir_data = b"\x0a\x02\x08\x01"  # PBNode.Data = UnixFS{Type: Directory}
    sub = _hand_link(raw_b, b"b.txt", 5) + dir_data
    sub_cid = b"\x01\x70\x12\x20" + hashlib.sha256(sub).digest()
    root = _hand_link(raw_a, b"a.txt", 5) + _hand_link(sub_cid, b"sub", len(sub) + 5) + dir_data
    expected = _b32(b"\x01\x70\x12\x20" + hashlib.sha256(root).digest())

    blocks: Blocks = {}
    got = build_tree({"sub/b.txt": b"world", "a.txt": b"hello"}, sink_into(blocks))
    assert str(got) == expected
    assert blocks[got] == root
    assert len(blocks) == 4


def test_empty_directory_is_the_well_known_cid() -> None:
    empty = build_tree({}, sink_into({}))
    assert str(empty) == "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354"
    assert str(empty.to_v1()) == str(
        Cid.decode("QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn").to_v1()
    )


def test_directory_links_sorted_by_utf8_bytes() -> None:
    blocks: Blocks = {}
    names = ["z", "a", "B", "é", "ab", "a.b", "_", "10", "9"]
    root = build_tree({n: n.encode() for n in names}, sink_into(blocks))
    listed = [e.name for e in list_directory(blocks.__getitem__, root)]
    assert listed == sorted(names, key=lambda n: n.encode())
    assert listed[:3] == ["10", "9", "B"]


def test_directory_tsize_is_cumulative() -> None:
    blocks: Blocks = {}
    big = bytes(range(256)) * 5
    root = build_tree({"d/big": big, "small": b"s"}, sink_into(blocks), chunk_size=256)
    entries = {e.name: e for e in list_directory(blocks.__getitem__, root)}
    assert entries["small"].tsize == 1
    file_res = import_bytes(big, sink_into({}), chunk_size=256)
    d_block = blocks[entries["d"].cid]
    assert entries["d"].tsize == len(d_block) + file_res.dag_size
    assert decode_pbnode(d_block).links[0].tsize == file_res.dag_size


names_st = st.text(
    alphabet=st.characters(exclude_characters="/\0", exclude_categories=["Cs"]),
    min_size=1,
    max_size=8,
).filter(lambda s: s not in (".", ".."))


@settings(deadline=None, max_examples=60)
@given(
    st.dictionaries(
        st.lists(names_st, min_size=1, max_size=3).map("/".join),
        st.binary(max_size=40),
        max_size=8,
    )
)
def test_tree_round_trip(files: dict[str, bytes]) -> None:
    # Drop paths that are prefixes of others ("a" and "a/b" cannot both be files).
    files = {p: d for p, d in files.items() if not any(q.startswith(p + "/") for q in files)}
    blocks: Blocks = {}
    root = build_tree(files, sink_into(blocks), chunk_size=7, max_links=3)
    get = blocks.__getitem__
    assert read_tree(get, root) == files
    for path, content in files.items():
        assert b"".join(iter_file(get, resolve_path(get, root, path))) == content
    assert (
        build_tree(dict(reversed(files.items())), sink_into({}), chunk_size=7, max_links=3) == root
    )


def test_build_directory_with_empty_dirs_and_conflicts() -> None:
    blocks: Blocks = {}
    f = import_bytes(b"x", sink_into(blocks))
    res = build_directory({"a/f": f}, sink_into(blocks), empty_dirs=["e", "a/g/h"])
    get = blocks.__getitem__
    assert [e.name for e in list_directory(get, res.cid)] == ["a", "e"]
    assert list_directory(get, resolve_path(get, res.cid, "a/g/h")) == []
    assert read_tree(get, res.cid) == {"a/f": b"x"}
    assert res.size == 1
    with pytest.raises(ValueError, match="directory"):
        build_directory({"a": f, "a/b": f}, sink_into({}))
    with pytest.raises(ValueError):
        build_directory({"a/b": f, "a": f}, sink_into({}))
    with pytest.raises(ValueError):
        build_directory({"a": f}, sink_into({}), empty_dirs=["a"])


@pytest.mark.parametrize("path", ["", "/abs", "a//b", "a/", "./a", "a/../b", "..", "a\0b"])
def test_invalid_paths_rejected(path: str) -> None:
    with pytest.raises(ValueError):
        build_tree({path: b"x"}, sink_into({}))


def test_huge_flat_directory_refused_rather_than_mis_sharded() -> None:
    leaf = import_bytes(b"x", sink_into({}))
    entries = {f"{i:0200d}": leaf for i in range(1200)}
    with pytest.raises(ValueError, match="HAMT"):
        build_directory(entries, sink_into({}))


def test_resolve_path_errors() -> None:
    blocks: Blocks = {}
    root = build_tree({"outputs/y.npy": b"y", "output.json": b"{}"}, sink_into(blocks))
    get = blocks.__getitem__
    assert resolve_path(get, root, "") == root
    assert resolve_path(get, root, "outputs/y.npy") == cid_for_raw(b"y")
    with pytest.raises(PathNotFound, match=r"outputs/z\.npy"):
        resolve_path(get, root, "outputs/z.npy")
    with pytest.raises(KeyError):
        resolve_path(get, root, "nope")
    with pytest.raises(UnexpectedNodeType):
        resolve_path(get, root, "output.json/x")
    with pytest.raises(UnexpectedNodeType):
        iter_file(get, root).__next__()
    with pytest.raises(UnexpectedNodeType):
        list_directory(get, cid_for_raw(b"y"))


# --- defensive reading ---------------------------------------------------------


def test_reader_verifies_hashes() -> None:
    blocks: Blocks = {}
    res = import_bytes(b"abcdefgh", sink_into(blocks), chunk_size=2)
    leaf = cid_for_raw(b"cd")
    blocks[leaf] = b"XX"
    with pytest.raises(CorruptBlock):
        b"".join(iter_file(blocks.__getitem__, res.cid))


def _store(blocks: Blocks, block: bytes) -> Cid:
    cid = pb_cid(block)
    blocks[cid] = block
    return cid


def test_reader_checks_declared_sizes() -> None:
    blocks: Blocks = {}
    leaf = cid_for_raw(b"abc")
    blocks[leaf] = b"abc"

    def file_node(filesize: int | None, blocksizes: tuple[int, ...], n_links: int = 1) -> Cid:
        data = encode_unixfs(UnixFSData(FT_FILE, filesize=filesize, blocksizes=blocksizes))
        return _store(blocks, encode_pbnode([PBLink(leaf, "", 3)] * n_links, data))

    get = blocks.__getitem__
    assert b"".join(iter_file(get, file_node(3, (3,)))) == b"abc"
    for bad in (file_node(4, (3,)), file_node(3, (2,)), file_node(6, (3,), n_links=2)):
        with pytest.raises(MalformedBlock):
            b"".join(iter_file(get, bad))


def test_reader_rejects_unsupported_nodes() -> None:
    blocks: Blocks = {}
    get = blocks.__getitem__
    sym = _store(blocks, encode_pbnode([], encode_unixfs(UnixFSData(FT_SYMLINK, data=b"/etc"))))
    hamt = _store(blocks, encode_pbnode([], encode_unixfs(UnixFSData(FT_HAMT_SHARD, fanout=256))))
    bare = _store(blocks, encode_pbnode([], None))
    with pytest.raises(UnsupportedDag):
        list(iter_file(get, sym))
    with pytest.raises(UnsupportedDag):
        list_directory(get, hamt)
    with pytest.raises(MalformedBlock, match="without UnixFS"):
        list(iter_file(get, bare))
    cbor = Cid(1, 0x71, sha256_multihash(b"\xa0"))
    blocks[cbor] = b"\xa0"
    with pytest.raises(UnsupportedDag):
        list(iter_file(get, cbor))


def test_reader_rejects_hostile_directory_names() -> None:
    blocks: Blocks = {}
    leaf = cid_for_raw(b"x")
    blocks[leaf] = b"x"
    dir_data = encode_unixfs(UnixFSData(FT_DIRECTORY))
    for names in (["../evil"], [".."], [""], ["a", "a"], ["a/b"]):
        root = _store(blocks, encode_pbnode([PBLink(leaf, n, 1) for n in names], dir_data))
        with pytest.raises(MalformedBlock):
            read_tree(blocks.__getitem__, root)


def test_reader_limits_depth() -> None:
    blocks: Blocks = {}
    cid = cid_for_raw(b"x")
    blocks[cid] = b"x"
    tsize = 1
    for _ in range(MAX_DEPTH + 2):
        data = encode_unixfs(UnixFSData(FT_FILE, filesize=1, blocksizes=(1,)))
        block = encode_pbnode([PBLink(cid, "", tsize)], data)
        cid, tsize = _store(blocks, block), len(block) + tsize
    with pytest.raises(MalformedBlock, match="deeper"):
        list(iter_file(blocks.__getitem__, cid))


GOOD_LINK = _hand_link(b"\x01\x55\x12\x20" + bytes(32), b"n", 1)


@pytest.mark.parametrize(
    "block",
    [
        b"\x0a",  # truncated length
        b"\x0a\x05ab",  # length past end
        b"\x08\x01",  # Data as varint
        b"\x1a\x00",  # unknown field 3
        b"\x00\x00",  # field number 0
        b"\x0b",  # group wire type
        b"\x0a\x00" + GOOD_LINK,  # Links after Data
        b"\x0a\x00\x0a\x00",  # Data twice
        b"\x12\x00",  # link without Hash
        b"\x12\x04\x0a\x02\x01\x55",  # link Hash not a CID
        b"\x12\x05\x12\x01\xff\x0a\x00",  # Name before Hash, and not UTF-8
        b"\x12\x06\x0a\x00\x18\x01\x12\x00",  # Tsize before Name
        b"\x12\x03\x20\x01\x00",  # unknown link field
        b"\x12\x02\x18\xff",  # truncated varint inside link
        b"\x0a" + b"\xff" * 11,  # overlong length varint
    ],
)
def test_malformed_pbnode(block: bytes) -> None:
    with pytest.raises(MalformedBlock):
        decode_pbnode(block)


@pytest.mark.parametrize(
    "data",
    [
        b"",  # no Type
        b"\x08",  # truncated
        b"\x0a\x00",  # Type as bytes
        b"\x08\x02\x18\x0a\x00",  # filesize with wrong wire type after it
        b"\x08\x02\x22\x01\xff",  # packed blocksizes with truncated varint
        b"\x08\x02\x1d\x00",  # fixed32 filesize... truncated
    ],
)
def test_malformed_unixfs(data: bytes) -> None:
    with pytest.raises(MalformedBlock):
        decode_unixfs(data)


def test_unixfs_accepts_packed_blocksizes_and_skips_unknown_fields() -> None:
    msg = decode_unixfs(b"\x08\x02\x18\x05\x22\x02\x02\x03\x38\x01\x42\x02\x08\x01")
    assert msg == UnixFSData(FT_FILE, filesize=5, blocksizes=(2, 3))


@settings(max_examples=400)
@given(st.binary(max_size=80))
def test_decoders_never_crash(raw: bytes) -> None:
    for decode in (decode_pbnode, decode_unixfs):
        with contextlib.suppress(MalformedBlock):
            decode(raw)


def test_pbnode_round_trip() -> None:
    links = [
        PBLink(cid_for_raw(b"a"), "", 0),
        PBLink(Cid(1, RAW, sha256_multihash(b"b")), "é", 300),
    ]
    for data in (None, b"", b"\x08\x02"):
        assert decode_pbnode(encode_pbnode(links, data)) == (tuple(links), data)
