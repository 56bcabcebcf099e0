"""The Python SDK for a meshrun node's JSON-RPC API: the public import path.

    from node.client import Client, AsyncClient, discover

`Client` (blocking) and `AsyncClient` (trio or asyncio) offer the same methods,
one per RPC method, each returning a typed model (node/sdk/models.py) that still
reads like the dict the SDK used to return. Errors come back as `RpcError`
carrying the same `ErrorCode` names the node uses, so scripts and the CLI branch
on `err.code`, never on message text. The implementation lives in node/sdk/.
"""

from __future__ import annotations

from node.sdk import models
from node.sdk.clients import DEFAULT_TIMEOUT, AsyncClient, Client
from node.sdk.core import RetryPolicy
from node.sdk.discovery import (
    DEFAULT_RPC_URL,
    NODE_FILE,
    TOKEN_FILE,
    NodeEndpoint,
    discover,
    read_node_file,
    read_token_file,
)
from node.sdk.errors import RpcError
from node.sdk.models import *  # noqa: F403  (the result models, listed in its __all__)
from protocol.jobstate import TERMINAL, JobStatus

TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL)

# The default retry decision as a function, as earlier versions had it.
_rate_limit_pause = RetryPolicy().rate_limit_pause

__all__ = [
    "DEFAULT_RPC_URL",
    "DEFAULT_TIMEOUT",
    "NODE_FILE",
    "TERMINAL_STATUSES",
    "TOKEN_FILE",
    "AsyncClient",
    "Client",
    "JobStatus",
    "NodeEndpoint",
    "RetryPolicy",
    "RpcError",
    "discover",
    "read_node_file",
    "read_token_file",
]
__all__ += models.__all__
