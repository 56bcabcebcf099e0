"""Shared helpers for multi-process lifecycle tests."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from node.client import Client
from node.dev.models import build_mlp, build_spin_model, make_inputs
from node.executor.tensors import encode_tensors

ITERATIONS_PER_SECOND = 300_000  # measured: ~3 µs per Loop step of the spin model on CPU


def submit_mlp(client: Client, **kw: Any) -> dict[str, Any]:
    model_cid = client.storage_add(build_mlp(seed=kw.pop("seed", 1)))
    inputs_cid = client.storage_add(encode_tensors(make_inputs(batch=4)))
    return dict(client.call("job.submit", model_cid=model_cid, inputs_cid=inputs_cid, **kw))


def submit_spin(client: Client, seconds: float, **kw: Any) -> dict[str, Any]:
    """A job whose model runs for roughly `seconds` on a CPU executor."""
    model_cid = client.storage_add(build_spin_model())
    inputs = {
        "x": np.ones((1, 4), np.float32),
        "iterations": np.array(int(seconds * ITERATIONS_PER_SECOND), np.int64),
    }
    inputs_cid = client.storage_add(encode_tensors(inputs))
    return dict(client.call("job.submit", model_cid=model_cid, inputs_cid=inputs_cid, **kw))


def wait_status(client: Client, job_id: str, statuses: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_job(job_id)
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job['status']}, wanted {statuses}"
        time.sleep(0.05)


def event_types(client: Client, job_id: str) -> list[str]:
    return [e["type"] for e in client.call("job.events", job_id=job_id)["events"]]
