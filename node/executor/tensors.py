"""The tensor bundle format that carries job inputs and outputs.

Tensors travel as an ``.npz`` bundle: numpy reads and writes it without extra
dependencies, every language with a zip reader can open it, and loading with
``allow_pickle=False`` means a bundle from a stranger can never execute code.
The executor worker imports this module at start, so it needs numpy only.
"""

from __future__ import annotations

import io
import math
import struct
import tokenize
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO

import numpy as np

# What numpy itself allows before it refuses to parse an .npy header.
_MAX_HEADER_SIZE = 10_000


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Pack named tensors as an uncompressed ``.npz``.

    Uncompressed because model tensors are mostly incompressible floats and the
    bundle is hashed and chunked for IPFS anyway. Object arrays are refused here
    rather than producing a bundle that the other side cannot load without pickle.
    """
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise ValueError(
                f"tensor {name!r} has dtype object, which cannot travel without pickle"
            )
        arrays[name] = array
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


class TensorsTooLarge(ValueError):
    """A bundle whose tensors, by their own headers, need more memory than allowed."""

    def __init__(self, total: int, limit: int) -> None:
        super().__init__(
            f"tensors declare {total} bytes uncompressed, over the limit of {limit} bytes"
        )
        self.total = total
        self.limit = limit


@dataclass(frozen=True)
class TensorHeader:
    """One bundle member as its headers describe it, read without loading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    # What loading it allocates: the data, with zero-width items counted a byte each
    # (so a shape of 10**15 empty strings is not free).
    nbytes: int


def inspect_tensors(data: bytes, max_bytes: int | None = None) -> dict[str, TensorHeader]:
    """Each member's name, shape and dtype from the zip and .npy headers alone.

    Decompresses a few hundred bytes per member, however large the bundle says it
    is, so a zip bomb is refused before anything is allocated for it. Refused (as
    ValueError): a member that is not ``.npy``, a member whose zip entry and .npy
    header disagree on its size, object arrays, and (as :class:`TensorsTooLarge`)
    tensors adding up to more than ``max_bytes``.
    """
    if not data:
        raise ValueError("tensor bundle is empty (expected .npz bytes)")
    if not data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        kind = "a single .npy array" if data.startswith(b"\x93NUMPY") else f"{data[:8]!r}..."
        raise ValueError(f"invalid .npz tensor bundle: expected a zip archive, got {kind}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            headers: dict[str, TensorHeader] = {}
            for info in archive.infolist():
                header = _member_header(archive, info)
                if header.name in headers:
                    raise ValueError(f"tensor {header.name!r} appears twice")
                headers[header.name] = header
    except ValueError as exc:
        raise ValueError(f"invalid .npz tensor bundle: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError, IndexError) as exc:
        # RuntimeError: an encrypted member; NotImplementedError (a RuntimeError):
        # a compression method zipfile does not have.
        raise ValueError(f"invalid .npz tensor bundle: {type(exc).__name__}: {exc}") from exc
    total = sum(header.nbytes for header in headers.values())
    if max_bytes is not None and total > max_bytes:
        raise TensorsTooLarge(total, max_bytes)
    return headers


def _member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> TensorHeader:
    if info.is_dir() or not info.filename.endswith(".npy"):
        raise ValueError(
            f"member {info.filename!r} is not a .npy array (an .npz bundle holds only "
            "name.npy members)"
        )
    with archive.open(info) as member:
        shape, dtype, header_size = _read_npy_header(member, info.filename)
    count = math.prod(shape)
    declared = header_size + count * dtype.itemsize
    if info.file_size != declared:
        raise ValueError(
            f"member {info.filename!r} is {info.file_size} bytes uncompressed but its .npy "
            f"header describes {declared} ({dtype}{list(shape)})"
        )
    return TensorHeader(
        name=info.filename[: -len(".npy")],
        shape=shape,
        dtype=dtype,
        nbytes=count * max(dtype.itemsize, 1),
    )


def _read_npy_header(member: IO[bytes], name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and header length of one .npy stream, read from its first bytes.

    The header's length is checked before the header is read: numpy reads all of
    a (format 2.0: up to 4 GiB) header before it looks at its length.
    """
    fmt = np.lib.format
    magic = _read_exactly(member, fmt.MAGIC_LEN, name)
    version = fmt.read_magic(io.BytesIO(magic))
    if version == (1, 0):
        length_format, read_header = "<H", fmt.read_array_header_1_0
    elif version == (2, 0):
        length_format, read_header = "<I", fmt.read_array_header_2_0
    else:
        raise ValueError(f"member {name!r} is .npy format {version}, expected 1.0 or 2.0")
    length_bytes = _read_exactly(member, struct.calcsize(length_format), name)
    (length,) = struct.unpack(length_format, length_bytes)
    if length > _MAX_HEADER_SIZE:
        raise ValueError(
            f"member {name!r} has a {length}-byte .npy header (at most {_MAX_HEADER_SIZE})"
        )
    header = length_bytes + _read_exactly(member, length, name)
    try:
        shape, _, dtype = read_header(io.BytesIO(header), max_header_size=_MAX_HEADER_SIZE)
    except (SyntaxError, TypeError, tokenize.TokenError) as exc:
        # numpy parses the header dict with Python's tokenizer: a peer's garbage
        # header raises whatever that raises, never only ValueError.
        raise ValueError(f"member {name!r} has an unreadable .npy header: {exc}") from None
    if dtype.hasobject:
        raise ValueError(
            f"member {name!r} holds Python objects, which cannot be loaded when allow_pickle=False"
        )
    if any(size < 0 for size in shape):
        raise ValueError(f"member {name!r} has a negative dimension in shape {shape}")
    return tuple(shape), dtype, len(magic) + len(header)


def _read_exactly(member: IO[bytes], size: int, name: str) -> bytes:
    data = member.read(size)
    if len(data) < size:
        raise ValueError(f"member {name!r} ends inside its .npy header")
    return data


def decode_tensors(data: bytes, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Unpack a bundle from :func:`encode_tensors`; anything else is a ValueError.

    Every member's headers are checked (:func:`inspect_tensors`, including the
    ``max_bytes`` budget) before any tensor is loaded, and each loaded tensor must
    end exactly where its zip entry does.
    """
    headers = inspect_tensors(data, max_bytes)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            tensors: dict[str, np.ndarray] = {}
            for name in headers:
                with archive.open(f"{name}.npy") as member:
                    array = np.lib.format.read_array(
                        member, allow_pickle=False, max_header_size=_MAX_HEADER_SIZE
                    )
                    if member.read(1):
                        raise ValueError(f"member {name + '.npy'!r} has bytes after its data")
                tensors[name] = array
            return tensors
    except ValueError as exc:
        raise ValueError(f"invalid .npz tensor bundle: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError, IndexError) as exc:
        raise ValueError(f"invalid .npz tensor bundle: {type(exc).__name__}: {exc}") from exc


encode_inputs = encode_tensors
decode_inputs = decode_tensors
