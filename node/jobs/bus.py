"""In-process fan-out of job events to live subscribers (WebSocket, SSE, job.wait).

The job database is the record; this is only the doorbell. A slow subscriber
must never stall the node, so each gets a bounded buffer and is dropped (its
channel closed) when it falls behind; it can resync from `job.events`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger("meshrun.bus")


@dataclass(eq=False)
class _Subscriber:
    job_ids: frozenset[str] | None
    send: trio.MemorySendChannel[dict[str, Any]]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[_Subscriber] = set()

    def publish(self, event: dict[str, Any]) -> None:
        """Deliver without waiting: called from synchronous code (the job database)."""
        for sub in list(self._subscribers):
            if sub.job_ids is not None and event.get("job_id") not in sub.job_ids:
                continue
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                log.info("dropping a slow event subscriber")
                self._subscribers.discard(sub)
                sub.send.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(sub)

    @contextmanager
    def subscribe(
        self, job_ids: set[str] | None = None, buffer: int = 1024
    ) -> Iterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """Events for `job_ids` (all jobs when None) until the block exits."""
        send, receive = trio.open_memory_channel[dict[str, Any]](buffer)
        sub = _Subscriber(frozenset(job_ids) if job_ids is not None else None, send)
        self._subscribers.add(sub)
        try:
            yield receive
        finally:
            self._subscribers.discard(sub)
            send.close()
            receive.close()
