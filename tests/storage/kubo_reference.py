"""A direct port of Kubo's balanced layout (go-unixfs importer/balanced).

It follows Kubo's control flow (one-chunk lookahead, `fillNodeRec`) rather
than the streaming level-stack of `storage.unixfs.FileImporter`, so the two
agreeing on many shapes is evidence both describe the same tree. It also
builds non-raw (dag-pb) leaves, which the CIDv0 vectors need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.cid import DAG_PB, Cid, cid_for_raw, sha256_multihash
from storage.unixfs import FT_FILE, PBLink, UnixFSData, encode_pbnode, encode_unixfs


@dataclass
class _Node:
    cid: Cid
    size: int  # ipld Node.Size(): block length plus the links' Tsizes
    filesize: int


@dataclass
class _Builder:
    chunks: list[bytes]
    max_links: int
    raw_leaves: bool
    cid_version: int
    blocks: dict[Cid, bytes] = field(default_factory=dict)
    pos: int = 0

    def done(self) -> bool:
        return self.pos >= len(self.chunks)

    def _pb_cid(self, block: bytes) -> Cid:
        return Cid(self.cid_version, DAG_PB, sha256_multihash(block))

    def leaf(self, data: bytes) -> _Node:
        if self.raw_leaves:
            cid = cid_for_raw(data)
            self.blocks[cid] = data
            return _Node(cid, len(data), len(data))
        unixfs = UnixFSData(FT_FILE, data=data or None, filesize=len(data))
        block = encode_pbnode([], encode_unixfs(unixfs))
        cid = self._pb_cid(block)
        self.blocks[cid] = block
        return _Node(cid, len(block), len(data))

    def next_leaf(self) -> _Node:
        chunk = self.chunks[self.pos]
        self.pos += 1
        return self.leaf(chunk)

    def commit(self, children: list[_Node]) -> _Node:
        sizes = tuple(c.filesize for c in children)
        data = encode_unixfs(UnixFSData(FT_FILE, filesize=sum(sizes), blocksizes=sizes))
        block = encode_pbnode([PBLink(c.cid, "", c.size) for c in children], data)
        cid = self._pb_cid(block)
        self.blocks[cid] = block
        return _Node(cid, len(block) + sum(c.size for c in children), sum(sizes))

    def fill_node_rec(self, children: list[_Node], depth: int) -> _Node:
        while len(children) < self.max_links and not self.done():
            if depth == 1:
                children.append(self.next_leaf())
            else:
                children.append(self.fill_node_rec([], depth - 1))
        return self.commit(children)

    def layout(self) -> _Node:
        if self.done():
            return self.leaf(b"")
        root = self.next_leaf()
        depth = 1
        while not self.done():
            root = self.fill_node_rec([root], depth)
            depth += 1
        return root


def kubo_add(
    data: bytes,
    *,
    chunk_size: int = 262144,
    max_links: int = 174,
    raw_leaves: bool = True,
    cid_version: int = 1,
) -> tuple[Cid, int, dict[Cid, bytes]]:
    """(root CID, root cumulative size, all blocks) as `ipfs add` would produce."""
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    builder = _Builder(chunks, max_links, raw_leaves, cid_version)
    root = builder.layout()
    return root.cid, root.size, builder.blocks
