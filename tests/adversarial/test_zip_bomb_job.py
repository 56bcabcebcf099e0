"""A zip-bomb input submitted as a real job, across real node processes.

The bundle is 8 MiB on the wire and declares 8 GiB of tensors. The compute
node must refuse it from the members' headers, before loading anything: the
job fails with INPUT_TOO_LARGE (a clear code, not retried: every node would
refuse the same bytes), the compute node stays up and grows by less than
64 MiB, and the next ordinary job completes.
"""

from __future__ import annotations

import pytest

from node.dev.devstack import Devstack
from node.dev.models import build_mlp
from tests.adversarial.bombs import zip_bomb
from tests.adversarial.stack_helpers import MiB_KB, run_job, vmrss_kb

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

BOUND_MIB = 64


def test_a_zip_bomb_job_fails_clearly_and_costs_the_executor_little(
    adversarial_stack: Devstack,
) -> None:
    stack = adversarial_stack
    executor = stack.honest_nodes[0]
    before = vmrss_kb(executor.process.pid)
    with stack.requester.client(timeout=120) as client:
        model = client.storage_add(build_mlp())
        inputs = client.storage_add(zip_bomb(2048, members=4))
        job = client.submit_job(model, inputs, timeout_seconds=60)
        done = client.wait_for_job(job["job_id"], timeout=90)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "INPUT_TOO_LARGE", done["error"]
    assert done["retry_count"] == 0
    assert executor.process.poll() is None and stack.requester.process.poll() is None
    grown = (vmrss_kb(executor.process.pid) - before) / MiB_KB
    assert grown < BOUND_MIB, f"the executor grew {grown:.0f} MiB refusing a zip bomb"
    assert run_job(stack)["status"] == "completed"
