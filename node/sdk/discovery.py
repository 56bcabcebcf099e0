"""Finding a node and its token: node.json and rpc.token in a data dir, the
environment, the default port. The same rules as the CLI's."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from node.sdk.errors import RpcError
from protocol.errors import ErrorCode

DEFAULT_RPC_URL = "http://127.0.0.1:7780/rpc"
NODE_FILE = "node.json"
TOKEN_FILE = "rpc.token"  # node.api.auth.TOKEN_FILE; kept here so the SDK stays server-free


@dataclass(frozen=True)
class NodeEndpoint:
    """Where a node's RPC is and the token it wants (None: none found)."""

    url: str
    token: str | None = None
    node_file: Path | None = None


def read_token_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def read_node_file(data_dir: Path | str) -> NodeEndpoint:
    """The endpoint a running node advertises in its data dir (node.json + rpc.token).

    Read fresh every time: the node writes a new token at each start.
    """
    path = Path(data_dir).expanduser()
    if path.is_dir() or path.name != NODE_FILE:
        path = path / NODE_FILE
    try:
        info = json.loads(path.read_text())
        url = str(info["rpc_url"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RpcError(
            ErrorCode.NODE_UNREACHABLE,
            f"no usable {NODE_FILE} at {path} ({exc.__class__.__name__}); is a node running "
            "with this --data-dir?",
            {"node_file": str(path)},
        ) from None
    token_file = Path(info.get("token_file") or path.parent / TOKEN_FILE)
    return NodeEndpoint(url, read_token_file(token_file), path)


def _same_endpoint(a: str, b: str) -> bool:
    def key(url: str) -> tuple[str, int | None, str]:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = "127.0.0.1" if host == "localhost" else host
        return host, parts.port, parts.path.rstrip("/")

    try:
        return key(a) == key(b)
    except ValueError:
        return False


def discover(
    url: str | None = None,
    token: str | None = None,
    *,
    data_dirs: Sequence[Path | str] = (),
    env: Mapping[str, str] | None = None,
) -> NodeEndpoint:
    """Find a node and its token the way the CLI does.

    URL: `url`, then $MESHRUN_RPC, then the first node.json in `data_dirs`, then
    the default port. Token: `token`, then $MESHRUN_TOKEN, then the rpc.token of
    the node.json whose rpc_url is the URL chosen.
    """
    env = os.environ if env is None else env
    url = url or env.get("MESHRUN_RPC") or None
    token = token or env.get("MESHRUN_TOKEN") or None
    found: list[NodeEndpoint] = []
    for data_dir in data_dirs:
        try:
            found.append(read_node_file(data_dir))
        except RpcError:
            continue
    if url is None:
        if found:
            first = found[0]
            return NodeEndpoint(first.url, token or first.token, first.node_file)
        url = DEFAULT_RPC_URL
    if token is None:
        for endpoint in found:
            if _same_endpoint(endpoint.url, url):
                return NodeEndpoint(url, endpoint.token, endpoint.node_file)
    return NodeEndpoint(url, token)


__all__ = [
    "DEFAULT_RPC_URL",
    "NODE_FILE",
    "TOKEN_FILE",
    "NodeEndpoint",
    "discover",
    "read_node_file",
    "read_token_file",
]
