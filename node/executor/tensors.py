"""The tensor bundle format that carries job inputs and outputs.

Tensors travel as an ``.npz`` bundle: numpy reads and writes it without extra
dependencies, every language with a zip reader can open it, and loading with
``allow_pickle=False`` means a bundle from a stranger can never execute code.
The executor worker imports this module at start, so it needs numpy only.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

import numpy as np


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


def decode_tensors(data: bytes) -> dict[str, np.ndarray]:
    """Unpack a bundle from :func:`encode_tensors`; anything else is a ValueError."""
    if not data:
        raise ValueError("tensor bundle is empty (expected .npz bytes)")
    if not data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        kind = "a single .npy array" if data.startswith(b"\x93NUMPY") else f"{data[:8]!r}..."
        raise ValueError(f"invalid .npz tensor bundle: expected a zip archive, got {kind}")
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("got a single .npy array, expected an .npz bundle of named tensors")
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except ValueError as exc:
        raise ValueError(f"invalid .npz tensor bundle: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"invalid .npz tensor bundle: {type(exc).__name__}: {exc}") from exc


encode_inputs = encode_tensors
decode_inputs = decode_tensors
