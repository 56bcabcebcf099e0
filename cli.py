"""`meshrun`: run a node, a whole local network, the demo, and the client verbs.

Client verbs talk to a node only through the SDK client (JSON-RPC), the same
door every user has (DESIGN §2); `node`, `devstack` and `demo` start processes.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from platformdirs import user_data_dir
from rich.console import Console
from rich.table import Table

from node.client import Client, RpcError
from protocol.errors import ErrorCode, MeshrunError

app = typer.Typer(
    name="meshrun",
    help="A peer-to-peer compute network for ONNX inference.",
    no_args_is_help=True,
    add_completion=False,
)
client_app = typer.Typer(help="Talk to a running node over JSON-RPC.", no_args_is_help=True)
app.add_typer(client_app, name="client")

console = Console()
err_console = Console(stderr=True)

DEFAULT_RPC_PORT = 7780


def default_data_dir() -> Path:
    return Path(os.environ.get("MESHRUN_HOME") or user_data_dir("meshrun"))


def _fail(exc: MeshrunError, as_json: bool) -> NoReturn:
    if as_json:
        print(
            json.dumps(
                {"error": {"code": exc.code.value, "message": exc.message, "details": exc.details}}
            )
        )
    else:
        err_console.print(f"[bold red]error[/] [{exc.code.value}] {exc.message}")
    raise typer.Exit(2 if exc.code in (ErrorCode.INVALID_PARAMS, ErrorCode.INVALID_CID) else 1)


def _out(value: Any, as_json: bool, human: str | None = None) -> None:
    if as_json or human is None:
        print(json.dumps(value, indent=2, sort_keys=True, default=str))
    else:
        console.print(human)


# ---------------------------------------------------------------------------- node


class _QuietLibp2p(logging.Filter):
    """py-libp2p logs routine events (auto-dial rounds, protocol misses) at INFO and
    ERROR from many loggers with their own levels; keep them to `level`."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("libp2p", "multiaddr")):
            return record.levelno >= self.level
        return True


