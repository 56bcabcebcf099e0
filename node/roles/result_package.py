"""The result package a compute node publishes for a finished job.

A UnixFS directory, so its root CID names the whole result on any IPFS node:
  output.json        job metadata, status and an index of output tensors
  outputs/<name>.npy one file per output tensor
  logs/stdout.log, logs/stderr.log
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np

OUTPUT_INDEX = "output.json"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)  # type: ignore[no-any-return]


def build_files(
    job_id: str,
    outputs: dict[str, np.ndarray],
    metadata: dict[str, Any],
    stdout: str = "",
    stderr: str = "",
    status: str = "completed",
) -> tuple[dict[str, bytes], dict[str, str]]:
    """Files of the package and the sha256 of each output file (for the receipt)."""
    files: dict[str, bytes] = {}
    digests: dict[str, str] = {}
    index = []
    for name in sorted(outputs):
        array = outputs[name]
        path = f"outputs/{_safe_name(name)}.npy"
        data = npy_bytes(array)
        files[path] = data
        digests[path] = hashlib.sha256(data).hexdigest()
        index.append(
            {
                "name": name,
                "path": path,
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "sha256": digests[path],
            }
        )
    files["logs/stdout.log"] = stdout.encode()
    files["logs/stderr.log"] = stderr.encode()
    document = {"job_id": job_id, "status": status, "outputs": index, **metadata}
    files[OUTPUT_INDEX] = json.dumps(document, indent=2, sort_keys=True).encode()
    return files, digests


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "output"
