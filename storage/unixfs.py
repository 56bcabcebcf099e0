"""UnixFS on dag-pb, byte-for-byte compatible with Kubo's importer.

A result CID is only useful to the wider IPFS world if it is *the* CID Kubo
gives for the same bytes with `ipfs add --cid-version=1 --raw-leaves`, so the
builder mirrors Kubo's defaults exactly: 256 KiB fixed-size chunks, raw
leaves, the balanced layout with at most 174 links per node, sha2-256, and
Tsize on every link (py-libp2p's builder writes 0 for raw leaves and promotes
a lone leftover leaf instead of wrapping it, so its CIDs differ).

Protobuf is written by hand: the two messages are tiny, and a generated
codec gives no guarantee about field order or how absent fields are written,
while the CID depends on every byte.

The balanced layout is equivalent to: all leaves at one depth, every inner
node packed with up to `max_links` children from left to right, and the
root at the lowest depth that holds all leaves. That shape can be built
without knowing the file size in advance, by sealing a node as soon as it is
full and, at the end, sealing the partial nodes bottom-up; this is what
keeps the importer's memory at one chunk plus one link list per level.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from storage.cid import (
    DAG_PB,
    RAW,
    Cid,
    VarintError,
    cid_for_raw,
    decode_uvarint,
    encode_uvarint,
    sha256_multihash,
)
from storage.errors import (
    ContentTooLarge,
    CorruptBlock,
    InvalidCid,
    MalformedBlock,
    PathNotFound,
    UnexpectedNodeType,
    UnsupportedDag,
)

__all__ = [
    "CHUNK_SIZE",
    "FT_DIRECTORY",
    "FT_FILE",
    "FT_HAMT_SHARD",
    "FT_METADATA",
    "FT_RAW",
    "FT_SYMLINK",
    "HAMT_THRESHOLD",
    "MAX_LINKS",
    "MAX_TREE_ENTRIES",
    "BlockSink",
    "BufferSink",
    "DagWalk",
    "DirEntry",
    "FileImporter",
    "GetBlock",
    "ImportResult",
    "PBLink",
    "PBNode",
    "UnixFSData",
    "block_links",
    "build_directory",
    "build_tree",
    "cumulative_size",
    "decode_pbnode",
    "decode_unixfs",
    "encode_pbnode",
    "encode_unixfs",
    "fetch_verified",
    "import_bytes",
    "import_stream",
    "iter_file",
    "list_directory",
    "read_tree",
    "resolve_path",
    "split_path",
]

CHUNK_SIZE = 262144
MAX_LINKS = 174
# Kubo turns a basic directory into a HAMT once the estimated node size
# (sum of name + binary CID lengths) reaches 256 KiB. We do not build HAMTs,
# so we refuse instead of silently producing a CID Kubo would not.
HAMT_THRESHOLD = 262144
# Entries a whole-tree read (read_tree) takes, counting each link that reaches
# one: the result is a dict in memory, and a directory linked many times over
# from its parents multiplies without costing the sender anything.
MAX_TREE_ENTRIES = 100_000
# A balanced DAG of depth 8 already addresses ~2e17 bytes; anything deeper
# is a hostile block trying to exhaust the stack.
MAX_DEPTH = 64

FT_RAW = 0
FT_DIRECTORY = 1
FT_FILE = 2
FT_METADATA = 3
FT_SYMLINK = 4
FT_HAMT_SHARD = 5

_UINT64_MAX = (1 << 64) - 1
_WT_VARINT = 0
_WT_I64 = 1
_WT_LEN = 2
_WT_I32 = 5

BlockSink = Callable[[Cid, bytes], None]
# A sink that also accepts views into the caller's buffer (see FileImporter).
BufferSink = Callable[[Cid, "bytes | memoryview"], None]
GetBlock = Callable[[Cid], bytes]


# --- protobuf primitives -------------------------------------------------


def _key(field_no: int, wire_type: int) -> bytes:
    return encode_uvarint(field_no << 3 | wire_type)


def _len_field(field_no: int, payload: bytes) -> bytes:
    return _key(field_no, _WT_LEN) + encode_uvarint(len(payload)) + payload


def _varint_field(field_no: int, value: int) -> bytes:
    return _key(field_no, _WT_VARINT) + encode_uvarint(value)


def _read_varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    try:
        value, pos = decode_uvarint(buf, pos, max_bytes=10)
    except VarintError as exc:
        raise MalformedBlock(f"{what}: {exc}") from None
    if value > _UINT64_MAX:
        raise MalformedBlock(f"{what}: varint overflows uint64")
    return value, pos


def _iter_fields(buf: bytes, what: str) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value); groups are rejected outright."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos, what)
        field_no, wire_type = key >> 3, key & 7
        if field_no == 0:
            raise MalformedBlock(f"{what}: field number 0")
        value: int | bytes
        if wire_type == _WT_VARINT:
            value, pos = _read_varint(buf, pos, what)
        elif wire_type == _WT_LEN:
            length, pos = _read_varint(buf, pos, what)
            if length > end - pos:
                raise MalformedBlock(f"{what}: field {field_no} runs past the end")
            value = buf[pos : pos + length]
            pos += length
        elif wire_type in (_WT_I64, _WT_I32):
            width = 8 if wire_type == _WT_I64 else 4
            if width > end - pos:
                raise MalformedBlock(f"{what}: field {field_no} runs past the end")
            value = buf[pos : pos + width]
            pos += width
        else:
            raise MalformedBlock(f"{what}: unsupported wire type {wire_type}")
        yield field_no, wire_type, value


# --- dag-pb ----------------------------------------------------------------


class PBLink(NamedTuple):
    cid: Cid
    name: str
    tsize: int


class PBNode(NamedTuple):
    links: tuple[PBLink, ...]
    data: bytes | None


def encode_pbnode(links: Iterable[PBLink], data: bytes | None) -> bytes:
    """Canonical dag-pb: links first (Hash, Name, Tsize), then Data.

    Name and Tsize are always written, even when empty or zero, because Kubo
    and js-ipfs both do and the CIDs must match theirs.
    """
    out = bytearray()
    for link in links:
        body = (
            _len_field(1, link.cid.to_bytes())
            + _len_field(2, link.name.encode("utf-8"))
            + _varint_field(3, link.tsize)
        )
        out += _len_field(2, body)
    if data is not None:
        out += _len_field(1, data)
    return bytes(out)


def _decode_pblink(buf: bytes) -> PBLink:
    cid: Cid | None = None
    name = ""
    tsize = 0
    last = 0
    for field_no, wire_type, value in _iter_fields(buf, "dag-pb link"):
        if field_no <= last:
            raise MalformedBlock("dag-pb link: fields out of order or repeated")
        last = field_no
        if field_no == 1 and wire_type == _WT_LEN:
            assert isinstance(value, bytes)
            try:
                cid = Cid.from_bytes(value)
            except InvalidCid as exc:
                raise MalformedBlock(f"dag-pb link: bad Hash: {exc}") from None
        elif field_no == 2 and wire_type == _WT_LEN:
            assert isinstance(value, bytes)
            try:
                name = value.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedBlock("dag-pb link: Name is not UTF-8") from None
        elif field_no == 3 and wire_type == _WT_VARINT:
            assert isinstance(value, int)
            tsize = value
        else:
            raise MalformedBlock(f"dag-pb link: unexpected field {field_no}/{wire_type}")
    if cid is None:
        raise MalformedBlock("dag-pb link: missing Hash")
    return PBLink(cid, name, tsize)


def decode_pbnode(block: bytes) -> PBNode:
    """Strict decoder following the dag-pb spec: any deviation is MalformedBlock."""
    links: list[PBLink] = []
    data: bytes | None = None
    for field_no, wire_type, value in _iter_fields(bytes(block), "dag-pb node"):
        if field_no == 2 and wire_type == _WT_LEN:
            if data is not None:
                raise MalformedBlock("dag-pb node: Links after Data")
            assert isinstance(value, bytes)
            links.append(_decode_pblink(value))
        elif field_no == 1 and wire_type == _WT_LEN:
            if data is not None:
                raise MalformedBlock("dag-pb node: Data repeated")
            assert isinstance(value, bytes)
            data = value
        else:
            raise MalformedBlock(f"dag-pb node: unexpected field {field_no}/{wire_type}")
    return PBNode(tuple(links), data)


# --- UnixFS Data message ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnixFSData:
    type: int
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: tuple[int, ...] = ()
    hash_type: int | None = None
    fanout: int | None = None


def encode_unixfs(msg: UnixFSData) -> bytes:
    out = bytearray(_varint_field(1, msg.type))
    if msg.data is not None:
        out += _len_field(2, msg.data)
    if msg.filesize is not None:
        out += _varint_field(3, msg.filesize)
    for size in msg.blocksizes:
        # proto2 `repeated uint64` is unpacked, which is what Kubo writes.
        out += _varint_field(4, size)
    if msg.hash_type is not None:
        out += _varint_field(5, msg.hash_type)
    if msg.fanout is not None:
        out += _varint_field(6, msg.fanout)
    return bytes(out)


def decode_unixfs(buf: bytes) -> UnixFSData:
    """Lenient like protobuf (unknown fields skipped) but typed: wrong wire types fail."""
    ftype: int | None = None
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: list[int] = []
    hash_type: int | None = None
    fanout: int | None = None
    for field_no, wire_type, value in _iter_fields(buf, "unixfs data"):
        if field_no == 4 and wire_type == _WT_LEN:
            assert isinstance(value, bytes)
            pos = 0
            while pos < len(value):
                size, pos = _read_varint(value, pos, "unixfs blocksizes")
                blocksizes.append(size)
            continue
        if field_no > 6:
            continue
        expected = _WT_LEN if field_no == 2 else _WT_VARINT
        if wire_type != expected:
            raise MalformedBlock(f"unixfs data: field {field_no} has wire type {wire_type}")
        if field_no == 2:
            assert isinstance(value, bytes)
            data = value
            continue
        assert isinstance(value, int)
        if field_no == 1:
            ftype = value
        elif field_no == 3:
            filesize = value
        elif field_no == 4:
            blocksizes.append(value)
        elif field_no == 5:
            hash_type = value
        else:
            fanout = value
    if ftype is None:
        raise MalformedBlock("unixfs data: missing Type")
    return UnixFSData(ftype, data, filesize, tuple(blocksizes), hash_type, fanout)


# --- import ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImportResult:
    """Root of an imported DAG.

    `dag_size` is the cumulative size Kubo puts in a parent's link Tsize;
    `size` is the content length (for a directory: all its files' bytes).
    """

    cid: Cid
    dag_size: int
    size: int


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """One shared pool per size: importers come and go, threads need not."""
    with _POOL_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="unixfs")
        return pool


def _pb_cid(block: bytes) -> Cid:
    return Cid(1, DAG_PB, sha256_multihash(block))


class FileImporter:
    """Streaming UnixFS file import; feed with `write()`, then `finish()`.

    Blocks reach `sink` as soon as they are final, so a caller may stream a
    file of any size. `chunk_size` and `max_links` exist for tests that want
    deep trees from little data; any other value gives CIDs Kubo would not.

    Two options exist for the blockstore's own imports, which were a third of
    sha256's speed (benchmarks/README.md): with `views`, full leaves reach the
    sink as memoryviews into the caller's buffer instead of fresh 256 KiB
    copies (the copies cost more than the hashing, mostly in page faults), so
    the sink must consume them before returning; with `workers` > 1, the full
    leaves of one `write()` are hashed and sunk on a thread pool (hashlib and
    file writes release the GIL), so the sink must be thread-safe. The DAG,
    and so every CID, is the same either way: leaves are linked in order.
    """

    def __init__(
        self,
        sink: BlockSink | BufferSink,
        *,
        chunk_size: int = CHUNK_SIZE,
        max_links: int = MAX_LINKS,
        views: bool = False,
        workers: int = 1,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        if max_links < 2:
            raise ValueError("max_links must be at least 2")
        self._sink = sink
        self._chunk_size = chunk_size
        self._max_links = max_links
        self._views = views
        self._workers = max(1, workers)
        self._buf = bytearray()
        # _levels[k] holds the children of the open node at depth k + 1.
        self._levels: list[list[ImportResult]] = [[]]
        self._leaves = 0
        self._result: ImportResult | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._result is not None:
            raise ValueError("write() after finish()")
        view = memoryview(data).cast("B")
        chunk = self._chunk_size
        pos = 0
        if self._buf:
            take = view[: chunk - len(self._buf)]
            self._buf += take
            pos = len(take)
            if len(self._buf) < chunk:
                return
            self._add_leaf(bytes(self._buf))
            self._buf.clear()
        full = []
        while len(view) - pos >= chunk:
            full.append(view[pos : pos + chunk])
            pos += chunk
        self._add_leaves(full)
        self._buf += view[pos:]

    def finish(self) -> ImportResult:
        if self._result is not None:
            return self._result
        if self._buf or self._leaves == 0:
            self._add_leaf(bytes(self._buf))
            self._buf.clear()
        levels = self._levels
        top = max(k for k, level in enumerate(levels) if level)
        if len(levels[top]) == 1 and not any(levels[:top]):
            result = levels[top][0]
        else:
            for depth in range(top):
                if levels[depth]:
                    levels[depth + 1].append(self._seal(levels[depth]))
                    levels[depth] = []
            result = self._seal(levels[top])
        self._levels = [[]]
        self._result = result
        return result

    def _add_leaf(self, chunk: bytes) -> None:
        self._leaves += 1
        self._push(0, self._leaf(chunk))

    def _leaf(self, chunk: bytes | memoryview) -> ImportResult:
        data = chunk if self._views else bytes(chunk)
        cid = cid_for_raw(data)
        self._sink(cid, data)  # type: ignore[arg-type]  # views only reach a BufferSink
        return ImportResult(cid, len(data), len(data))

    def _leaf_group(self, chunks: list[memoryview]) -> list[ImportResult]:
        return [self._leaf(c) for c in chunks]

    def _add_leaves(self, chunks: list[memoryview]) -> None:
        if self._workers > 1 and len(chunks) >= 2 * self._workers:
            groups = [chunks[i :: self._workers * 4] for i in range(self._workers * 4)]
            done = list(_pool(self._workers).map(self._leaf_group, groups))
            # Group i holds chunks i, i+n, i+2n...: interleave back into file order.
            results: list[ImportResult] = [
                done[i % len(groups)][i // len(groups)] for i in range(len(chunks))
            ]
        else:
            results = [self._leaf(c) for c in chunks]
        for result in results:
            self._leaves += 1
            self._push(0, result)

    def _push(self, depth: int, child: ImportResult) -> None:
        levels = self._levels
        while True:
            if depth == len(levels):
                levels.append([])
            levels[depth].append(child)
            if len(levels[depth]) < self._max_links:
                return
            child = self._seal(levels[depth])
            levels[depth] = []
            depth += 1

    def _seal(self, children: list[ImportResult]) -> ImportResult:
        sizes = tuple(c.size for c in children)
        total = sum(sizes)
        data = encode_unixfs(UnixFSData(FT_FILE, filesize=total, blocksizes=sizes))
        block = encode_pbnode((PBLink(c.cid, "", c.dag_size) for c in children), data)
        cid = _pb_cid(block)
        self._sink(cid, block)
        return ImportResult(cid, len(block) + sum(c.dag_size for c in children), total)


def import_stream(
    chunks: Iterable[bytes | bytearray | memoryview],
    sink: BlockSink | BufferSink,
    *,
    chunk_size: int = CHUNK_SIZE,
    max_links: int = MAX_LINKS,
    views: bool = False,
    workers: int = 1,
) -> ImportResult:
    importer = FileImporter(
        sink, chunk_size=chunk_size, max_links=max_links, views=views, workers=workers
    )
    for piece in chunks:
        importer.write(piece)
    return importer.finish()


def import_bytes(
    data: bytes | bytearray | memoryview,
    sink: BlockSink | BufferSink,
    *,
    chunk_size: int = CHUNK_SIZE,
    max_links: int = MAX_LINKS,
    views: bool = False,
    workers: int = 1,
) -> ImportResult:
    return import_stream(
        [data], sink, chunk_size=chunk_size, max_links=max_links, views=views, workers=workers
    )


def _check_name(name: str, error: type[ValueError]) -> None:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise error(f"invalid path component {name!r}")


def split_path(path: str) -> list[str]:
    """Components of a relative posix path; rejects anything that could escape a root."""
    if path.startswith("/"):
        raise ValueError(f"path must be relative: {path!r}")
    parts = path.split("/")
    for part in parts:
        _check_name(part, ValueError)
    return parts


@dataclass
class _Dir:
    children: dict[str, _Dir | ImportResult] = field(default_factory=dict)

    def subdir(self, parts: list[str], path: str) -> _Dir:
        node = self
        for part in parts:
            child = node.children.setdefault(part, _Dir())
            if not isinstance(child, _Dir):
                raise ValueError(f"{path!r} needs {part!r} to be a directory, but it is a file")
            node = child
        return node


_DIR_DATA = encode_unixfs(UnixFSData(FT_DIRECTORY))


def _seal_dir(node: _Dir, sink: BlockSink) -> ImportResult:
    entries: list[tuple[bytes, str, ImportResult]] = []
    for name, child in node.children.items():
        sealed = _seal_dir(child, sink) if isinstance(child, _Dir) else child
        entries.append((name.encode("utf-8"), name, sealed))
    entries.sort(key=lambda e: e[0])
    estimate = sum(len(raw) + len(r.cid.to_bytes()) for raw, _, r in entries)
    if estimate >= HAMT_THRESHOLD:
        raise ValueError(
            f"directory with {len(entries)} entries would be HAMT-sharded by Kubo; "
            "sharded directories are not supported"
        )
    block = encode_pbnode((PBLink(r.cid, name, r.dag_size) for _, name, r in entries), _DIR_DATA)
    cid = _pb_cid(block)
    sink(cid, block)
    return ImportResult(
        cid, len(block) + sum(r.dag_size for _, _, r in entries), sum(r.size for _, _, r in entries)
    )


def build_directory(
    entries: Mapping[str, ImportResult],
    sink: BlockSink,
    *,
    empty_dirs: Iterable[str] = (),
) -> ImportResult:
    """Assemble a basic UnixFS directory tree from files imported separately.

    Separating this from file import lets large files stream from disk while
    only their roots are held here. Links are sorted by UTF-8 name bytes, as
    go-merkledag does when it encodes a node.
    """
    root = _Dir()
    for path, result in entries.items():
        parts = split_path(path)
        parent = root.subdir(parts[:-1], path)
        if parts[-1] in parent.children:
            raise ValueError(f"{path!r} given twice or also used as a directory")
        parent.children[parts[-1]] = result
    for path in empty_dirs:
        root.subdir(split_path(path), path)
    return _seal_dir(root, sink)


def build_tree(
    files: Mapping[str, bytes],
    sink: BlockSink,
    *,
    chunk_size: int = CHUNK_SIZE,
    max_links: int = MAX_LINKS,
) -> Cid:
    """What `ipfs add -r --cid-version=1 --raw-leaves` gives for these files."""
    imported = {
        path: import_bytes(data, sink, chunk_size=chunk_size, max_links=max_links)
        for path, data in files.items()
    }
    return build_directory(imported, sink).cid


# --- read ----------------------------------------------------------------


class DirEntry(NamedTuple):
    name: str
    cid: Cid
    tsize: int


def fetch_verified(get_block: GetBlock, cid: Cid) -> bytes:
    """Fetch and hash-check, so no reader ever parses bytes its CID does not vouch for."""
    data = get_block(cid)
    if not cid.verify(data):
        raise CorruptBlock(f"block {cid} does not match its hash")
    return data


def cumulative_size(cid: Cid, block: bytes) -> int:
    """The DAG size a parent's link to this block declares as Tsize (Kubo's cumulative
    size): the block plus its links' Tsizes. Exact for a DAG this node built itself;
    for a stranger's, DagWalk checks it link by link."""
    if cid.codec == RAW:
        return len(block)
    if cid.codec == DAG_PB:
        return len(block) + sum(link.tsize for link in decode_pbnode(block).links)
    raise UnsupportedDag(f"cannot size codec 0x{cid.codec:x} of {cid}")