def _setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(_QuietLibp2p(logging.DEBUG if numeric <= logging.DEBUG else logging.CRITICAL))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # py-libp2p sets its logger to propagate=False with no handler: route it to ours.
    logging.getLogger("libp2p").propagate = True
    for noisy in ("hypercorn", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


@app.command()
def node(
    mode: Annotated[str, typer.Option(help="requester (submit jobs) or compute (run jobs)")],
    data_dir: Annotated[Path | None, typer.Option(help="identity, blocks and job database")] = None,
    listen: Annotated[list[str] | None, typer.Option(help="libp2p listen multiaddr")] = None,
    bootstrap: Annotated[list[str] | None, typer.Option(help="peer multiaddr to dial")] = None,
    rpc_port: Annotated[
        int, typer.Option(help="JSON-RPC port on 127.0.0.1 (0 = any)")
    ] = DEFAULT_RPC_PORT,
    price: Annotated[float, typer.Option(help="compute: price asked per job")] = 1.0,
    bid_window: Annotated[float, typer.Option(help="requester: seconds to collect bids")] = 2.0,
    provider: Annotated[
        list[str] | None, typer.Option(help="compute: restrict execution providers")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run a node until Ctrl-C."""
    if mode not in ("requester", "compute"):
        raise typer.BadParameter("mode must be 'requester' or 'compute'", param_hint="--mode")
    import trio

    from node.service import NodeConfig, run_node

    _setup_logging(log_level)
    config = NodeConfig(
        mode=mode,  # type: ignore[arg-type]
        data_dir=data_dir or default_data_dir() / mode,
        listen=listen or ["/ip4/127.0.0.1/tcp/0"],
        bootstrap=bootstrap or [],
        rpc_port=rpc_port,
        price=price,
        bid_window=bid_window,
        providers=provider or None,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            node_ = await nursery.start(run_node, config)
            info = node_.info()
            print(f"meshrun {info['mode']} node {info['peer_id']}", flush=True)
            for addr in info["listen_addrs"]:
                print(f"  listening on {addr}", flush=True)
            print(f"  JSON-RPC at {info['rpc_url']}", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    logging.getLogger("meshrun.node").info(
                        "got %s, shutting down", signal.Signals(signum).name
                    )
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except OSError as exc:
        err_console.print(f"[bold red]error[/] cannot start the node: {exc}")
        raise typer.Exit(1) from None


# ------------------------------------------------------------------------ devstack


@app.command()
def devstack(
    compute: Annotated[int, typer.Option(help="number of compute nodes")] = 2,
    data_dir: Annotated[Path | None, typer.Option(help="where nodes keep their data")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest as JSON")] = False,
) -> None:
    """Start 1 requester + N compute nodes on loopback; Ctrl-C stops them all."""
    import time

    from node.devstack import Devstack, DevstackError

    root = data_dir or default_data_dir() / "devstack"
    stack = Devstack(root, compute=compute)
    try:
        with console.status(f"starting 1 requester + {compute} compute nodes…"):
            stack.start()
    except DevstackError as exc:
        err_console.print(f"[bold red]error[/] {exc}")
        raise typer.Exit(1) from None
    manifest = stack.manifest()
    if as_json:
        print(json.dumps(manifest, indent=2), flush=True)
    else:
        table = Table(title=f"meshrun devstack ({root / 'devstack.json'})")
        for column in ("name", "peer id", "JSON-RPC", "log"):
            table.add_column(column)
        for n in manifest["nodes"]:
            table.add_row(n["name"], n["peer_id"], n["rpc_url"], n["log"])
        console.print(table)
        console.print("Ctrl-C stops every node.")
    try:
        while stack.alive():
            time.sleep(0.5)
        err_console.print("[bold red]a node exited[/]; stopping the devstack")
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


@app.command()
def demo(
    data_dir: Annotated[Path | None, typer.Option(help="scratch dir (default: a temp dir)")] = None,
    compute: Annotated[int, typer.Option(help="number of compute nodes")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary")] = False,
) -> None:
    """Run one real ONNX job end to end on a fresh local network, and check it."""
    from node.demo import run_demo

    try:
        summary = run_demo(data_dir, compute=compute, console=None if as_json else console)
    except MeshrunError as exc:
        _fail(exc, as_json)
    if as_json:
        print(json.dumps(summary, indent=2))


# -------------------------------------------------------------------------- client


def _rpc_url(explicit: str | None) -> str:
    if explicit:
        return explicit
    if env := os.environ.get("MESHRUN_RPC"):
        return env
    for mode in ("requester", "compute"):
        info = default_data_dir() / mode / "node.json"
        if info.exists():
            try:
                return str(json.loads(info.read_text())["rpc_url"])
            except (ValueError, KeyError):
                pass
    return f"http://127.0.0.1:{DEFAULT_RPC_PORT}/rpc"


RpcOpt = Annotated[str | None, typer.Option("--rpc", help="node JSON-RPC URL [env MESHRUN_RPC]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _client(rpc: str | None, timeout: float = 60.0) -> Client:
    return Client(_rpc_url(rpc), timeout=timeout)


def _job_line(job: dict[str, Any]) -> str:
    parts = [f"job {job['job_id']}: [bold]{job['status']}[/]"]
    if job.get("executor"):
        parts.append(f"executor {job['executor']}")
    if job.get("result_cid"):
        parts.append(f"result {job['result_cid']}")
    if job.get("error"):
        parts.append(f"error [{job['error']['code']}] {job['error']['message']}")
    return "\n  ".join(parts)


@client_app.command("submit")
def client_submit(
    model: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="an .onnx file")],
    input: Annotated[
        Path, typer.Option("--input", exists=True, dir_okay=False, help=".npz inputs")
    ],
    wait: Annotated[bool, typer.Option(help="wait for the job to finish")] = False,
    timeout: Annotated[float, typer.Option(help="job timeout in seconds")] = 60.0,
    max_price: Annotated[float | None, typer.Option(help="highest price to accept")] = None,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store a model and its inputs on your node and submit a job."""
    try:
        with _client(rpc, timeout=timeout + 30) as client:
            model_cid = client.storage_add(model.read_bytes())
            inputs_cid = client.storage_add(input.read_bytes())
            job = client.submit_job(
                model_cid, inputs_cid, timeout_seconds=timeout, max_price=max_price
            )
            if wait:
                with console.status(f"job {job['job_id']} running…") if not as_json else _null():
                    job = client.wait_for_job(job["job_id"], timeout=timeout + 30)
    except MeshrunError as exc:
        _fail(exc, as_json)
    _out(job, as_json, _job_line(job))
    if wait and job["status"] != "completed":
        raise typer.Exit(1)


@client_app.command("status")
def client_status(job_id: str, rpc: RpcOpt = None, as_json: JsonOpt = False) -> None:
    """Show a job's record."""
    try:
        with _client(rpc) as client:
            job = client.get_job(job_id)
    except MeshrunError as exc:
        _fail(exc, as_json)
    _out(job, as_json, _job_line(job))


@client_app.command("events")
def client_events(job_id: str, rpc: RpcOpt = None, as_json: JsonOpt = False) -> None:
    """Show a job's event log."""
    try:
        with _client(rpc) as client:
            result = client.call("job.events", job_id=job_id)
    except MeshrunError as exc:
        _fail(exc, as_json)
    if as_json:
        _out(result, True)
        return
    table = Table(title=f"events of {job_id}")
    for column in ("#", "type", "peer", "data"):
        table.add_column(column)
    for e in result["events"]:
        table.add_row(str(e["seq"]), e["type"], (e["peer"] or "")[-12:], json.dumps(e["data"]))
    console.print(table)


@client_app.command("get")
def client_get(
    cid: str,
    output: Annotated[Path, typer.Option("--output", "-o", help="directory to write into")],
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a file or a result directory by CID from your node."""
    try:
        with _client(rpc) as client:
            try:
                files = client.call("storage.tree", cid=cid)["files"]
            except RpcError as exc:
                if exc.code != ErrorCode.INVALID_CID:
                    raise
                data = client.storage_get(cid)
                files = {cid: base64.b64encode(data).decode()}
    except MeshrunError as exc:
        _fail(exc, as_json)
    written = []
    root = output.resolve()
    for rel, b64 in files.items():
        target = (root / rel).resolve()
        if root not in target.parents:
            err_console.print(f"[red]skipping unsafe path {rel!r}[/]")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(b64))
        written.append(str(target))
    _out({"cid": cid, "files": written}, as_json, f"wrote {len(written)} file(s) under {root}")


@client_app.command("info")
def client_info(rpc: RpcOpt = None, as_json: JsonOpt = False) -> None:
    """Show who the node is and how it is connected."""
    try:
        with _client(rpc) as client:
            info = client.node_info()
    except MeshrunError as exc:
        _fail(exc, as_json)
    _out(
        info,
        as_json,
        f"{info['mode']} node {info['peer_id']}\n  RPC {info['rpc_url']}\n"
        f"  {info['connected_peers']} peer(s), {info['topic_peers']} on the job topic",
    )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
