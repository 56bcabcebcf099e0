"""The execution slots of a compute node: one worker per device it offers.

A machine with four GPUs should earn like four machines, so each CUDA device
gets its own :class:`ExecutorPool` (its own worker process and session cache,
pinned to that device id), and ``cpu_slots`` adds CPU workers that split the
cores between them. Which job runs on which slot is decided in
``protocol/capacity.py``; this module only turns the node's devices and flags
into slots and owns the pools' lifetimes.

Memory: every slot's worker is held to its own per-job limit, so unless the
operator gives one, the default limit is shared out (half the RAM divided by
the slots, at most 4 GiB each) and N busy slots cannot take more than half
the machine between them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

from node.executor.memory import DEFAULT_CAP, MIN_JOB_MEMORY, physical_memory
from node.executor.pool import ExecutorPool
from node.executor.providers import CPU, CUDA, TENSORRT
from protocol.capacity import Slot

_CUDA_DEVICE = re.compile(r"^(?:cuda:)?(\d{1,3})$")


def plan_slots(
    devices: Sequence[str] | None,
    cpu_slots: int | None,
    gpus: Sequence[Mapping[str, Any]],
    providers: Sequence[str],
) -> list[Slot]:
    """The slots a node offers, from its flags and what it found.

    ``devices`` names CUDA devices (``cuda:0`` or ``0``, ``all``, or ``none``);
    None means every GPU found when CUDA works here. ``cpu_slots`` None means
    one CPU slot when there is no GPU slot, else none: a GPU node's cores feed
    its GPUs. Raises ValueError with the reason when the flags ask for what the
    machine does not have.
    """
    cuda_works = CUDA in providers or TENSORRT in providers
    found = sorted(int(g["index"]) for g in gpus if isinstance(g.get("index"), int))
    wanted: list[int] = []
    for raw in devices if devices is not None else (["all"] if cuda_works else []):
        for name in (part.strip().lower() for part in raw.split(",")):
            if name in ("", "none"):
                continue
            if name == "all":
                wanted += found if cuda_works else []
                continue
            match = _CUDA_DEVICE.match(name)
            if match is None:
                raise ValueError(f"unknown device {name!r}: use cuda:N, all or none")
            index = int(match.group(1))
            if not cuda_works:
                raise ValueError(f"device {name} asked for, but CUDA does not work on this node")
            if index not in found:
                have = ", ".join(f"cuda:{i}" for i in found) or "none"
                raise ValueError(f"device {name} asked for; this node has {have}")
            wanted.append(index)
    slots = [Slot(f"cuda:{i}", "cuda", i) for i in dict.fromkeys(wanted)]
    if cpu_slots is None:
        cpu_slots = 0 if slots else 1
    if cpu_slots < 0:
        raise ValueError("cpu_slots must be >= 0")
    slots += [Slot(f"cpu:{i}", "cpu", i) for i in range(cpu_slots)]
    if not slots:
        raise ValueError("no execution slot: name a device or give --cpu-slots of at least 1")
    return slots


def slot_memory(max_job_memory: int | None, slots: int) -> int:
    """The per-job memory limit each slot's worker is held to."""
    if max_job_memory is not None:
        return max_job_memory
    ram = physical_memory()
    share = DEFAULT_CAP if ram is None else ram // 2 // max(slots, 1)
    return max(MIN_JOB_MEMORY, min(DEFAULT_CAP, share))


def cpu_threads(threads: int | None, cpu_slots: int) -> int | None:
    """A CPU slot's fair share of the cores (None leaves onnxruntime's default to one slot)."""
    if threads is not None:
        return threads
    if cpu_slots <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // cpu_slots)


class Slots:
    """The pools of a compute node, by slot name, entered and left together."""

    def __init__(
        self,
        slots: Sequence[Slot],
        providers: Sequence[str],
        *,
        threads: int | None = None,
        max_job_memory: int | None = None,
    ) -> None:
        self.slots = tuple(slots)
        cpu_count = sum(1 for s in self.slots if s.kind == "cpu")
        memory = slot_memory(max_job_memory, len(self.slots))
        gpu_providers = [p for p in providers if p in (TENSORRT, CUDA)] + [CPU]
        self.pools: dict[str, ExecutorPool] = {}
        for slot in self.slots:
            if slot.kind == "cuda":
                pool = ExecutorPool(
                    providers=gpu_providers,
                    threads=threads,
                    device_id=slot.device_id,
                    max_job_memory=memory,
                )
            else:
                pool = ExecutorPool(
                    providers=[CPU],
                    threads=cpu_threads(threads, cpu_count),
                    max_job_memory=memory,
                )
            self.pools[slot.name] = pool
        self._stack: AsyncExitStack | None = None

    def __getitem__(self, name: str) -> ExecutorPool:
        return self.pools[name]

    @property
    def providers(self) -> list[str]:
        """Every provider some slot runs, in the order of preference."""
        seen: dict[str, None] = {}
        for pool in self.pools.values():
            seen.update(dict.fromkeys(pool.providers))
        return list(seen)

    @property
    def max_job_memory(self) -> int:
        return max(pool.max_job_memory for pool in self.pools.values())

    async def __aenter__(self) -> Slots:
        stack = AsyncExitStack()
        try:
            for pool in self.pools.values():
                await stack.enter_async_context(pool)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._stack is not None
        stack, self._stack = self._stack, None
        return await stack.__aexit__(exc_type, exc, tb)

    async def start(self) -> None:
        """Start every worker now, so no first job pays for it."""
        for pool in self.pools.values():
            await pool.start()
