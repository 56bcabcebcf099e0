"""Hand-built UnixFS "bombs": a little data on the wire, a lot of content when read.

The measured attack (issue 8): one dag-pb file node whose 4096 links all
point at the same 256 KiB raw leaf. The blocksizes are honest, so the file
declares 1 GiB; the link Tsizes say 1, so the DAG claims to be a few KiB.
On the wire that is the leaf plus a ~190 KiB root: about 448 KiB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from storage.cid import DAG_PB, Cid, cid_for_raw, sha256_multihash
from storage.unixfs import (
    CHUNK_SIZE,
    FT_DIRECTORY,
    FT_FILE,
    PBLink,
    UnixFSData,
    encode_pbnode,
    encode_unixfs,
)

Put = Callable[[Cid, bytes], None]


def pb_cid(block: bytes) -> Cid:
    return Cid(1, DAG_PB, sha256_multihash(block))


def leaf_bytes(size: int, seed: int = 0) -> bytes:
    """Incompressible-looking, distinct per seed (so two bombs share no leaf)."""
    pattern = bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(4096))
    return (pattern * (size // len(pattern) + 1))[:size]


@dataclass(frozen=True)
class Bomb:
    root: Cid
    leaf: Cid
    blocks: dict[Cid, bytes]
    declared_content: int  # what the root's filesize says
    logical_content: int  # what reading it would really produce

    @property
    def wire_bytes(self) -> int:
        return sum(len(b) for b in self.blocks.values())


def file_bomb(
    links: int = 4096,
    *,
    leaf_size: int = CHUNK_SIZE,
    tsize: int | None = 1,
    blocksize: int | None = None,
    seed: int = 0,
) -> Bomb:
    """One file node, `links` links to one leaf.

    `tsize` is what every link claims (None: the truth); `blocksize` what
    every blocksize claims (None: the truth, so filesize declares the real
    logical size).
    """
    leaf = leaf_bytes(leaf_size, seed)
    leaf_cid = cid_for_raw(leaf)
    size = len(leaf) if blocksize is None else blocksize
    data = encode_unixfs(UnixFSData(FT_FILE, filesize=size * links, blocksizes=(size,) * links))
    link_tsize = len(leaf) if tsize is None else tsize
    root_block = encode_pbnode([PBLink(leaf_cid, "", link_tsize)] * links, data)
    root = pb_cid(root_block)
    return Bomb(root, leaf_cid, {leaf_cid: leaf, root: root_block}, size * links, len(leaf) * links)


def directory_of(entries: dict[str, tuple[Cid, int]], blocks: dict[Cid, bytes]) -> Cid:
    """A directory block linking each name to (cid, tsize); stored into `blocks`."""
    data = encode_unixfs(UnixFSData(FT_DIRECTORY))
    links = [PBLink(cid, name, tsize) for name, (cid, tsize) in sorted(entries.items())]
    block = encode_pbnode(links, data)
    cid = pb_cid(block)
    blocks[cid] = block
    return cid


def put_all(put: Put, blocks: dict[Cid, bytes]) -> None:
    for cid, block in blocks.items():
        put(cid, block)
