"""A whole local meshrun network in one command: 1 requester + N compute nodes,
each a separate OS process on loopback, wired by bootstrap.

Separate processes (not tasks in one event loop) so the devstack exercises what
a real deployment does: real sockets, real process boundaries, real crashes.

`bad={"silent": 1, ...}` (`meshrun devstack --bad silent,wrong-cids:2`) also
starts compute nodes that misbehave on purpose (node/roles/misbehave.py). Only
a devstack can start one: it alone puts MESHRUN_ALLOW_MISBEHAVE=1 in a child's
environment. A bad node asks a lower price than the honest ones, so it wins
the auction, and it dials every honest node as well as the requester, so it
knows the other bidders (a star around the requester would hide them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.client import TOKEN_FILE, Client, RpcError, read_token_file

NODE_FILE = "node.json"
DEVSTACK_FILE = "devstack.json"
# Tests and the demo poll (wait_mesh reads node.info ten times a second), so a
# devstack node allows far more than a real node's 60 calls a minute; the limit
# stays on so the code path is the one users get.
DEVSTACK_RATE_LIMIT = 10_000
# What a misbehaving node asks: below the default 1.0, so it wins against honest nodes.
BAD_PRICE = 0.5


@dataclass
class NodeProcess:
    name: str
    mode: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    args: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # added to the inherited environment
    misbehave: str | None = None  # the kind, for a node that misbehaves on purpose
    place: Placement | None = None  # where it runs, when not a plain process on loopback

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"

    @property
    def rpc_url(self) -> str:
        return str(self.info["rpc_url"])

    @property
    def peer_id(self) -> str:
        return str(self.info["peer_id"])

    @property
    def token(self) -> str | None:
        """Read fresh each time: the node writes a new token at every (re)start."""
        return read_token_file(Path(self.info.get("token_file") or self.data_dir / TOKEN_FILE))

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.rpc_url, self.token, timeout=timeout)


class DevstackError(RuntimeError):
    pass


@dataclass(frozen=True)
class Placement:
    """Where one devstack node runs, for a node that is not a plain process on loopback
    (node/dev/testnet.py puts each node in its own network namespace).

    `prefix` goes before the node's command line (e.g. `ip netns exec NS`; it must exec
    the node, so the process's pid is the node's), `listen` replaces the loopback listen
    multiaddr, and `rpc_host` makes the JSON-RPC API bind that address (with
    `--allow-remote-rpc`; the token still guards it).
    """

    prefix: tuple[str, ...] = ()
    listen: str = "/ip4/127.0.0.1/tcp/0"
    rpc_host: str | None = None


class Devstack:
    def __init__(
        self,
        data_dir: Path,
        compute: int = 2,
        *,
        bid_window: float | None = None,
        log_level: str = "info",
        extra_args: dict[str, list[str]] | None = None,
        rate_limit: int = DEVSTACK_RATE_LIMIT,
        bad: Mapping[str, int] | None = None,
        bad_price: float = BAD_PRICE,
        placement: Mapping[str, Placement] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.placement = dict(placement or {})
        self.bad = dict(bad or {})
        self.bad_price = bad_price
        self._bad_serial = 0
        self.rate_limit = rate_limit
        self.compute_count = compute
        self.bid_window = bid_window
        self.log_level = log_level
        self.extra_args = extra_args or {}
        self.nodes: list[NodeProcess] = []

    @property
    def requester(self) -> NodeProcess:
        return self.nodes[0]

    @property
    def compute_nodes(self) -> list[NodeProcess]:
        """Every compute node, misbehaving ones included."""
        return self.nodes[1:]

    @property
    def honest_nodes(self) -> list[NodeProcess]:
        return [n for n in self.compute_nodes if n.misbehave is None]

    @property
    def bad_nodes(self) -> list[NodeProcess]:
        return [n for n in self.compute_nodes if n.misbehave is not None]

    def __enter__(self) -> Devstack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spawn(
        self,
        name: str,
        mode: str,
        bootstrap: list[str],
        *,
        env: Mapping[str, str] | None = None,
        misbehave: str | None = None,
    ) -> NodeProcess:
        data_dir = self.data_dir / name
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / NODE_FILE).unlink(missing_ok=True)
        place = self.placement.get(name, Placement())
        args = [
            *place.prefix,
            sys.executable,
            "-m",
            "cli",
            "node",
            "--mode",
            mode,
            "--data-dir",
            str(data_dir),
            "--listen",
            place.listen,
            "--rpc-port",
            "0",
            "--log-level",
            self.log_level,
            "--rate-limit",
            str(self.rate_limit),
        ]
        if place.rpc_host is not None:
            args += ["--rpc-host", place.rpc_host, "--allow-remote-rpc"]
        for addr in bootstrap:
            args += ["--bootstrap", addr]
        if self.bid_window is not None and mode == "requester":
            args += ["--bid-window", str(self.bid_window)]
        if misbehave is not None:
            args += ["--misbehave", misbehave, "--price", str(self.bad_price)]
        args += self.extra_args.get(name, [])
        extra = dict(env or {})
        process = self._launch(args, data_dir, extra)
        return NodeProcess(
            name, mode, data_dir, process, args, env=extra, misbehave=misbehave, place=place
        )

    @staticmethod
    def _launch(
        args: list[str], data_dir: Path, extra_env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (data_dir / "node.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        try:
            return subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        finally:
            log.close()

    def kill(self, node: NodeProcess) -> None:
        """SIGKILL: the crash a test wants, with no chance to clean up."""
        node.process.kill()
        node.process.wait()

    def restart(self, node: NodeProcess, timeout: float = 90.0) -> None:
        """Start a stopped or killed node again on the same data dir (same identity, same DB)."""
        if node.process.poll() is None:
            self.kill(node)
        listen = [a.split("/p2p/")[0] for a in node.info.get("listen_addrs", [])]
        if listen and "--listen" in node.args:
            # Same address as before, as a real node restarts on its configured port:
            # peers that knew it can reach it again.
            node.args[node.args.index("--listen") + 1] = listen[0]
        (node.data_dir / NODE_FILE).unlink(missing_ok=True)
        node.process = self._launch(node.args, node.data_dir, node.env)
        self.wait_ready(node, timeout)

    def move(self, node: NodeProcess, place: Placement, timeout: float = 90.0) -> None:
        """Restart a node on the same data dir (same identity, same DB) somewhere else:
        another host of a testnet, so another address, as a machine that moved would.
        Nobody is told the new address; the node and its peers must find each other."""
        if node.process.poll() is None:
            self.kill(node)
        old = node.place or Placement()
        args = node.args[len(old.prefix) :]
        args[args.index("--listen") + 1] = place.listen
        if "--rpc-host" in args:
            args[args.index("--rpc-host") + 1] = place.rpc_host or "127.0.0.1"
        elif place.rpc_host is not None:
            args += ["--rpc-host", place.rpc_host, "--allow-remote-rpc"]
        node.args, node.place = [*place.prefix, *args], place
        self.placement[node.name] = place
        (node.data_dir / NODE_FILE).unlink(missing_ok=True)
        node.process = self._launch(node.args, node.data_dir, node.env)
        self.wait_ready(node, timeout)

    def wait_ready(self, node: NodeProcess, timeout: float = 90.0) -> None:
        path = node.data_dir / NODE_FILE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise DevstackError(
                    f"{node.name} exited with code {node.process.returncode} during start; "
                    f"last log lines:\n{_tail(node.log_path)}"
                )
            if path.exists():
                try:
                    info = json.loads(path.read_text())
                except json.JSONDecodeError:
                    info = None
                if info and info.get("pid") == node.process.pid:
                    node.info = info
                    return
            time.sleep(0.05)
        raise DevstackError(f"{node.name} was not ready after {timeout:.0f}s; see {node.log_path}")

    def start(self, timeout: float = 120.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            requester = self.spawn("requester", "requester", [])
            self.nodes.append(requester)
            self.wait_ready(requester, timeout)
            bootstrap = [requester.info["listen_addrs"][0]]
            for i in range(self.compute_count):
                self.nodes.append(self.spawn(f"compute-{i + 1}", "compute", bootstrap))
            for node in self.compute_nodes:
                self.wait_ready(node, timeout)
            # Bad nodes dial the honest ones too, so those must be up first.
            bad = [self._spawn_bad(k) for k, n in self.bad.items() for _ in range(n)]
            for node in bad:
                self.wait_ready(node, timeout)
            self.wait_mesh(timeout=30.0)
            self.write_manifest()
        except BaseException:
            self.stop()
            raise

    def _spawn_bad(self, kind: str) -> NodeProcess:
        from node.roles.misbehave import ALLOW_ENV, KINDS

        if kind not in KINDS:
            raise DevstackError(f"unknown misbehaviour {kind!r} (one of: {', '.join(KINDS)})")
        self._bad_serial += 1
        peers = [self.requester, *self.honest_nodes]
        bootstrap = [str(n.info["listen_addrs"][0]) for n in peers if n.info.get("listen_addrs")]
        node = self.spawn(
            f"bad-{kind}-{self._bad_serial}",
            "compute",
            bootstrap,
            env={ALLOW_ENV: "1"},
            misbehave=kind,
        )
        self.nodes.append(node)
        return node

    def add_bad(self, kind: str, timeout: float = 90.0) -> NodeProcess:
        """Start one more misbehaving compute node in a running devstack.

        Returns once the requester counts it on the job topic and it counts
        every honest compute node there (so a job published next reaches it,
        and it knows the other bidders).
        """
        node = self._spawn_bad(kind)
        try:
            self.wait_ready(node, timeout)
            self.wait_joined(node, timeout=30.0)
        except BaseException:
            self.remove(node)
            raise
        self.write_manifest()
        return node

    def remove(self, node: NodeProcess, timeout: float = 10.0) -> None:
        """Stop one node (SIGTERM, then SIGKILL) and forget it."""
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
            try:
                node.process.wait(timeout)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
        if node in self.nodes:
            self.nodes.remove(node)
            self.write_manifest()

    def wait_joined(self, node: NodeProcess, timeout: float = 30.0) -> None:
        """Until the requester sees `node` on the job topic and `node` sees every honest node."""
        deadline = time.monotonic() + timeout
        honest = {n.peer_id for n in self.honest_nodes if n is not node}
        with self.requester.client() as requester, node.client() as own:
            while True:
                seen_by_requester = node.peer_id in requester.call("node.peers")["topic_peers"]
                sees = set(own.call("node.peers")["topic_peers"])
                if seen_by_requester and honest <= sees:
                    return
                if time.monotonic() > deadline:
                    raise DevstackError(
                        f"{node.name} did not join the job topic after {timeout:.0f}s "
                        f"(requester sees it: {seen_by_requester}; it sees "
                        f"{len(honest & sees)} of {len(honest)} honest nodes)"
                    )
                time.sleep(0.1)

    def wait_mesh(self, timeout: float = 30.0) -> None:
        """Jobs gossiped before compute nodes' subscriptions reach the requester are lost."""
        deadline = time.monotonic() + timeout
        with self.requester.client() as client:
            while True:
                info = client.node_info()
                if info["topic_peers"] >= len(self.compute_nodes):
                    return
                if time.monotonic() > deadline:
                    raise DevstackError(
                        f"only {info['topic_peers']} of {len(self.compute_nodes)} compute nodes "
                        f"joined the job topic after {timeout:.0f}s"
                    )
                time.sleep(0.1)

    def manifest(self) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir),
            "nodes": [
                {
                    "name": n.name,
                    "mode": n.mode,
                    "peer_id": n.info.get("peer_id"),
                    "listen_addrs": n.info.get("listen_addrs"),
                    "rpc_url": n.info.get("rpc_url"),
                    "token_file": n.info.get("token_file"),
                    "pid": n.process.pid,
                    "log": str(n.log_path),
                    "misbehave": n.misbehave,
                }
                for n in self.nodes
            ],
        }

    def write_manifest(self) -> Path:
        path = self.data_dir / DEVSTACK_FILE
        path.write_text(json.dumps(self.manifest(), indent=2))
        return path

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                node.process.wait(remaining)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
        self.nodes = []

    def alive(self) -> bool:
        return all(n.process.poll() is None for n in self.nodes)


def parse_bad(text: str) -> dict[str, int]:
    """`--bad KIND[:N],…` as {kind: count}; ValueError for anything else."""
    from node.roles.misbehave import KINDS

    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, number = part.partition(":")
        if kind not in KINDS:
            raise ValueError(f"--bad: unknown kind {kind!r} (one of: {', '.join(KINDS)})")
        try:
            count = int(number) if number else 1
        except ValueError:
            raise ValueError(f"--bad: {part!r}: N must be a whole number") from None
        if count < 1:
            raise ValueError(f"--bad: {part!r}: N must be at least 1")
        counts[kind] = counts.get(kind, 0) + count
    return counts


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


__all__ = [
    "BAD_PRICE",
    "Devstack",
    "DevstackError",
    "NodeProcess",
    "Placement",
    "RpcError",
    "parse_bad",
]
