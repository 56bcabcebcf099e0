"""Which onnxruntime execution providers really work on this machine.

onnxruntime-gpu lists CUDA and TensorRT as *available* even on a box without a
GPU, then logs an error for every session that asks for them. So
availability is established by building a session on a tiny model and reading
back ``get_providers()``. The probe runs in a child interpreter with its output
captured: onnxruntime writes part of its complaints from C++ straight to the
file descriptors and part with Python ``print`` to stdout, so no amount of
in-process logger configuration keeps a CPU node's start quiet. The child also
keeps a CUDA context out of the node process, which never runs a model itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PREFERENCE = (TENSORRT, CUDA, CPU)
ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "gpu": CUDA, "cpu": CPU}

# onnx >= 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses: every model
# meshrun builds (the probe model here, the synthetic ones in node.dev.models)
# declares IR 8 and opset 17.
IR_VERSION = 8
OPSET = 17

_MARKER = "MESHRUN_PROBE_RESULT "
_PROBE_TIMEOUT_S = 180.0
_lock = threading.Lock()
_cached: list[str] | None = None


def normalize_provider(name: str) -> str:
    """Accept the JobSpec's short names (``cuda``) as well as onnxruntime's."""
    canonical = ALIASES.get(name.strip().lower())
    if canonical is not None:
        return canonical
    for full in PREFERENCE:
        if name.strip().lower() == full.lower():
            return full
    raise ValueError(f"unknown execution provider {name!r} (known: {', '.join(PREFERENCE)})")


def project_root() -> Path:
    """Directory holding the ``node`` package, for child interpreters' PYTHONPATH.

    meshrun is often run from a checkout without being installed; children
    started with ``-m node...`` must still find it.
    """
    return Path(__file__).resolve().parents[2]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(project_root())
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not existing else root + os.pathsep + existing
    return env


def probe_providers(refresh: bool = False) -> list[str]:
    """Working providers, best first; always ends with CPU.

    Cached for the life of the process because a TensorRT probe can take
    seconds, and the answer does not change while the node runs.
    """
    global _cached
    with _lock:
        if _cached is None or refresh:
            _cached = _probe_in_child()
        return list(_cached)


def _probe_in_child() -> list[str]:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "node.executor.providers"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_PROBE_TIMEOUT_S,
            env=child_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("provider probe failed (%s); using CPU only", exc)
        return [CPU]
    stdout = proc.stdout.decode("utf-8", "replace")
    for line in reversed(stdout.splitlines()):
        if line.startswith(_MARKER):
            found = json.loads(line[len(_MARKER) :])
            break
    else:
        log.warning(
            "provider probe exited with %s and no result; using CPU only: %s",
            proc.returncode,
            proc.stderr.decode("utf-8", "replace")[-2000:],
        )
        return [CPU]
    log.debug("provider probe output: %s", proc.stderr.decode("utf-8", "replace")[-2000:])
    working = [p for p in PREFERENCE if p in found]
    return working if CPU in working else [*working, CPU]


def _probe_in_this_process() -> list[str]:
    import numpy as np
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    model = _probe_model()
    x = {"x": np.zeros((1, 2), dtype=np.float32)}
    available = set(ort.get_available_providers())
    working: list[str] = []
    for provider in PREFERENCE:
        if provider not in available:
            continue
        options = ort.SessionOptions()
        options.log_severity_level = 4
        try:
            session = ort.InferenceSession(model, options, providers=[provider])
            if session.get_providers()[:1] != [provider]:
                continue
            session.run(None, x)
        except Exception:
            continue
        working.append(provider)
    return working


def _probe_model() -> bytes:
    """The smallest real model: one Gemm, ``y = x @ w + b``, two features in, one out."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])],
        "meshrun_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(np.ones((2, 1), dtype=np.float32), "w"),
            numpy_helper.from_array(np.zeros(1, dtype=np.float32), "b"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="meshrun.probe"
    )
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def describe_devices() -> dict[str, Any]:
    """What a compute node advertises in its bids and ``node.info``."""
    info: dict[str, Any] = {
        "providers": probe_providers(),
        "cpu_count": os.cpu_count() or 1,
        "ram_bytes": _total_ram(),
        "gpus": _gpus(),
    }
    return info


def _total_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[dict[str, Any]]:
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                timeout=10,
                check=True,
            ).stdout.decode()
            found: list[dict[str, Any]] = []
            for line in out.strip().splitlines():
                index, name, mib = (part.strip() for part in line.split(","))
                found.append({"index": int(index), "name": name, "vram_bytes": int(mib) << 20})
            return found
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        try:
            gpus: list[dict[str, Any]] = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                raw = pynvml.nvmlDeviceGetName(handle)
                gpus.append(
                    {
                        "index": i,
                        "name": raw.decode() if isinstance(raw, bytes) else str(raw),
                        "vram_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    }
                )
            return gpus
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return []


if __name__ == "__main__":
    print(_MARKER + json.dumps(_probe_in_this_process()), flush=True)
