"""Errors of the storage layer.

Every error derives from `StorageError` so the node can map the whole family
onto one RPC error code, and also from the builtin a caller would naturally
catch (`ValueError` for bad input, `KeyError` for absent keys), so plain
Python idioms keep working without importing this module.
"""

from __future__ import annotations


class StorageError(Exception):
    """Root of the storage error family."""


class InvalidCid(StorageError, ValueError):
    """Text or bytes that are not a CID this layer understands.

    Also raised when a CID names a hash function we cannot verify: accepting
    a block we cannot check would silently drop content addressing.
    """


class MalformedBlock(StorageError, ValueError):
    """A block whose bytes do not decode as the format its CID claims.

    Blocks come from untrusted peers, so every decoding failure must surface
    as this one type rather than whatever IndexError the parser hit first.
    """


class UnsupportedDag(MalformedBlock):
    """Well-formed data this layer deliberately does not handle (HAMT, symlinks...).

    Subclasses MalformedBlock so callers that only care "can I read this?"
    need a single except clause.
    """


class ContentTooLarge(MalformedBlock):
    """A DAG over the size the caller allows, or bigger than its own links declare.

    Raised as soon as a walk or a fetch can tell, before the excess is read:
    a UnixFS "bomb" (thousands of links to one block, each claiming a tiny
    size) is refused at its first lying block, not after a gigabyte.
    Subclasses MalformedBlock because content bigger than its declared sizes
    is malformed, and callers that only ask "can I read this?" keep one
    except clause. `limit` is the budget in force (None when the error is a
    declared size that the block under it exceeds) and `size` what was found.
    """

    def __init__(self, message: str, *, limit: int | None = None, size: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.size = size


class UnexpectedNodeType(StorageError, ValueError):
    """A file was expected and a directory was found, or the reverse."""


class CorruptBlock(StorageError, ValueError):
    """Bytes whose hash does not match the CID they were stored or fetched under."""


class BlockNotFound(StorageError, KeyError):
    """The blockstore does not hold the requested block."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else "block not found"


class PathNotFound(StorageError, KeyError):
    """A path inside a UnixFS directory tree names no entry."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "path not found"
