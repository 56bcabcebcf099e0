"""How a node's flags and devices become slots, and what each slot's pool is given."""

from __future__ import annotations

import pytest

from node.executor.memory import DEFAULT_CAP, MIN_JOB_MEMORY, physical_memory
from node.executor.providers import CPU, CUDA, TENSORRT
from node.executor.slots import Slots, cpu_threads, plan_slots, slot_memory

GPUS = [{"index": 0, "name": "H100"}, {"index": 1, "name": "H100"}]
GPU_PROVIDERS = [TENSORRT, CUDA, CPU]


def names(slots: list) -> list[str]:
    return [s.name for s in slots]


def test_a_cpu_only_node_gets_one_cpu_slot_by_default() -> None:
    assert names(plan_slots(None, None, [], [CPU])) == ["cpu:0"]
    assert names(plan_slots(None, 3, [], [CPU])) == ["cpu:0", "cpu:1", "cpu:2"]


def test_a_gpu_node_offers_every_gpu_and_no_cpu_slot_by_default() -> None:
    slots = plan_slots(None, None, GPUS, GPU_PROVIDERS)
    assert names(slots) == ["cuda:0", "cuda:1"]
    assert [(s.kind, s.device_id) for s in slots] == [("cuda", 0), ("cuda", 1)]
    assert names(plan_slots(None, 2, GPUS, GPU_PROVIDERS)) == [
        "cuda:0",
        "cuda:1",
        "cpu:0",
        "cpu:1",
    ]


def test_devices_choose_which_gpus() -> None:
    assert names(plan_slots(["cuda:1"], None, GPUS, GPU_PROVIDERS)) == ["cuda:1"]
    assert names(plan_slots(["1,0", "cuda:1"], None, GPUS, GPU_PROVIDERS)) == ["cuda:1", "cuda:0"]
    assert names(plan_slots(["none"], None, GPUS, GPU_PROVIDERS)) == ["cpu:0"]
    assert names(plan_slots(["all"], 0, GPUS, GPU_PROVIDERS)) == ["cuda:0", "cuda:1"]


def test_gpus_whose_cuda_does_not_work_are_not_offered() -> None:
    # nvidia-smi sees them, but onnxruntime's CUDA provider failed the probe.
    assert names(plan_slots(None, None, GPUS, [CPU])) == ["cpu:0"]


@pytest.mark.parametrize(
    ("devices", "cpu_slots", "gpus", "providers", "says"),
    [
        (["cuda:7"], None, GPUS, GPU_PROVIDERS, "this node has cuda:0, cuda:1"),
        (["cuda:0"], None, [], [CPU], "CUDA does not work"),
        (["tpu"], None, GPUS, GPU_PROVIDERS, "unknown device 'tpu'"),
        (["none"], 0, GPUS, GPU_PROVIDERS, "no execution slot"),
        (None, -1, [], [CPU], "cpu_slots must be >= 0"),
    ],
)
def test_impossible_flags_say_why(
    devices: list[str] | None, cpu_slots: int | None, gpus: list, providers: list, says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        plan_slots(devices, cpu_slots, gpus, providers)


def test_each_slot_gets_a_fair_share() -> None:
    assert slot_memory(1 << 30, 8) == 1 << 30  # the operator's limit is kept as given
    ram = physical_memory()
    for slots in (1, 2, 3, 64):
        share = slot_memory(None, slots)
        assert MIN_JOB_MEMORY <= share <= DEFAULT_CAP
        if ram is not None:
            assert share * slots <= max(ram // 2, MIN_JOB_MEMORY * slots)
    assert cpu_threads(4, 3) == 4
    assert cpu_threads(None, 1) is None
    assert cpu_threads(None, 2) is not None and cpu_threads(None, 2) >= 1


def test_slots_build_one_pool_per_slot_pinned_to_its_device() -> None:
    plan = plan_slots(None, 1, GPUS, GPU_PROVIDERS)
    slots = Slots(plan, GPU_PROVIDERS)
    assert list(slots.pools) == ["cuda:0", "cuda:1", "cpu:0"]
    assert slots["cuda:1"]._device_id == 1
    assert slots["cuda:0"].providers == [TENSORRT, CUDA, CPU]
    assert slots["cpu:0"].providers == [CPU]
    assert slots.providers == [TENSORRT, CUDA, CPU]
    assert slots.max_job_memory == slot_memory(None, 3)
