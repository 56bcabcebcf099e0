"""One node-wide budget for the request bodies held in memory at the same time.

Each route bounds its own body (64 MiB on POST /rpc, 1 MiB on REST, 16 MiB per
WebSocket message), but a per-request limit alone lets many concurrent uploads
add up to any amount of memory. Every body is therefore charged to one shared
`BodyBudget` while it is read and handled: a declared Content-Length is reserved
before the first byte is read, a chunked body grows its reservation chunk by
chunk, and a WebSocket message is charged when it arrives. A request that does
not fit waits briefly for others to finish, then is refused with `BUSY`
(HTTP 503 + Retry-After), without the node reading the rest of its body.

The budget counts body bytes; what a handler derives from them (the parsed
JSON, a decoded base64 blob) is a small multiple of that, so the memory the
node spends on uploads stays a small multiple of the budget too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from protocol.errors import ErrorCode, MeshrunError

DEFAULT_BODY_BUDGET_BYTES = 256 * 1024 * 1024
DEFAULT_BUDGET_WAIT_SECONDS = 2.0
BUSY_RETRY_AFTER_SECONDS = 1


def busy(message: str, details: dict[str, object] | None = None) -> MeshrunError:
    return MeshrunError(
        ErrorCode.BUSY,
        message,
        {**(details or {}), "retry_after": BUSY_RETRY_AFTER_SECONDS},
    )


class BodyBudget:
    """Bytes of request bodies the node holds at once, shared by every route."""

    def __init__(
        self,
        total_bytes: int = DEFAULT_BODY_BUDGET_BYTES,
        *,
        wait_seconds: float = DEFAULT_BUDGET_WAIT_SECONDS,
    ) -> None:
        if total_bytes < 1:
            raise ValueError("the body budget must be at least 1 byte")
        if not wait_seconds >= 0 or math.isinf(wait_seconds):
            raise ValueError("the budget wait must be a finite number of seconds >= 0")
        self.total_bytes = total_bytes
        self.wait_seconds = wait_seconds
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    @contextmanager
    def hold(self) -> Iterator[Hold]:
        """A reservation that grows with the body and is given back on exit."""
        held = Hold(self)
        try:
            yield held
        finally:
            held.release()

    async def _take(self, nbytes: int) -> None:
        if nbytes > self.total_bytes:
            raise busy(
                f"this request needs {nbytes} bytes of body memory, more than the node's "
                f"whole budget of {self.total_bytes}",
                {"body_budget_bytes": self.total_bytes},
            )
        if self.used + nbytes <= self.total_bytes:
            self.used += nbytes
            return
        with trio.move_on_after(self.wait_seconds):
            while self.used + nbytes > self.total_bytes:
                await self._lot.park()
            self.used += nbytes
            return
        raise busy(
            f"the node is already holding {self.used} bytes of request bodies (its budget "
            f"is {self.total_bytes}); retry in {BUSY_RETRY_AFTER_SECONDS} s",
            {"body_budget_bytes": self.total_bytes},
        )

    def _give(self, nbytes: int) -> None:
        self.used -= nbytes
        self._lot.unpark_all()


class Hold:
    """One request's share of a `BodyBudget`."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.bytes = 0

    async def reserve_to(self, size: int) -> None:
        """Grow the reservation to `size` bytes (never shrinks it); raises BUSY
        when the budget stays full for longer than its wait."""
        extra = size - self.bytes
        if extra > 0:
            await self.budget._take(extra)
            self.bytes += extra

    def release(self) -> None:
        if self.bytes:
            self.budget._give(self.bytes)
            self.bytes = 0