def block_links(cid: Cid, block: bytes) -> list[Cid]:
    """CIDs a block points to, whatever its UnixFS meaning (used to walk DAGs)."""
    if cid.codec == RAW:
        return []
    if cid.codec == DAG_PB:
        return [link.cid for link in decode_pbnode(block).links]
    raise UnsupportedDag(f"cannot walk codec 0x{cid.codec:x} of {cid}")


class _Expected(NamedTuple):
    tsize: int
    content: int | None  # set when the parent is a UnixFS file node (its blocksize)
    parent: Cid


class DagWalk:
    """A DAG's sizes checked block by block as a fetch brings them in.

    Sans-io: the fetcher asks for blocks, hands each one (already verified
    against its CID) to `visit`, and fetches the children it returns, in any
    order. Before any child is fetched, `visit` has checked:

    - the block against the link that led to it: its cumulative size (its
      own bytes plus its links' Tsizes; a raw leaf's length) must equal the
      link's Tsize, and, under a UnixFS file node, its content must equal
      the parent's blocksize. Bigger than declared is ContentTooLarge,
      smaller is MalformedBlock; two links to one CID must agree;
    - the block itself: a file node's blocksizes add up to its filesize,
      and it declares no more content than DAG bytes;
    - the root's cumulative size against `max_bytes`.

    So once every link is checked, the root's cumulative size is the size of
    the DAG as a tree (a block reached by many links counts each time), and
    a DAG that lies about it is stopped at the first block that contradicts
    its parent, with nothing below that block fetched. `max_bytes` also
    caps the unique bytes visited, so no fetch moves more than it allows.
    Tsizes must be exact, as Kubo and js-ipfs write them: a DAG with zero or
    made-up Tsizes cannot be fetched within a bound and is refused.
    """

    def __init__(self, root: Cid, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.root = root
        self.max_bytes = max_bytes
        self.dag_size: int | None = None  # the root's cumulative size, once it is visited
        self.content_size: int | None = None  # the root's file size, if it is a file
        self.visited_bytes = 0
        self.blocks = 0
        self._root_key = root.to_v1()
        self._expected: dict[Cid, _Expected] = {}
        self._seen: dict[Cid, tuple[int, int | None]] = {}

    def visit(self, cid: Cid, block: bytes) -> list[Cid]:
        """Check a fetched block; return its children that no earlier block linked to."""
        if cid.to_v1() in self._seen:
            return []
        if cid.codec == RAW:
            return self._admit(cid, len(block), len(block), len(block), [])
        if cid.codec != DAG_PB:
            raise UnsupportedDag(f"cannot walk codec 0x{cid.codec:x} of {cid}")
        node = decode_pbnode(block)
        dag = len(block) + sum(link.tsize for link in node.links)
        content: int | None = None
        sizes: tuple[int | None, ...] = (None,) * len(node.links)
        fs = _try_unixfs(node)
        if fs is not None and fs.type in (FT_FILE, FT_RAW):
            content = _file_layout(cid, node, fs)
            sizes = fs.blocksizes
            if content > dag:
                raise ContentTooLarge(
                    f"{cid} declares {content} bytes of content in a DAG its links "
                    f"declare to be {dag} bytes",
                    size=content,
                )
        links = [(link.cid, link.tsize, size) for link, size in zip(node.links, sizes, strict=True)]
        return self._admit(cid, dag, content, len(block), links)

    def visit_leaf(self, cid: Cid, size: int) -> list[Cid]:
        """Check a raw leaf known only by its size (one already on disk, say)."""
        if cid.codec != RAW:
            raise ValueError(f"{cid} is not a raw leaf")
        if cid.to_v1() in self._seen:
            return []
        return self._admit(cid, size, size, size, [])

    def _admit(
        self,
        cid: Cid,
        dag: int,
        content: int | None,
        nbytes: int,
        links: list[tuple[Cid, int, int | None]],
    ) -> list[Cid]:
        key = cid.to_v1()
        if key == self._root_key:
            self.dag_size, self.content_size = dag, content
            if self.max_bytes is not None and dag > self.max_bytes:
                raise ContentTooLarge(
                    f"{cid} is {dag} bytes as its links declare, over the limit of "
                    f"{self.max_bytes}",
                    limit=self.max_bytes,
                    size=dag,
                )
        else:
            expected = self._expected.get(key)
            if expected is None:
                raise ValueError(f"{cid} is not linked from any block of {self.root} visited")
            _check_link(cid, dag, content, expected)
            del self._expected[key]
        self.visited_bytes += nbytes
        self.blocks += 1
        if self.max_bytes is not None and self.visited_bytes > self.max_bytes:
            raise ContentTooLarge(
                f"{self.root}: over {self.max_bytes} bytes fetched",
                limit=self.max_bytes,
                size=self.visited_bytes,
            )
        self._seen[key] = (dag, content)
        fresh: list[Cid] = []
        for child, tsize, size in links:
            child_key = child.to_v1()
            link = _Expected(tsize, size, cid)
            seen = self._seen.get(child_key)
            if seen is not None:
                _check_link(child, seen[0], seen[1], link)
                continue
            prior = self._expected.get(child_key)
            if prior is None:
                self._expected[child_key] = link
                fresh.append(child)
                continue
            clash = size is not None and prior.content is not None and prior.content != size
            if prior.tsize != tsize or clash:
                raise MalformedBlock(
                    f"{child} is linked as {prior.tsize}/{prior.content} bytes from "
                    f"{prior.parent} and as {tsize}/{size} from {cid}"
                )
            if prior.content is None and size is not None:
                self._expected[child_key] = link
        return fresh


def _check_link(cid: Cid, dag: int, content: int | None, link: _Expected) -> None:
    if dag != link.tsize:
        message = (
            f"{cid} is {dag} bytes (cumulative); the link from {link.parent} declares {link.tsize}"
        )
        if dag > link.tsize:
            raise ContentTooLarge(message, size=dag)
        raise MalformedBlock(message)
    if link.content is None:
        return
    if content is None:
        raise MalformedBlock(f"{cid} is not a file, but {link.parent} lists it as part of one")
    _check_declared(cid, content, link.content, "content")


def _try_unixfs(node: PBNode) -> UnixFSData | None:
    """The UnixFS meaning of a dag-pb node, or None for dag-pb that is not UnixFS."""
    if node.data is None:
        return None
    try:
        return decode_unixfs(node.data)
    except MalformedBlock:
        return None


def _decode_unixfs_node(cid: Cid, block: bytes) -> tuple[PBNode, UnixFSData]:
    node = decode_pbnode(block)
    if node.data is None:
        raise MalformedBlock(f"{cid}: dag-pb node without UnixFS data")
    return node, decode_unixfs(node.data)


class _Budget:
    """Content bytes a read may still produce, charged per link that reaches a file.

    A file's declared size is charged before any of its content is read, and
    every declared size is checked against the blocks under it before they
    are descended into, so a read never yields more than it charged: a DAG
    that reuses one block under many links pays for each link.
    """

    __slots__ = ("entries", "limit", "max_entries", "used")

    def __init__(self, limit: int | None, max_entries: int | None = None) -> None:
        if limit is not None and limit < 0:
            raise ValueError("max_bytes must not be negative")
        self.limit = limit
        self.max_entries = max_entries
        self.used = 0
        self.entries = 0

    def charge(self, cid: Cid, size: int) -> None:
        self.used += size
        if self.limit is not None and self.used > self.limit:
            raise ContentTooLarge(
                f"{cid}: reading it would pass the limit of {self.limit} bytes "
                f"({self.used} counting every link)",
                limit=self.limit,
                size=self.used,
            )

    def entry(self, cid: Cid) -> None:
        self.entries += 1
        if self.max_entries is not None and self.entries > self.max_entries:
            raise ContentTooLarge(
                f"{cid}: more than {self.max_entries} directory entries (counting every link)",
                limit=self.max_entries,
                size=self.entries,
            )


def _check_declared(cid: Cid, actual: int, declared: int | None, what: str) -> None:
    """A block (or what it declares) must be exactly the size its parent link declares."""
    if declared is None or actual == declared:
        return
    message = f"{cid}: {what} is {actual} bytes, its parent declares {declared}"
    if actual > declared:
        raise ContentTooLarge(message, size=actual)
    raise MalformedBlock(message)


def _file_layout(cid: Cid, node: PBNode, fs: UnixFSData) -> int:
    """Content size a file node declares, after checking its fields agree."""
    if fs.type in (FT_DIRECTORY, FT_HAMT_SHARD):
        raise UnexpectedNodeType(f"{cid} is a directory, not a file")
    if fs.type not in (FT_FILE, FT_RAW):
        raise UnsupportedDag(f"{cid}: UnixFS type {fs.type} is not a regular file")
    if len(fs.blocksizes) != len(node.links):
        raise MalformedBlock(f"{cid}: {len(node.links)} links but {len(fs.blocksizes)} blocksizes")
    total = len(fs.data or b"") + sum(fs.blocksizes)
    if fs.filesize is not None and total != fs.filesize:
        raise MalformedBlock(f"{cid}: blocks add up to {total} bytes, filesize says {fs.filesize}")
    return total


def _iter_file(
    get_block: GetBlock,
    cid: Cid,
    depth: int,
    expected: int | None,
    budget: _Budget | None,
    tsize: int | None = None,
) -> Iterator[bytes]:
    """`expected`: the content size the parent's blocksize declares; `tsize`: its link's Tsize."""
    if depth > MAX_DEPTH:
        raise MalformedBlock(f"file DAG deeper than {MAX_DEPTH} levels")
    block = fetch_verified(get_block, cid)
    if cid.codec == RAW:
        _check_declared(cid, len(block), expected, "leaf")
        _check_declared(cid, len(block), tsize, "leaf (Tsize)")
        if budget is not None and depth == 0:
            budget.charge(cid, len(block))
        if block:
            yield block
        return
    if cid.codec != DAG_PB:
        raise UnsupportedDag(f"{cid}: codec 0x{cid.codec:x} is not a UnixFS file")
    node, fs = _decode_unixfs_node(cid, block)
    # Every size is checked before anything below it is read: a node whose
    # children claim more than it does (or than the budget) stops here. The
    # Tsizes are held to the same rule as in DagWalk, so a node cannot claim
    # more content than DAG bytes (the measured bomb: 1 GiB in ~200 KB).
    dag = len(block) + sum(link.tsize for link in node.links)
    _check_declared(cid, dag, tsize, "cumulative size (Tsize)")
    total = _file_layout(cid, node, fs)
    if total > dag:
        raise ContentTooLarge(
            f"{cid} declares {total} bytes of content in a DAG its links declare to be {dag} bytes",
            size=total,
        )
    _check_declared(cid, total, expected, "content")
    if budget is not None and depth == 0:
        budget.charge(cid, total)
    if fs.data:
        yield fs.data
    for link, size in zip(node.links, fs.blocksizes, strict=True):
        if link.cid.codec not in (RAW, DAG_PB):
            raise UnsupportedDag(f"{cid}: link to codec 0x{link.cid.codec:x}")
        yield from _iter_file(get_block, link.cid, depth + 1, size, budget, link.tsize)


def iter_file(get_block: GetBlock, cid: Cid, *, max_bytes: int | None = None) -> Iterator[bytes]:
    """Stream a UnixFS file's content, verifying every block and every declared size.

    With `max_bytes`, a file that declares more content is refused
    (ContentTooLarge) after its root block, before any content is read; a
    file whose blocks hold more than they declare (blocksizes, filesize or
    link Tsizes, which must be exact as Kubo writes them) is refused at the
    first such block, budget or not. Memory stays at one block per level
    whatever the file's size.
    """
    return _iter_file(get_block, cid, 0, None, None if max_bytes is None else _Budget(max_bytes))


def _is_directory(get_block: GetBlock, cid: Cid, tsize: int | None = None) -> bool:
    """Whether `cid` is a directory; if so, its cumulative size must be the `tsize` given."""
    if cid.codec != DAG_PB:
        return False
    block = fetch_verified(get_block, cid)
    node, fs = _decode_unixfs_node(cid, block)
    if fs.type == FT_HAMT_SHARD:
        raise UnsupportedDag(f"{cid}: HAMT-sharded directories are not supported")
    if fs.type != FT_DIRECTORY:
        return False
    dag = len(block) + sum(link.tsize for link in node.links)
    _check_declared(cid, dag, tsize, "cumulative size (Tsize)")
    return True


def list_directory(get_block: GetBlock, cid: Cid) -> list[DirEntry]:
    """Entries in link order; names are checked so no entry can escape its parent."""
    if cid.codec != DAG_PB:
        raise UnexpectedNodeType(f"{cid} is a raw block, not a directory")
    node, fs = _decode_unixfs_node(cid, fetch_verified(get_block, cid))
    if fs.type == FT_HAMT_SHARD:
        raise UnsupportedDag(f"{cid}: HAMT-sharded directories are not supported")
    if fs.type != FT_DIRECTORY:
        raise UnexpectedNodeType(f"{cid} is not a directory (UnixFS type {fs.type})")
    seen: set[str] = set()
    entries: list[DirEntry] = []
    for link in node.links:
        _check_name(link.name, MalformedBlock)
        if link.name in seen:
            raise MalformedBlock(f"{cid}: duplicate entry {link.name!r}")
        seen.add(link.name)
        entries.append(DirEntry(link.name, link.cid, link.tsize))
    return entries


def resolve_path(get_block: GetBlock, root: Cid, path: str) -> Cid:
    """CID at `path` below the directory `root`; "" is the root itself."""
    current = root
    if not path:
        return current
    walked: list[str] = []
    for part in split_path(path):
        for entry in list_directory(get_block, current):
            if entry.name == part:
                current = entry.cid
                break
        else:
            raise PathNotFound(f"{'/'.join([*walked, part])!r} not found under {root}")
        walked.append(part)
    return current


def read_tree(
    get_block: GetBlock,
    root: Cid,
    *,
    max_bytes: int | None = None,
    max_entries: int | None = MAX_TREE_ENTRIES,
) -> dict[str, bytes]:
    """Every file below `root` by relative posix path (empty directories are dropped).

    The whole tree is held in memory, so it is bounded: `max_bytes` of
    content in all (checked against each file's declared size before it is
    read) and `max_entries` directory entries, each counted once per link
    that reaches it (a directory linked twice is read, and paid for, twice).
    """
    budget = _Budget(max_bytes, max_entries)
    out: dict[str, bytes] = {}
    stack: list[tuple[str, Cid, int]] = [("", root, 0)]
    while stack:
        prefix, dir_cid, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise MalformedBlock(f"directory tree deeper than {MAX_DEPTH} levels")
        for entry in list_directory(get_block, dir_cid):
            budget.entry(dir_cid)
            path = prefix + entry.name
            if _is_directory(get_block, entry.cid, entry.tsize):
                stack.append((path + "/", entry.cid, depth + 1))
            else:
                out[path] = b"".join(_iter_file(get_block, entry.cid, 0, None, budget, entry.tsize))
    return out
