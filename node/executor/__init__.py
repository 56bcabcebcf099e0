"""Model execution for compute nodes: provider probing and isolated worker processes."""

from node.executor.pool import ExecutionResult, ExecutorPool
from node.executor.providers import describe_devices, normalize_provider, probe_providers

__all__ = [
    "ExecutionResult",
    "ExecutorPool",
    "describe_devices",
    "normalize_provider",
    "probe_providers",
]
