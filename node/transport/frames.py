"""Length-prefixed frames over one libp2p stream: how every meshrun request protocol talks."""

from __future__ import annotations

import logging

from libp2p.abc import INetStream
from libp2p.io.exceptions import MessageTooLarge
from libp2p.network.stream.exceptions import StreamEOF

from storage.cid import encode_uvarint

log = logging.getLogger("meshrun.mesh")

MAX_FRAME_BYTES = 1024 * 1024
READ_CHUNK = 256 * 1024


class Frames:
    """Length-prefixed frames (uvarint length, as libp2p msgio) over one libp2p stream.

    Reads are buffered: msgio reads the length prefix a byte at a time, one
    muxer round each, which capped a block stream at a fraction of what the
    connection carries.
    """

    def __init__(self, stream: INetStream, max_bytes: int = MAX_FRAME_BYTES) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    @property
    def remote_peer(self) -> str:
        return str(self.stream.muxed_conn.peer_id)

    async def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            chunk = await self.stream.read(max(READ_CHUNK, size - len(self._buffer)))
            if not chunk:
                raise StreamEOF("stream ended inside a frame")
            self._buffer += chunk

    async def read(self) -> bytes:
        length = 0
        pos = 0
        for shift in range(0, 64, 7):
            if pos >= len(self._buffer):
                await self._fill(pos + 1)
            byte = self._buffer[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
        else:
            raise MessageTooLarge("frame length prefix is not a valid uvarint")
        if length > self.max_bytes:
            raise MessageTooLarge(f"frame of {length} bytes exceeds {self.max_bytes}")
        await self._fill(pos + length)
        frame = bytes(self._buffer[pos : pos + length])
        del self._buffer[: pos + length]
        return frame

    async def write(self, data: bytes) -> None:
        await self.write_parts([data])

    async def write_parts(self, parts: list[bytes]) -> None:
        """One frame from several pieces, in one muxer write."""
        total = sum(len(p) for p in parts)
        if total > self.max_bytes:
            raise MessageTooLarge(f"frame of {total} bytes exceeds {self.max_bytes}")
        await self.stream.write(b"".join([encode_uvarint(total), *parts]))

    async def close(self) -> None:
        try:
            await self.stream.close()
        except Exception:  # closing a dead stream is not worth a crash
            log.debug("stream close failed", exc_info=True)

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except Exception:
            log.debug("stream reset failed", exc_info=True)
