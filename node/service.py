"""A running node: identity, mesh, blockstore, database, its role, and the RPC server."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import trio

from crypto.keys import Identity
from node.api.auth import (
    DEFAULT_RATE_LIMIT,
    TOKEN_FILE,
    Gate,
    RateLimiter,
    check_rpc_bind,
    remove_token,
    write_token,
)
from node.api.explorer import install_explorer
from node.api.gateway import mount_gateway
from node.api.httpapi import install_http_api
from node.api.methods.build import build_registry
from node.api.metrics import METRICS_PATH, NodeMetrics, mount_metrics
from node.api.rpc import RpcServer
from node.api.share import Shares
from node.content.blocks import BitswapStore, serve_block_exchange
from node.content.service import Content, ContentConfig
from node.executor.memory import check_job_memory
from node.executor.providers import describe_devices, normalize_provider
from node.executor.slots import Slots, plan_slots
from node.jobs.bus import EventBus
from node.jobs.ledger import Ledger
from node.jobs.reputation import Reputation
from node.jobs.store import JobDB
from node.roles.compute import DEFAULT_MAX_QUEUE, DEFAULT_RESUME_GRACE, Compute
from node.roles.context import NodeContext
from node.roles.misbehave import check_misbehave, compute_class
from node.roles.requester import DEFAULT_BID_WINDOW, Requester
from node.roles.settlement import Settlements
from node.transport.mesh import start_mesh
from node.transport.peers import (
    connect_bootstrap,
    remember_peers,
    remembered_peers,
    stay_connected,
)
from protocol.messages import JOBS_TOPIC, VERIFICATION_PATTERN
from storage.blockstore import Blockstore

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger("meshrun.node")

NODE_FILE = "node.json"
VERSION = "0.1.0"
Mode = Literal["requester", "compute"]
DEFAULT_MAX_MODEL_BYTES = 2 * 1024**3
DEFAULT_MAX_INPUT_BYTES = 1024**3
DEFAULT_MAX_RESULT_BYTES = 1024**3


@dataclass
class NodeConfig:
    mode: Mode
    data_dir: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    rpc_host: str = "127.0.0.1"
    rpc_port: int = 0
    price: float = 1.0
    bid_window: float = DEFAULT_BID_WINDOW
    providers: list[str] | None = None
    threads: int | None = None
    allow_remote_rpc: bool = False
    rate_limit: int = DEFAULT_RATE_LIMIT
    ipfs_api: str | None = None  # the user's IPFS daemon (Kubo RPC multiaddr)
    retention_days: float | None = None  # pins of results and uploads expire after this
    # The most a DAG may hold (cumulative size, every link counted) when this node
    # fetches or reads it as a job's model, inputs or result; other content
    # (storage.fetch, storage.get, the gateway) is held to the largest of the three.
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    # Resident memory one job may use on a compute node (None: 4 GiB or half the RAM).
    max_job_memory: int | None = None
    # Tests only: a compute node that misbehaves on purpose (node/roles/misbehave.py);
    # refused unless the environment says a devstack started it.
    misbehave: str | None = None
    # Requester: the verification policy of a job whose submit names none.
    default_verification: str = "receipt"
    # Compute: CUDA devices offered (cuda:N, all, none; None: every GPU that works),
    # CPU slots (None: one when no GPU is offered), accepted jobs that may wait.
    devices: list[str] | None = None
    cpu_slots: int | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    # Compute: how long a finished job's receipt is handed to a restarted
    # requester's Resume (seconds; the run goes on when the requester's stream drops).
    resume_grace: float = DEFAULT_RESUME_GRACE
    # Serve /metrics without the token (for a Prometheus server that holds no secret).
    metrics_public: bool = False

    def __post_init__(self) -> None:
        """Refuse a config that would open the node to the network by accident, early."""
        check_rpc_bind(self.rpc_host, self.allow_remote_rpc)
        if self.rate_limit < 0:
            raise ValueError("rate_limit must be >= 0 (0 disables it)")
        for name in ("max_model_bytes", "max_input_bytes", "max_result_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.max_job_memory is not None:
            check_job_memory(self.max_job_memory)
        if self.cpu_slots is not None and not 0 <= self.cpu_slots <= 256:
            raise ValueError("cpu_slots must be between 0 and 256")
        if not 0 <= self.max_queue <= 10_000:
            raise ValueError("max_queue must be between 0 and 10000")
        if not 0 <= self.resume_grace <= 7 * 24 * 3600:
            raise ValueError("resume_grace must be between 0 and 604800 seconds")
        check_misbehave(self.misbehave, self.mode)
        if not re.fullmatch(VERIFICATION_PATTERN, self.default_verification):
            raise ValueError(
                f"unknown verification policy {self.default_verification!r}: use none, "
                "receipt, redundant:K (K 2..9) or sample:P (P between 0 and 1)"
            )

    @property
    def max_content_bytes(self) -> int:
        return max(self.max_model_bytes, self.max_input_bytes, self.max_result_bytes)


class Node:
    def __init__(self, config: NodeConfig, ctx: NodeContext) -> None:
        self.config = config
        self.ctx = ctx
        self.mode = config.mode
        self.requester: Requester | None = None
        self.compute: Compute | None = None
        self.rpc_url = ""
        self.started_at = time.time()
        self.device: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        mesh = self.ctx.mesh
        return {
            "peer_id": self.ctx.peer_id,
            "mode": self.mode,
            "version": VERSION,
            "listen_addrs": mesh.listen_addrs(),
            "rpc_url": self.rpc_url,
            "data_dir": str(self.config.data_dir),
            "connected_peers": len(mesh.connected_peers()),
            "topic_peers": len(mesh.topic_peers(JOBS_TOPIC)),
            "execution_providers": self.compute.slots.providers if self.compute else [],
            "price": self.config.price if self.compute else None,
            "device": self.device,
            "capacity": self.compute.capacity() if self.compute else None,
            "uptime_seconds": time.time() - self.started_at,
            "misbehave": self.config.misbehave,
        }

    def peers(self, limit: int = 100, role: str | None = None) -> dict[str, Any]:
        """Connected peers, plus the reputation records (`limit` most recently seen)."""
        mesh = self.ctx.mesh
        reputation = self.ctx.reputation
        return {
            "peers": mesh.connected_peers(),
            "topic_peers": mesh.topic_peers(JOBS_TOPIC),
            "known": reputation.count(role),
            "reputation": reputation.peers(limit=limit, role=role),
        }


async def run_node(
    config: NodeConfig, *, task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED
) -> None:
    check_rpc_bind(config.rpc_host, config.allow_remote_rpc)
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    identity = Identity.load_or_create(data_dir)
    store = Blockstore(data_dir / "blocks")
    db = JobDB(data_dir / "jobs.sqlite", EventBus())
    token, token_file = write_token(data_dir)
    try:
        bitswap = BitswapStore(store)
        async with start_mesh(identity, config.listen, bitswap) as mesh:
            exchange_stats = serve_block_exchange(mesh, store)
            content = Content(
                data_dir,
                store,
                mesh,
                db,
                ContentConfig(
                    config.ipfs_api,
                    config.retention_days,
                    max_content_bytes=config.max_content_bytes,
                ),
            )
            ctx = NodeContext(
                config.mode,
                data_dir,
                identity,
                mesh,
                store,
                db,
                content,
                Reputation(db),
                Ledger(db),
            )
            node = Node(config, ctx)
            metrics = NodeMetrics(
                db,
                peers=lambda: len(mesh.connected_peers()),
                worker_starts=lambda: _worker_starts(node),
                blocks_served=lambda: {
                    "exchange": exchange_stats["bytes_sent"],
                    "bitswap": int(bitswap.stats["bytes_sent"]),
                },
                replies_sent=lambda: node.compute.replies if node.compute else {},
            )
            metrics.instrument_fetch(content)
            metrics.instrument_gossip(mesh)
            async with trio.open_nursery() as nursery:
                await nursery.start(metrics.watch, db.bus)
                await nursery.start(content.run)
                ctx.settlements = Settlements(ctx)
                await nursery.start(ctx.settlements.run)
                if config.mode == "compute":
                    await nursery.start(_run_compute, node)
                else:
                    node.requester = Requester(
                        ctx,
                        bid_window=config.bid_window,
                        max_result_bytes=config.max_result_bytes,
                        default_verification=config.default_verification,
                    )
                    await nursery.start(node.requester.run)
                shares = Shares(identity, data_dir)
                server = RpcServer(build_registry(node, shares))
                served = metrics.served_bytes.labels("gateway")
                mount_gateway(server.app, content, shares=shares, on_served=served.inc)
                mount_metrics(server.app, metrics)
                open_paths = frozenset({METRICS_PATH}) if config.metrics_public else frozenset()
                gate = Gate(token, RateLimiter(config.rate_limit), token_file, open_paths)
                install_explorer(server.app, server.registry, db.bus, gate)
                install_http_api(server.app, server.registry, bus=db.bus, gate=gate)
                port = await nursery.start(server.serve, config.rpc_host, config.rpc_port)
                node.rpc_url = f"http://{config.rpc_host}:{port}/rpc"
                for addr in config.bootstrap:
                    await connect_bootstrap(mesh, addr)
                for addr in remembered_peers(data_dir, config.bootstrap):
                    nursery.start_soon(connect_bootstrap, mesh, addr, 8)
                nursery.start_soon(remember_peers, mesh, data_dir)
                nursery.start_soon(stay_connected, mesh, list(config.bootstrap))
                _write_node_file(node)
                task_status.started(node)
    finally:
        db.close()
        (data_dir / NODE_FILE).unlink(missing_ok=True)
        remove_token(token_file, token)


def _worker_starts(node: Node) -> list[int]:
    """Worker processes each executor pool has started (for the restarts counter)."""
    if node.compute is None:
        return []
    return [pool.worker_starts for pool in node.compute.slots.pools.values()]


def compute_slots(config: NodeConfig, devices: dict[str, Any]) -> Slots:
    """The node's execution slots from its flags and the devices it found (ValueError: why not)."""
    found = list(devices.get("providers") or [])
    if config.providers:
        wanted = [normalize_provider(p) for p in config.providers]
        providers = [p for p in found if p in wanted] or found
    else:
        providers = found
    plan = plan_slots(config.devices, config.cpu_slots, devices.get("gpus") or [], providers)
    return Slots(plan, providers, threads=config.threads, max_job_memory=config.max_job_memory)


