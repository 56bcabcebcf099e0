"""The testbed itself: injected delay seen by a probe, partitions, heal, cleanup."""

from __future__ import annotations

import os
import subprocess

import pytest

from node.dev.testnet import Testnet, Unreachable, remove_stale

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def test_delay_partition_and_heal(testnet_ok: None) -> None:
    with Testnet(hosts=3) as net:
        assert len({net.addr(i) for i in range(3)}) == 3
        fast = net.probe(0, 1)
        net.set_link(rtt_ms=50)
        slow = net.probe(0, 1)
        other = net.probe(2, 1)
        print(f"\nprobe RTT: {fast * 1000:.2f} ms at rtt_ms=0, {slow * 1000:.2f} ms at rtt_ms=50")
        # Lower bounds on the injected delay only: a loaded machine may add, never remove.
        assert slow >= 0.050 and other >= 0.050
        net.set_link(rtt_ms=0)
        assert net.probe(0, 1) < 0.050  # the delay is gone again (far below the 50 ms)

        net.partition([0], [1, 2])
        with pytest.raises(Unreachable):
            net.probe(0, 1, count=3, timeout=0.3)
        with pytest.raises(Unreachable):
            net.probe(2, 0, count=3, timeout=0.3)
        net.probe(1, 2)  # the hosts on one side still talk
        net.heal()
        net.probe(0, 1)
        net.probe(2, 0)


def test_loss_drops_a_fraction(testnet_ok: None) -> None:
    with Testnet(hosts=2, loss=1.0) as net:
        with pytest.raises(Unreachable):
            net.probe(0, 1, count=3, timeout=0.2)
        net.set_link(loss=0.0)
        net.probe(0, 1)


def test_cleanup_even_when_the_body_raises(testnet_ok: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), Testnet(hosts=2, rtt_ms=10) as net:
        names = {net.switch, net.netns(0), net.netns(1)}
        root_if = net.root_if
        assert names <= _netns()
        child = net.popen(1, ["sleep", "600"])
        raise RuntimeError("boom")
    assert not names & _netns()
    assert root_if not in _links()
    assert child.poll() is not None


def test_stale_namespaces_of_dead_runs_are_removed(testnet_ok: None) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"mr-{dead.pid}-h0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    mine = f"mr-{os.getpid()}-h99"
    subprocess.run(["ip", "netns", "add", mine], check=True)
    try:
        assert stale in remove_stale()
        assert stale not in _netns()
        assert mine in _netns()  # a live process's namespaces are left alone
    finally:
        subprocess.run(["ip", "netns", "delete", mine], capture_output=True)
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)
