"""Length-prefixed frames over one libp2p stream: how every meshrun request protocol talks."""

from __future__ import annotations

import logging

from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError
from libp2p.io.exceptions import MessageTooLarge
from libp2p.network.stream.exceptions import StreamEOF

from storage.cid import encode_uvarint

log = logging.getLogger("meshrun.mesh")

MAX_FRAME_BYTES = 1024 * 1024
READ_CHUNK = 256 * 1024
MULTISTREAM = "/multistream/1.0.0"
# A multistream-select answer is a protocol id and a newline; longer is not one.
MAX_NEGOTIATION_LINE = 1024


class ProtocolNotSpoken(BaseLibp2pError):
    """The peer answered a pipelined negotiation with something else than the protocol
    asked for (multistream-select's "na": it does not speak it)."""


def negotiation(protocol: str) -> bytes:
    """What a multistream-select client sends to choose `protocol`, handshake included."""
    return b"".join(
        encode_uvarint(len(line)) + line
        for line in (f"{MULTISTREAM}\n".encode(), f"{protocol}\n".encode())
    )


class Frames:
    """Length-prefixed frames (uvarint length, as libp2p msgio) over one libp2p stream.

    Reads are buffered: msgio reads the length prefix a byte at a time, one
    muxer round each, which capped a block stream at a fraction of what the
    connection carries.

    With `protocol`, the stream is not negotiated yet (Mesh.open_pipelined):
    the first write carries the multistream-select handshake and the protocol
    choice ahead of the first frame, and the first read checks the peer's two
    answers before any frame, raising ProtocolNotSpoken if the peer refused.
    """

    def __init__(
        self, stream: INetStream, max_bytes: int = MAX_FRAME_BYTES, protocol: str | None = None
    ) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._prelude = b"" if protocol is None else negotiation(protocol)
        self._expect = [] if protocol is None else [MULTISTREAM, protocol]

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
        while self._expect:
            await self._answered(self._expect[0])
            self._expect.pop(0)
        return await self._frame(self.max_bytes)

    async def _answered(self, line: str) -> None:
        """Read one multistream-select answer; it must be `line`."""
        got = await self._frame(MAX_NEGOTIATION_LINE)
        if got != f"{line}\n".encode():
            text = got.rstrip(b"\n").decode("utf-8", "replace")[:100]
            self._expect.clear()
            raise ProtocolNotSpoken(f"the peer answered {text!r} when asked for {line}")

    async def _frame(self, limit: int) -> bytes:
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
        if length > limit:
            raise MessageTooLarge(f"frame of {length} bytes exceeds {limit}")
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
        prelude, self._prelude = self._prelude, b""
        await self.stream.write(b"".join([prelude, encode_uvarint(total), *parts]))

    async def write_frames(self, frames: list[list[bytes]]) -> None:
        """Several frames (each from pieces, as `write_parts`) in one muxer write.

        Each write is a yamux frame, a Noise message and, with TCP_NODELAY, a
        TCP segment of its own; a paced sender (BBR) spreads many small
        segments over a round trip's time where one carries them at once.
        """
        out: list[bytes] = []
        for parts in frames:
            total = sum(len(p) for p in parts)
            if total > self.max_bytes:
                raise MessageTooLarge(f"frame of {total} bytes exceeds {self.max_bytes}")
            out.append(encode_uvarint(total))
            out.extend(parts)
        prelude, self._prelude = self._prelude, b""
        await self.stream.write(b"".join([prelude, *out]))

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
