"""Block storage: an on-disk store for the node and an in-memory one for tests.

Blocks are keyed by CIDv1 (a v0 CID and the v1 dag-pb CID with the same
multihash are the same bytes, so they share one entry). Every read is hashed
before it is returned: the disk is not trusted any more than a peer is.

Two on-disk layouts exist: packs (storage.packstore, the default for a new
directory) and one file per block (FileBlockstore, what every data directory
made before packs holds). `Blockstore` opens whichever a directory has.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from storage.cid import RAW, Cid, InvalidCid
from storage.errors import BlockNotFound, CorruptBlock, MalformedBlock
from storage.unixfs import (
    CHUNK_SIZE,
    MAX_TREE_ENTRIES,
    DagWalk,
    DirEntry,
    ImportResult,
    block_links,
    build_directory,
    import_stream,
    iter_file,
    list_directory,
    read_tree,
    resolve_path,
)

if TYPE_CHECKING:
    from storage.packstore import PackBlockstore

__all__ = ["BaseBlockstore", "Blockstore", "FileBlockstore", "MemoryBlockstore"]

_TMP_PREFIX = ".tmp-"
# Leaves are hashed on this many threads (hashlib and file writes release the
# GIL); more than the cores buys nothing.
IMPORT_WORKERS = max(1, min(4, os.cpu_count() or 1))
FILE_READ_BYTES = 16 * CHUNK_SIZE


class BaseBlockstore(ABC):
    """Block primitives plus the UnixFS conveniences built on them.

    Subclasses only implement raw storage; hashing and DAG logic live here
    once, so the disk and memory stores cannot drift apart.
    """

    @abstractmethod
    def _read(self, cid: Cid) -> bytes | None: ...

    @abstractmethod
    def _write(self, cid: Cid, data: bytes | memoryview) -> None:
        """Store a verified block; `data` may be a view the caller reuses afterwards.

        Must be thread-safe: imports write leaves from several threads.
        """

    @abstractmethod
    def has(self, cid: Cid) -> bool: ...

    @abstractmethod
    def delete(self, cid: Cid) -> bool:
        """Remove a block; False if it was not there."""

    @abstractmethod
    def iter_cids(self) -> Iterator[Cid]:
        """All stored blocks, as CIDv1."""

    @abstractmethod
    def size_bytes(self) -> int: ...

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, Cid) and self.has(cid)

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Group many writes or deletes: a store may then commit its index once."""
        return contextlib.nullcontext()

    def written_at(self, cid: Cid) -> float | None:
        """When a block was stored (epoch seconds), None if absent or not known."""
        return None

    def maintain(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Reclaim space after deletions (garbage collection calls it); a no-op by default."""

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release files and commit anything batched; a no-op by default."""

    def put(self, cid: Cid, data: bytes) -> None:
        """Store a block after checking it hashes to `cid` (bytes may come from a peer)."""
        if not cid.verify(data):
            raise CorruptBlock(f"refusing block that does not hash to {cid}")
        self._write(cid, bytes(data))

    def get(self, cid: Cid) -> bytes:
        data = self._read(cid)
        if data is None:
            raise BlockNotFound(f"block {cid} not found")
        if not cid.verify(data):
            raise CorruptBlock(f"stored block {cid} does not match its hash")
        return data

    def _sink(self, cid: Cid, data: bytes | memoryview) -> None:
        # Blocks from our own importer were just hashed to make the CID.
        self._write(cid, data)

    def _import(self, chunks: Iterable[bytes | bytearray | memoryview]) -> ImportResult:
        """Our importer, zero-copy and with leaves hashed on IMPORT_WORKERS threads."""
        with self.batch():
            return import_stream(chunks, self._sink, views=True, workers=IMPORT_WORKERS)

    def add_bytes(self, data: bytes) -> Cid:
        return self._import([data]).cid

    def add_stream(self, chunks: Iterable[bytes | bytearray | memoryview]) -> ImportResult:
        return self._import(chunks)

    def add_file(self, path: str | os.PathLike[str]) -> Cid:
        return self._add_file(Path(path)).cid

    def _add_file(self, path: Path) -> ImportResult:
        with path.open("rb") as fh:
            # Several chunks per read, so their leaves can be hashed in parallel.
            return self._import(iter(lambda: fh.read(FILE_READ_BYTES), b""))

    def add_tree(self, files: Mapping[str, bytes]) -> Cid:
        with self.batch():
            imported = {path: self._import([data]) for path, data in files.items()}
            return build_directory(imported, self._sink).cid

    def add_directory(self, path: str | os.PathLike[str]) -> Cid:
        """Like `ipfs add -r --hidden --cid-version=1 --raw-leaves`, empty dirs included.

        Files stream from disk one at a time. Symlinks and special files are
        refused rather than followed: Kubo would store a symlink node, which
        this layer does not model.
        """
        with self.batch():
            return self._add_directory(Path(path))

    def _add_directory(self, base: Path) -> Cid:
        files: dict[str, ImportResult] = {}
        empty_dirs: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            current = Path(dirpath)
            rel = current.relative_to(base).as_posix()
            prefix = "" if rel == "." else rel + "/"
            for name in dirnames:
                if (current / name).is_symlink():
                    raise ValueError(f"symlink {current / name} is not supported")
            if prefix and not dirnames and not filenames:
                empty_dirs.append(rel)
            for name in filenames:
                full = current / name
                if full.is_symlink() or not full.is_file():
                    raise ValueError(f"{full} is not a regular file")
                files[prefix + name] = self._add_file(full)
        return build_directory(files, self._sink, empty_dirs=empty_dirs).cid

    def size_of(self, cid: Cid) -> int | None:
        """Stored size of a block, unverified (None if absent); subclasses make it cheap."""
        data = self._read(cid)
        return None if data is None else len(data)

    def iter_file(self, cid: Cid, *, max_bytes: int | None = None) -> Iterator[bytes]:
        return iter_file(self.get, cid, max_bytes=max_bytes)

    def cat(self, cid: Cid, *, max_bytes: int | None = None) -> bytes:
        """A whole file in memory; `max_bytes` refuses a bigger one before reading it."""
        return b"".join(iter_file(self.get, cid, max_bytes=max_bytes))

    def cat_to(
        self, cid: Cid, path: str | os.PathLike[str], *, max_bytes: int | None = None
    ) -> int:
        """Write a file's content to `path` a block at a time; returns its size.

        Memory stays at a block per DAG level, however big the file. The
        bytes go to a temporary file beside `path`, renamed into place only
        once complete, so a refused (ContentTooLarge) or broken DAG leaves
        nothing behind.
        """
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
        written = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                for piece in iter_file(self.get, cid, max_bytes=max_bytes):
                    fh.write(piece)
                    written += len(piece)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return written

    def list_directory(self, cid: Cid) -> list[DirEntry]:
        return list_directory(self.get, cid)

    def resolve_path(self, root: Cid, path: str) -> Cid:
        return resolve_path(self.get, root, path)

    def read_tree(
        self,
        cid: Cid,
        *,
        max_bytes: int | None = None,
        max_entries: int | None = MAX_TREE_ENTRIES,
    ) -> dict[str, bytes]:
        return read_tree(self.get, cid, max_bytes=max_bytes, max_entries=max_entries)

    def walk_local(self, walk: DagWalk, cids: Iterable[Cid]) -> list[Cid]:
        """Hand `walk` every block under `cids` held here; return the ones to fetch.

        Missing (or corrupt) blocks are returned in DFS order. As in
        `missing_blocks`, raw leaves are checked by size alone, unless the
        size contradicts the walk: then the leaf is read, and a corrupt one
        counts as missing rather than as a lie.
        """
        missing: list[Cid] = []
        stack = list(reversed(list(cids)))
        while stack:
            cid = stack.pop()
            size = self.size_of(cid)
            if size is None:
                missing.append(cid)
                continue
            try:
                if cid.codec == RAW:
                    try:
                        children = walk.visit_leaf(cid, size)
                    except MalformedBlock:
                        self.get(cid)  # CorruptBlock if the disk is what lies
                        raise
                else:
                    children = walk.visit(cid, self.get(cid))
            except (CorruptBlock, BlockNotFound):
                missing.append(cid)
                continue
            stack.extend(reversed(children))
        return missing

    def check_dag(self, root: Cid, *, max_bytes: int | None = None) -> DagWalk:
        """Walk a local DAG's declared sizes (see DagWalk); BlockNotFound if incomplete."""
        walk = DagWalk(root, max_bytes)
        missing = self.walk_local(walk, [root])
        if missing:
            raise BlockNotFound(f"block {missing[0]} of {root} not found")
        return walk

    def missing_blocks(self, root: Cid) -> list[Cid]:
        """Blocks of the DAG under `root` that are absent or corrupt here, in DFS order.

        Only blocks that carry links are read (and so verified); raw leaves
        are checked for presence alone, because hashing every leaf would make
        this "what is left to fetch?" query cost as much as a full read.
        Whatever this misses still fails loudly in `get`.
        """
        missing: list[Cid] = []
        seen: set[Cid] = set()
        stack = [root]
        while stack:
            cid = stack.pop()
            key = cid.to_v1()
            if key in seen:
                continue
            seen.add(key)
            if not self.has(cid):
                missing.append(cid)
                continue
            if cid.codec == RAW:
                continue
            try:
                block = self.get(cid)
            except (CorruptBlock, BlockNotFound):
                missing.append(cid)
                continue
            stack.extend(reversed(block_links(cid, block)))
        return missing


class MemoryBlockstore(BaseBlockstore):
    def __init__(self) -> None:
        self._blocks: dict[Cid, bytes] = {}

    def _read(self, cid: Cid) -> bytes | None:
        return self._blocks.get(cid.to_v1())

    def _write(self, cid: Cid, data: bytes | memoryview) -> None:
        self._blocks[cid.to_v1()] = bytes(data)

    def has(self, cid: Cid) -> bool:
        return cid.to_v1() in self._blocks

    def size_of(self, cid: Cid) -> int | None:
        data = self._blocks.get(cid.to_v1())
        return None if data is None else len(data)

    def delete(self, cid: Cid) -> bool:
        return self._blocks.pop(cid.to_v1(), None) is not None

    def iter_cids(self) -> Iterator[Cid]:
        return iter(list(self._blocks))

    def size_bytes(self) -> int:
        return sum(len(b) for b in self._blocks.values())


class FileBlockstore(BaseBlockstore):
    """One file per block under `root/blocks/<shard>/<cidv1 base32>`.

    The shard is the two characters before the last (flatfs's
    "next-to-last/2"): the final base32 character of a sha2-256 CID only
    carries 3 bits, so the last characters alone would shard unevenly.
    Writes go to a temporary file in the shard and are renamed into place,
    so a reader never sees a half-written block. `fsync=True` additionally
    makes each block durable before `put` returns; without it a crash can
    leave an empty or torn file, which `get` reports as CorruptBlock.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.root = Path(root)
        self._blocks_dir = self.root / "blocks"
        self._blocks_dir.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._shards: set[Path] = set()

    def _path(self, cid: Cid) -> Path:
        name = cid.to_v1().encode()
        return self._blocks_dir / name[-3:-1] / name

    def path_for(self, cid: Cid) -> Path:
        return self._path(cid)

    def _read(self, cid: Cid) -> bytes | None:
        try:
            return self._path(cid).read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, cid: Cid, data: bytes | memoryview) -> None:
        path = self._path(cid)
        # Re-putting identical bytes is a no-op; anything else replaces a
        # block that must have been corrupt, since its CID is the same.
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == len(data) and path.read_bytes() == data:
                return
        if path.parent not in self._shards:
            # A failing mkdir costs as much as a file creation (~1 ms on the
            # benchmark VM's ext4): make each shard once, not once per block.
            path.parent.mkdir(exist_ok=True)
            self._shards.add(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if self._fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def has(self, cid: Cid) -> bool:
        return self._path(cid).is_file()

    def size_of(self, cid: Cid) -> int | None:
        try:
            return self._path(cid).stat().st_size
        except FileNotFoundError:
            return None

    def written_at(self, cid: Cid) -> float | None:
        try:
            return self._path(cid).stat().st_mtime
        except FileNotFoundError:
            return None

    def delete(self, cid: Cid) -> bool:
        try:
            self._path(cid).unlink()
        except FileNotFoundError:
            return False
        return True

    def _block_files(self) -> Iterator[tuple[Path, Cid]]:
        for shard in sorted(self._blocks_dir.iterdir()):
            if not shard.is_dir():
                continue
            for entry in sorted(shard.iterdir()):
                if entry.name.startswith(_TMP_PREFIX):
                    continue
                try:
                    cid = Cid.decode(entry.name)
                except InvalidCid:
                    continue
                if entry.name[-3:-1] == shard.name:
                    yield entry, cid

    def iter_cids(self) -> Iterator[Cid]:
        for _, cid in self._block_files():
            yield cid

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path, _ in self._block_files())


Layout = Literal["auto", "packs", "files"]


def detect_layout(root: str | os.PathLike[str]) -> Literal["packs", "files"]:
    """The layout of the store at `root`: "files" only where an old store already is."""
    path = Path(root)
    if (path / "index.sqlite").exists() or (path / "packs").is_dir():
        return "packs"
    return "files" if (path / "blocks").is_dir() else "packs"


class Blockstore(BaseBlockstore):
    """The node's on-disk blockstore at `root`, in whichever layout it has.

    A new directory gets packs (storage.packstore: fast imports, see
    benchmarks/README.md); a directory written before packs existed keeps
    its one-file-per-block layout and stays fully usable, so upgrading a
    node touches none of its blocks. `layout` forces one for a new store.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, fsync: bool = False, layout: Layout = "auto"
    ) -> None:
        from storage.packstore import PackBlockstore

        self.root = Path(root)
        self.layout = detect_layout(root) if layout == "auto" else layout
        self.backend: FileBlockstore | PackBlockstore = (
            PackBlockstore(root, fsync=fsync)
            if self.layout == "packs"
            else FileBlockstore(root, fsync=fsync)
        )

    def _read(self, cid: Cid) -> bytes | None:
        return self.backend._read(cid)

    def _write(self, cid: Cid, data: bytes | memoryview) -> None:
        self.backend._write(cid, data)

    def has(self, cid: Cid) -> bool:
        return self.backend.has(cid)

    def size_of(self, cid: Cid) -> int | None:
        return self.backend.size_of(cid)

    def written_at(self, cid: Cid) -> float | None:
        return self.backend.written_at(cid)

    def delete(self, cid: Cid) -> bool:
        return self.backend.delete(cid)

    def iter_cids(self) -> Iterator[Cid]:
        return self.backend.iter_cids()

    def size_bytes(self) -> int:
        return self.backend.size_bytes()

    def batch(self) -> contextlib.AbstractContextManager[None]:
        return self.backend.batch()

    def maintain(self) -> None:
        self.backend.maintain()

    def close(self) -> None:
        self.backend.close()
