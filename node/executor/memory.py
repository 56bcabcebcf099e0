"""How much memory one job may use, and how the node measures what a worker uses.

The limit is enforced from outside the worker: the pool reads the worker's
resident set size from /proc every ``POLL_S`` seconds and kills it past the
limit. An rlimit inside the worker (RLIMIT_AS or RLIMIT_DATA) was measured and
rejected: they count virtual reservations, and onnxruntime reserves a thread
stack per intra-op thread per session (64 threads: +1.4 GB VmSize, +510 MB
VmData at 96 MB resident), so the limit a node can live with depends on its core
count, and under a limit those reservations do not fit, session creation hangs
instead of failing (CUDA also reserves tens of GB of address space at start).
Resident memory is what a hostile job takes from the machine, so that is
what is counted.
"""

from __future__ import annotations

import os

DEFAULT_CAP = 4 * 1024**3
"""The default per-job limit: 4 GiB, or half of the machine's RAM if that is less."""

MIN_JOB_MEMORY = 128 * 1024**2
"""A worker holds ~100 MB resident just to have onnxruntime loaded."""

POLL_S = 0.05
"""Seconds between two samples of a worker's resident memory while it starts or runs a job."""

IDLE_POLL_S = 1.0
"""Seconds between two samples of an idle worker's (it allocates nothing between jobs)."""

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def physical_memory() -> int | None:
    """Bytes of RAM in this machine, or None where the OS will not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def default_max_job_memory() -> int:
    ram = physical_memory()
    return DEFAULT_CAP if ram is None else max(MIN_JOB_MEMORY, min(DEFAULT_CAP, ram // 2))


def check_job_memory(limit: int) -> int:
    if limit < MIN_JOB_MEMORY:
        raise ValueError(
            f"a job memory limit of {limit} bytes is below the {MIN_JOB_MEMORY >> 20} MiB "
            "a worker needs to load onnxruntime"
        )
    return limit


def rss_bytes(pid: int) -> int | None:
    """The resident set size of process ``pid``, or None if it is gone (or no /proc)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            fields = statm.read().split()
        return int(fields[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None
