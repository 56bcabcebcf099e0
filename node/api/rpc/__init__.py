"""JSON-RPC 2.0 for a node's local clients (the SDK, the CLI)."""

from .registry import Method, NoParams, Registry
from .server import DEFAULT_MAX_BODY_BYTES, RpcServer

__all__ = ["DEFAULT_MAX_BODY_BYTES", "Method", "NoParams", "Registry", "RpcServer"]