def check_compute_config(config: NodeConfig) -> None:
    """Refuse, before the node starts, slot flags the machine cannot honour (ValueError)."""
    compute_slots(config, describe_devices())


async def _run_compute(
    node: Node, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    devices = await trio.to_thread.run_sync(describe_devices)
    node.device = devices
    slots = compute_slots(node.config, devices)
    async with slots:
        gpus = devices.get("gpus") or []
        label = str(gpus[0]["name"]) if gpus else "cpu"
        node.compute = compute_class(node.config.misbehave)(
            node.ctx,
            slots,
            price=node.config.price,
            device=label,
            gpus=list(gpus),
            max_model_bytes=node.config.max_model_bytes,
            max_input_bytes=node.config.max_input_bytes,
            max_queue=node.config.max_queue,
            resume_grace=node.config.resume_grace,
        )
        await slots.start()
        async with trio.open_nursery() as nursery:
            await nursery.start(node.compute.run)
            task_status.started()


def _write_node_file(node: Node) -> None:
    """node.json tells local tools (devstack, scripts) how to reach this node."""
    info = {
        "peer_id": node.ctx.peer_id,
        "mode": node.mode,
        "listen_addrs": node.ctx.mesh.listen_addrs(),
        "rpc_url": node.rpc_url,
        "token_file": str(node.config.data_dir / TOKEN_FILE),
        "pid": os.getpid(),
    }
    path = node.config.data_dir / NODE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)
