"""Mesh.open_pipelined: the protocol negotiation travels with the first frame."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from crypto.keys import Identity
from node.content.blocks import BitswapStore
from node.transport.frames import MAX_NEGOTIATION_LINE, Frames, ProtocolNotSpoken, negotiation
from node.transport.mesh import MAX_UNSPOKEN, Mesh, start_mesh
from storage.blockstore import Blockstore

ECHO = "/meshrun/test-echo/1.0.0"


@asynccontextmanager
async def _mesh(data_dir: Path) -> AsyncIterator[Mesh]:
    store = Blockstore(data_dir / "blocks")
    async with start_mesh(
        Identity.load_or_create(data_dir), ["/ip4/127.0.0.1/tcp/0"], BitswapStore(store)
    ) as mesh:
        yield mesh


@asynccontextmanager
async def _pair(tmp_path: Path) -> AsyncIterator[tuple[Mesh, Mesh]]:
    async with _mesh(tmp_path / "a") as a, _mesh(tmp_path / "b") as b:
        await a.connect(f"{b.listen_addrs()[0]}/p2p/{b.peer_id}")
        yield a, b


def test_negotiation_is_the_multistream_handshake_and_the_protocol() -> None:
    assert (
        negotiation(ECHO)
        == b"\x13/multistream/1.0.0\n" + bytes([len(ECHO) + 1]) + (ECHO + "\n").encode()
    )


@pytest.mark.timeout(30)
async def test_a_pipelined_stream_carries_frames_both_ways(tmp_path: Path) -> None:
    async with _pair(tmp_path) as (a, b):

        async def echo(frames: Frames) -> None:
            while True:
                try:
                    data = await frames.read()
                except Exception:
                    return
                await frames.write(data[::-1])

        b.handle(ECHO, echo)
        frames = await a.open_pipelined(b.peer_id, ECHO)
        await frames.write(b"first")
        await frames.write(b"second")
        assert await frames.read() == b"tsrif"
        assert await frames.read() == b"dnoces"
        await frames.write_frames([[b"th", b"ird"], [b"fourth"]])
        assert await frames.read() == b"driht"
        assert await frames.read() == b"htruof"
        await frames.close()


@pytest.mark.timeout(30)
async def test_a_protocol_the_peer_does_not_speak_fails_the_first_read(tmp_path: Path) -> None:
    async with _pair(tmp_path) as (a, b):
        frames = await a.open_pipelined(b.peer_id, "/meshrun/nobody-speaks/1.0.0")
        await frames.write(b"hello")
        with pytest.raises(ProtocolNotSpoken), trio.fail_after(10):
            await frames.read()
        await frames.reset()


class _Scripted:
    """A stream that answers with fixed bytes and records what is written."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.written = b""

    async def read(self, n: int) -> bytes:
        chunk, self.answer = self.answer[:n], self.answer[n:]
        return chunk

    async def write(self, data: bytes) -> None:
        self.written += data


async def test_the_first_write_carries_the_negotiation_once() -> None:
    stream = _Scripted(negotiation(ECHO) + b"\x02ok")
    frames = Frames(stream, protocol=ECHO)  # type: ignore[arg-type]
    await frames.write(b"one")
    await frames.write(b"two")
    assert stream.written == negotiation(ECHO) + b"\x03one\x03two"
    assert await frames.read() == b"ok"


async def test_an_answer_longer_than_a_protocol_id_is_refused() -> None:
    """A peer cannot make the first read buffer an unbounded "protocol id"."""
    answer = negotiation(ECHO)[:20] + b"\xff\xff\x04" + b"x" * 64
    frames = Frames(_Scripted(answer), protocol=ECHO)  # type: ignore[arg-type]
    with pytest.raises(Exception, match=f"exceeds {MAX_NEGOTIATION_LINE}"):
        await frames.read()


async def test_a_refusal_is_protocol_not_spoken() -> None:
    answer = negotiation(ECHO)[:20] + b"\x03na\n"
    frames = Frames(_Scripted(answer), protocol=ECHO)  # type: ignore[arg-type]
    with pytest.raises(ProtocolNotSpoken, match="'na'"):
        await frames.read()


def test_unspoken_protocols_are_remembered_within_a_bound(tmp_path: Path) -> None:
    mesh = Mesh.__new__(Mesh)
    mesh._unspoken = {}
    for i in range(MAX_UNSPOKEN + 5):
        mesh.remember_unspoken(f"peer-{i}", ECHO)
    assert len(mesh._unspoken) == MAX_UNSPOKEN
    assert not mesh.unspoken("peer-0", ECHO)
    assert mesh.unspoken(f"peer-{MAX_UNSPOKEN + 4}", ECHO)
