"""What the RPC methods need from the node they serve.

The composition root (:class:`node.service.Node`) builds the registry and
passes itself in; the methods only see this narrow view of it, so the api room
never imports the module that imports it.
"""

from __future__ import annotations

from typing import Any, Protocol

from node.roles.context import NodeContext
from node.roles.requester import Requester


class ServedNode(Protocol):
    @property
    def ctx(self) -> NodeContext: ...

    @property
    def mode(self) -> str: ...

    @property
    def requester(self) -> Requester | None: ...

    def info(self) -> dict[str, Any]: ...

    def peers(self, limit: int = 100, role: str | None = None) -> dict[str, Any]: ...
