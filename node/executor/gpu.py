"""NVML sampling of the GPU a worker runs on: utilisation and memory during one job.

While a job runs on a GPU provider (CUDA or TensorRT), the pool samples the
worker's device every ``POLL_S`` seconds, the cadence of its memory watch, and
puts what it saw into the job's ``resources`` (and so into the signed receipt):

- ``gpu_util_pct_max``, ``gpu_util_pct_mean``: NVML's utilisation rate, the share
  of the driver's last sample period (1/6 s to 1 s) in which a kernel ran;
- ``gpu_mem_bytes_max``: the device's used memory at its peak during the job;
- ``gpu_worker_mem_bytes_max``: the worker process's own device memory, where
  NVML lists it (inside some containers it does not see the worker's PID);
- ``gpu_samples``, ``gpu_index``: how many samples, on which NVML device.

Utilisation and used memory are the device's, not the job's: another process
on the same GPU counts too. A job shorter than one sample still gets one
reading, taken just after it ends (utilisation covers the driver's last period).

NVML comes from the ``pynvml`` module of the small, pure-Python ``nvidia-ml-py``
package, imported only when a job asks for a GPU. Without it, without the
driver's ``libnvidia-ml`` or without the device, the sampler is simply absent
and the job's resources hold no GPU figures: no error, one debug line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from node.executor.providers import CUDA, TENSORRT

log = logging.getLogger(__name__)

GPU_PROVIDERS = frozenset({CUDA, TENSORRT})
"""A job whose provider chain starts with one of these runs on the GPU."""

_lock = threading.Lock()
# None: not tried yet; False: NVML is not usable in this process (never retried).
_nvml: Any = None
_handles: dict[int | str, Any] = {}


@dataclass
class GpuStats:
    """The samples of one job, and the figures they add up to (pure: no NVML here)."""

    index: int | str | None = None
    util_pct: list[float] = field(default_factory=list)
    mem_bytes: list[int] = field(default_factory=list)
    worker_mem_bytes: list[int] = field(default_factory=list)
    samples: int = 0

    def add(self, util_pct: float | None, mem_bytes: int | None, worker_mem: int | None) -> None:
        """One sample; any field NVML could not read is None and left out."""
        if util_pct is None and mem_bytes is None and worker_mem is None:
            return
        self.samples += 1
        if util_pct is not None:
            self.util_pct.append(float(util_pct))
        if mem_bytes is not None:
            self.mem_bytes.append(int(mem_bytes))
        if worker_mem is not None:
            self.worker_mem_bytes.append(int(worker_mem))

    def resources(self) -> dict[str, float]:
        """The figures for the job's ``resources``: floats only; empty with no sample."""
        if not self.samples:
            return {}
        out: dict[str, float] = {"gpu_samples": float(self.samples)}
        if isinstance(self.index, int):
            out["gpu_index"] = float(self.index)
        if self.util_pct:
            out["gpu_util_pct_max"] = round(max(self.util_pct), 1)
            out["gpu_util_pct_mean"] = round(sum(self.util_pct) / len(self.util_pct), 1)
        if self.mem_bytes:
            out["gpu_mem_bytes_max"] = float(max(self.mem_bytes))
        if self.worker_mem_bytes:
            out["gpu_worker_mem_bytes_max"] = float(max(self.worker_mem_bytes))
        return out


def nvml_device(device_id: int, visible: str | None) -> int | str | None:
    """The NVML device (index, or UUID) behind CUDA device ``device_id``.

    NVML numbers every GPU of the machine and ignores ``CUDA_VISIBLE_DEVICES``,
    which renumbers the ones CUDA sees: with ``CUDA_VISIBLE_DEVICES=2,3`` CUDA's
    device 0 is NVML's 2. Entries may also be UUIDs (``GPU-…``, ``MIG-…``).
    None when the variable hides the device (empty, ``-1``, too short a list).
    """
    if visible is None:
        return device_id
    devices: list[int | str] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            devices.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")):
            devices.append(entry)
        else:
            break  # CUDA stops reading the list at its first invalid entry ("-1", "")
    return devices[device_id] if 0 <= device_id < len(devices) else None


def _load_nvml() -> Any:
    """The initialised ``pynvml`` module, or None where NVML cannot be used."""
    global _nvml
    if _nvml is None:
        try:
            with warnings.catch_warnings():
                # The old `pynvml` wrapper package warns on import; the module is the same.
                warnings.simplefilter("ignore")
                import pynvml
            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded…
            log.debug("no GPU figures for jobs: NVML is not usable here (%s)", exc)
            _nvml = False
    return _nvml or None


class GpuDevice:
    """One NVML device handle; ``sample`` reads it (blocking, well under a millisecond)."""

    def __init__(self, nvml: Any, handle: Any, index: int | str) -> None:
        self._nvml = nvml
        self._handle = handle
        self.index = index

    def sample(self, pid: int) -> tuple[float | None, int | None, int | None]:
        nvml, handle = self._nvml, self._handle
        util: float | None = None
        used: int | None = None
        worker: int | None = None
        # Each read may be NotSupported (MIG slices, some vGPUs): it is then left out.
        with contextlib.suppress(Exception):
            util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        with contextlib.suppress(Exception):
            used = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        with contextlib.suppress(Exception):
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                memory = getattr(proc, "usedGpuMemory", None)
                if proc.pid == pid and isinstance(memory, int):
                    worker = memory
        return util, used, worker


def open_device(device_id: int) -> GpuDevice | None:
    """The NVML device CUDA calls ``device_id`` in this process's environment, or None."""
    target = nvml_device(device_id, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if target is None:
        return None
    with _lock:
        nvml = _load_nvml()
        if nvml is None:
            return None
        handle = _handles.get(target)
        if handle is None:
            try:
                if isinstance(target, int):
                    handle = nvml.nvmlDeviceGetHandleByIndex(target)
                else:
                    handle = nvml.nvmlDeviceGetHandleByUUID(target)
            except Exception as exc:
                log.debug("no GPU figures: NVML has no device %r (%s)", target, exc)
                return None
            _handles[target] = handle
    return GpuDevice(nvml, handle, target)


class GpuSampler:
    """Samples one device for one job; thread-safe, since samples run in worker threads."""

    def __init__(self, device: GpuDevice, pid: int) -> None:
        self.device = device
        self.pid = pid
        self.stats = GpuStats(index=device.index)
        self._lock = threading.Lock()

    def sample(self) -> None:
        reading = self.device.sample(self.pid)
        with self._lock:
            self.stats.add(*reading)

    def resources(self) -> dict[str, float]:
        with self._lock:
            return self.stats.resources()


def runs_on_gpu(providers: Sequence[str]) -> bool:
    return bool(providers) and providers[0] in GPU_PROVIDERS


def sampler_for(providers: Sequence[str], device_id: int, pid: int) -> GpuSampler | None:
    """A sampler for a job run with ``providers`` by worker ``pid``; None off the GPU."""
    if not runs_on_gpu(providers):
        return None
    device = open_device(device_id)
    return None if device is None else GpuSampler(device, pid)
