"""meshrun storage layer (docs/design.md: layers, storage and CIDs).

A synchronous library: CIDs, Kubo-compatible UnixFS import/export and block
stores. The node wraps it for async use and bitswap; nothing here does I/O
other than the local disk.
"""

from storage.blockstore import BaseBlockstore, Blockstore, FileBlockstore, MemoryBlockstore
from storage.cid import DAG_PB, RAW, SHA2_256, Cid, cid_for_raw, sha256_multihash
from storage.errors import (
    BlockNotFound,
    ContentTooLarge,
    CorruptBlock,
    InvalidCid,
    MalformedBlock,
    PathNotFound,
    StorageError,
    UnexpectedNodeType,
    UnsupportedDag,
)
from storage.unixfs import (
    CHUNK_SIZE,
    MAX_LINKS,
    DagWalk,
    DirEntry,
    FileImporter,
    ImportResult,
    build_directory,
    build_tree,
    import_bytes,
    import_stream,
    iter_file,
    list_directory,
    read_tree,
    resolve_path,
)

__all__ = [
    "CHUNK_SIZE",
    "DAG_PB",
    "MAX_LINKS",
    "RAW",
    "SHA2_256",
    "BaseBlockstore",
    "BlockNotFound",
    "Blockstore",
    "Cid",
    "ContentTooLarge",
    "CorruptBlock",
    "DagWalk",
    "DirEntry",
    "FileBlockstore",
    "FileImporter",
    "ImportResult",
    "InvalidCid",
    "MalformedBlock",
    "MemoryBlockstore",
    "PathNotFound",
    "StorageError",
    "UnexpectedNodeType",
    "UnsupportedDag",
    "build_directory",
    "build_tree",
    "cid_for_raw",
    "import_bytes",
    "import_stream",
    "iter_file",
    "list_directory",
    "read_tree",
    "resolve_path",
    "sha256_multihash",
]
