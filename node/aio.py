"""Small trio helpers that every room of the node may use (the lowest layer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


async def inline_if_small(size: int, limit: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on the event loop when `size` is at most `limit`, else on a worker
    thread: for a few KiB the thread's hand-off costs more than the work."""
    if size <= limit:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


__all__ = ["inline_if_small"]
