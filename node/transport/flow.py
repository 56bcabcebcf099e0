"""Yamux receive-window credit the way go-yamux gives it: once half the window is used.

py-libp2p 0.8.1's ``YamuxStream._auto_tune_and_send_window_update`` runs after
every ``read()`` of a stream and, for a read smaller than half the window (every
read of a job message), sends a WINDOW_UPDATE frame crediting just what was
read: its "partial slack" branch and ``PY_YAMUX_RELEASE_ON_READ`` (on by
default) both do. py-libp2p's own pubsub reads a message as a one-byte varint
read and a body read, so each gossip message heard cost the hearer two frames
back to the sender; each frame is a Noise message, encrypted, written, read,
decrypted and handled by a yamux task on the other side. Counted on the
1 requester + 3 compute devstack running tiny jobs one after another, WINDOW_UPDATE
was 52 % of the requester's outgoing frames (9.9 of 19 a job), 53 % of the
executor's and 79 % of a bidding node's (3.9 of 4.9: it hears a spec and sends
one bid), and the requester handled 49 Noise messages a job.

go-yamux (``sendWindowUpdate``) and the yamux spec's reference implementation
credit a stream only when the space the receiver has consumed reaches half the
maximum window, which is what :func:`install` makes py-libp2p do: the same
``GrowTo`` and receive-window auto-tuning, minus the per-read release. Flow
control is unchanged in what it bounds: a sender still stops at the window
(256 KiB to start, grown by auto-tuning up to 16 MiB) until the reader has
consumed half of it, and a reader that stops reading still stops its sender.
With it the requester handles 21 Noise messages a job, a bidding node 2.4.
One exception keeps bulk transfers moving: a read of 4 KiB or more is
credited at once (see :data:`BULK_READ`).

The library offers no hook for this (the env variable leaves the slack branch
on), so the method is replaced on the class, once, and only when the helpers it
builds on are there: another py-libp2p version keeps its own behaviour.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_NEEDED = ("_grow_threshold", "_grow_to_delta", "_apply_autotune_epoch", "send_window_update")
_installed = False


BULK_READ = 4 * 1024
"""A read this big is part of a bulk transfer: its credit goes back at once."""


async def _credit_when_half_used(self: Any, *, bytes_read: int = 0) -> None:
    """Send a WINDOW_UPDATE once the consumed part of the window reaches the
    threshold (half the target window), or right after a read of BULK_READ or
    more; otherwise nothing.

    The second rule is for py-libp2p's writer: a sender whose window is empty
    polls for credit every 10 ms (``YamuxStream.write``), so a bulk stream that
    got credit only every half window stalled 10 ms per half window: py-libp2p's
    own bitswap fell from 52 to 21 MB/s (40.5 MB/s in a run with this rule; py-libp2p's
    per-read release also over-credited, so its windows never ran dry). A job's
    messages (a spec, a bid, a receipt) are read in pieces under 4 KiB."""
    increment = 0
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        consumed = self.target_recv_window - (self.recv_window + buffered)
        if consumed > 0 and (consumed >= self._grow_threshold() or bytes_read >= BULK_READ):
            increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
    if increment > 0:
        await self.send_window_update(increment, skip_lock=True)


def install() -> bool:
    """Replace py-libp2p's per-read window release (idempotent); False when this
    py-libp2p lacks what the replacement builds on and keeps its own."""
    global _installed
    if _installed:
        return True
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    missing = [name for name in _NEEDED if not hasattr(YamuxStream, name)]
    if missing:
        log.warning("yamux window credit left as py-libp2p does it (no %s)", ", ".join(missing))
        return False
    YamuxStream._auto_tune_and_send_window_update = _credit_when_half_used  # type: ignore[method-assign]
    _installed = True
    return True


__all__ = ["BULK_READ", "install"]
