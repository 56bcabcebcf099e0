"""Yamux window credit (node/transport/flow.py) over real libp2p connections: small
messages are not answered with a WINDOW_UPDATE each, and flow control still carries
a transfer many windows long."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, YamuxStream

from crypto.keys import Identity
from node.content.blocks import BitswapStore
from node.transport import flow
from node.transport.frames import Frames
from node.transport.mesh import Mesh, start_mesh
from storage.blockstore import Blockstore

SINK = "/meshrun/test-sink/1.0.0"


@asynccontextmanager
async def _pair(tmp_path: Path) -> AsyncIterator[tuple[Mesh, Mesh]]:
    async with (
        start_mesh(
            Identity.load_or_create(tmp_path / "a"),
            ["/ip4/127.0.0.1/tcp/0"],
            BitswapStore(Blockstore(tmp_path / "a" / "blocks")),
        ) as a,
        start_mesh(
            Identity.load_or_create(tmp_path / "b"),
            ["/ip4/127.0.0.1/tcp/0"],
            BitswapStore(Blockstore(tmp_path / "b" / "blocks")),
        ) as b,
    ):
        await a.connect(f"{b.listen_addrs()[0]}/p2p/{b.peer_id}")
        yield a, b


def _yamux(frames: Frames) -> YamuxStream:
    stream = frames.stream.muxed_stream  # type: ignore[attr-defined]
    assert isinstance(stream, YamuxStream)
    return stream


def test_install_replaces_the_per_read_release_once() -> None:
    assert flow.install() is True
    assert flow.install() is True
    assert YamuxStream._auto_tune_and_send_window_update is flow._credit_when_half_used


@pytest.mark.timeout(30)
async def test_small_frames_read_one_by_one_get_no_window_update_each(tmp_path: Path) -> None:
    """200 frames of 300 bytes, each read before the next is sent: 60 KB in all, under
    half the window, so the reader owes no credit yet and sends none."""
    async with _pair(tmp_path) as (a, b):
        got: list[bytes] = []
        answered = trio.Event()

        async def sink(frames: Frames) -> None:
            while True:
                try:
                    got.append(await frames.read())
                except Exception:
                    return
                await frames.write(b"ok")

        b.handle(SINK, sink)
        frames = await a.open_pipelined(b.peer_id, SINK)
        sent = 0
        for i in range(200):
            payload = bytes([i % 251]) * 300
            await frames.write(payload)
            sent += len(payload)
            assert await frames.read() == b"ok"
        answered.set()
        assert len(got) == 200 and all(len(g) == 300 for g in got)
        # Every byte a sent is still charged to its window: nothing was credited back.
        assert _yamux(frames).send_window <= DEFAULT_WINDOW_SIZE - sent
        await frames.close()


@pytest.mark.timeout(60)
async def test_a_transfer_many_windows_long_arrives_whole(tmp_path: Path) -> None:
    """4 MiB one way in 64 KiB frames, 16 times the first window: the reader credits
    the sender each time it has consumed half a window, so nothing stalls."""
    async with _pair(tmp_path) as (a, b):
        data = os.urandom(4 * 1024 * 1024)
        received = hashlib.sha256()
        count = 0
        done = trio.Event()

        async def sink(frames: Frames) -> None:
            nonlocal count
            while count < len(data):
                chunk = await frames.read()
                received.update(chunk)
                count += len(chunk)
            done.set()

        b.handle(SINK, sink)
        frames = await a.open_pipelined(b.peer_id, SINK)
        step = 64 * 1024
        for offset in range(0, len(data), step):
            await frames.write(data[offset : offset + step])
        with trio.fail_after(30):
            await done.wait()
        assert count == len(data)
        assert received.digest() == hashlib.sha256(data).digest()
        await frames.close()


@pytest.mark.timeout(30)
async def test_a_bulk_read_is_credited_at_once(tmp_path: Path) -> None:
    """One 64 KiB frame, a quarter of the window: read in pieces of 4 KiB or more,
    so its credit goes back before the answer (the writer would otherwise poll
    for credit every 10 ms once its window ran out)."""
    async with _pair(tmp_path) as (a, b):

        async def sink(frames: Frames) -> None:
            with contextlib.suppress(Exception):
                await frames.read()
                await frames.write(b"ok")

        b.handle(SINK, sink)
        frames = await a.open_pipelined(b.peer_id, SINK)
        await frames.write(os.urandom(64 * 1024))
        assert await frames.read() == b"ok"
        assert _yamux(frames).send_window > DEFAULT_WINDOW_SIZE - 32 * 1024
        await frames.close()
