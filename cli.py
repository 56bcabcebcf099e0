"""`meshrun`: run a node, a whole local network, the demo, and the client verbs.

Client verbs talk to a node only through the SDK client (JSON-RPC), the same
door every user has; `node`, `devstack` and `demo` start processes.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from platformdirs import user_data_dir
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from node.client import ApiModel, Client, NodeEndpoint, RpcError, discover
from protocol.errors import ErrorCode, MeshrunError

app = typer.Typer(
    name="meshrun",
    help="A peer-to-peer compute network for ONNX inference.",
    no_args_is_help=True,
    add_completion=False,
)
GLOBAL_VALUE_OPTIONS = ("--rpc", "--token")
GLOBAL_FLAGS = ("--json",)


class _GlobalOptionsGroup(TyperGroup):
    """`meshrun client`: `--rpc`, `--token` and `--json` go before or after the verb.

    Each is hoisted from anywhere after the verb to the group, whose callback keeps
    it for every verb; a verb's own `--rpc`/`--json` then falls back to it."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(args))


def hoist_global_options(args: list[str]) -> list[str]:
    hoisted: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_VALUE_OPTIONS:
            if "=" in arg:
                hoisted.append(arg)
            else:
                hoisted += args[i : i + 2]
                i += 1
        elif arg in GLOBAL_FLAGS:
            hoisted.append(arg)
        else:
            rest.append(arg)
        i += 1
    return hoisted + rest


client_app = typer.Typer(
    help="Talk to a running node over JSON-RPC.", no_args_is_help=True, cls=_GlobalOptionsGroup
)
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
                {"error": {"code": exc.code.value, "message": exc.message, "details": exc.details}},
                default=_jsonable,
            )
        )
    else:
        err_console.print(f"[bold red]error[/] [{exc.code.value}] {exc.message}")
    raise typer.Exit(2 if exc.code in (ErrorCode.INVALID_PARAMS, ErrorCode.INVALID_CID) else 1)


def _jsonable(value: Any) -> Any:
    """json.dumps' fallback: the SDK's typed results as the JSON the node sent."""
    return value.to_dict() if isinstance(value, ApiModel) else str(value)


def _out(value: Any, as_json: bool, human: str | None = None) -> None:
    if as_json or human is None:
        print(json.dumps(value, indent=2, sort_keys=True, default=_jsonable))
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
    rpc_host: Annotated[
        str, typer.Option(help="JSON-RPC address; non-loopback needs --allow-remote-rpc")
    ] = "127.0.0.1",
    allow_remote_rpc: Annotated[
        bool,
        typer.Option(
            "--allow-remote-rpc",
            help="allow --rpc-host beyond loopback (the token still guards it; add TLS)",
        ),
    ] = False,
    rate_limit: Annotated[
        int, typer.Option(help="RPC/REST calls per minute per client (0 = no limit)")
    ] = 60,
    price: Annotated[float, typer.Option(help="compute: price asked per job")] = 1.0,
    bid_window: Annotated[float, typer.Option(help="requester: seconds to collect bids")] = 2.0,
    provider: Annotated[
        list[str] | None, typer.Option(help="compute: restrict execution providers")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    ipfs_api: Annotated[
        str | None,
        typer.Option(help="also add and pin results on this IPFS daemon (Kubo RPC multiaddr)"),
    ] = None,
    retention_days: Annotated[
        float | None, typer.Option(help="unpin and collect results older than this many days")
    ] = None,
    max_model_bytes: Annotated[
        str, typer.Option(help="largest model DAG to fetch or read (bytes; K/M/G suffixes)")
    ] = "2G",
    max_input_bytes: Annotated[
        str, typer.Option(help="largest inputs DAG to fetch or read (bytes; K/M/G suffixes)")
    ] = "1G",
    max_result_bytes: Annotated[
        str, typer.Option(help="largest result DAG to fetch or read (bytes; K/M/G suffixes)")
    ] = "1G",
    max_job_memory: Annotated[
        str | None,
        typer.Option(
            help="compute: memory one job may use, else it fails RESOURCE_EXHAUSTED "
            "(bytes; K/M/G suffixes; default 4G or half the RAM if less)"
        ),
    ] = None,
    misbehave: Annotated[
        str | None,
        typer.Option(
            help="tests only: a compute node that attacks its peers on purpose as KIND; "
            "refused unless MESHRUN_ALLOW_MISBEHAVE=1 (set by `meshrun devstack --bad`)"
        ),
    ] = None,
    verify: Annotated[
        str,
        typer.Option(
            "--verify",
            help="requester: verification policy of jobs whose submit names none "
            "(none, receipt, redundant:K, sample:P)",
        ),
    ] = "receipt",
    devices: Annotated[
        list[str] | None,
        typer.Option(
            "--devices",
            help="compute: CUDA devices to run jobs on (cuda:N, comma-separated, all, none; "
            "default: every GPU that works)",
        ),
    ] = None,
    cpu_slots: Annotated[
        int | None,
        typer.Option(
            "--cpu-slots",
            help="compute: CPU workers, each with a fair share of the cores "
            "(default: 1 with no GPU, else 0)",
        ),
    ] = None,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue", help="compute: accepted jobs that may wait for a slot; then NoBid BUSY"
        ),
    ] = 16,
    resume_grace: Annotated[
        float,
        typer.Option(
            "--resume-grace",
            help="compute: seconds a finished job's receipt is kept for its requester "
            "to resume after a restart",
        ),
    ] = 300.0,
    metrics_public: Annotated[
        bool,
        typer.Option(
            "--metrics-public",
            help="serve Prometheus /metrics without the RPC token (job counts, peers)",
        ),
    ] = False,
) -> None:
    """Run a node until Ctrl-C."""
    if mode not in ("requester", "compute"):
        raise typer.BadParameter("mode must be 'requester' or 'compute'", param_hint="--mode")
    import trio

    from node.service import NodeConfig, check_compute_config, run_node

    _setup_logging(log_level)
    try:
        config = NodeConfig(
            mode=mode,  # type: ignore[arg-type]
            data_dir=data_dir or default_data_dir() / mode,
            listen=listen or ["/ip4/127.0.0.1/tcp/0"],
            bootstrap=bootstrap or [],
            rpc_host=rpc_host,
            rpc_port=rpc_port,
            price=price,
            bid_window=bid_window,
            providers=provider or None,
            allow_remote_rpc=allow_remote_rpc,
            rate_limit=rate_limit,
            ipfs_api=ipfs_api,
            retention_days=retention_days,
            max_model_bytes=_parse_size(max_model_bytes, "--max-model-bytes"),
            max_input_bytes=_parse_size(max_input_bytes, "--max-input-bytes"),
            max_result_bytes=_parse_size(max_result_bytes, "--max-result-bytes"),
            max_job_memory=(
                _parse_size(max_job_memory, "--max-job-memory") if max_job_memory else None
            ),
            misbehave=misbehave,
            default_verification=verify,
            devices=devices,
            cpu_slots=cpu_slots,
            max_queue=max_queue,
            resume_grace=resume_grace,
            metrics_public=metrics_public,
        )
        _check_ipfs_api(ipfs_api)
        if mode == "compute":
            check_compute_config(config)
    except ValueError as exc:
        err_console.print(f"[bold red]error[/] {exc}")
        raise typer.Exit(2) from None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            node_ = await nursery.start(run_node, config)
            info = node_.info()
            print(f"meshrun {info['mode']} node {info['peer_id']}", flush=True)
            for addr in info["listen_addrs"]:
                print(f"  listening on {addr}", flush=True)
            print(f"  JSON-RPC at {info['rpc_url']}", flush=True)
            print(f"  RPC token in {config.data_dir / 'rpc.token'} (new each start)", flush=True)
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
    bad: Annotated[
        str | None,
        typer.Option(
            help="also start compute nodes that misbehave on purpose, KIND[:N],… (kinds: "
            "wrong-key-receipt, wrong-cids, silent, bid-replay, accept-forward, spec-flood, "
            "dag-bomb-result; wrong results: zeros, perturb, replay; honest noise: noise); "
            "they ask a lower price, so they win jobs"
        ),
    ] = None,
) -> None:
    """Start 1 requester + N compute nodes on loopback; Ctrl-C stops them all."""
    import time

    from node.dev.devstack import Devstack, DevstackError, parse_bad

    root = data_dir or default_data_dir() / "devstack"
    try:
        bad_counts = parse_bad(bad or "")
    except ValueError as exc:
        err_console.print(f"[bold red]error[/] {exc}")
        raise typer.Exit(2) from None
    stack = Devstack(root, compute=compute, bad=bad_counts)
    extra = f" + {sum(bad_counts.values())} misbehaving" if bad_counts else ""

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM and SIGHUP stop the nodes too, as Ctrl-C does

    # Before the first node starts: a signal while they start must stop them as well.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    try:
        try:
            with console.status(f"starting 1 requester + {compute} compute nodes{extra}…"):
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
                name = f"{n['name']} [red](misbehaves)[/]" if n.get("misbehave") else n["name"]
                table.add_row(name, n["peer_id"], n["rpc_url"], n["log"])
            console.print(table)
            console.print("Ctrl-C (or SIGTERM, SIGHUP) stops every node.")
        while stack.alive():
            time.sleep(0.5)
        err_console.print("[bold red]a node exited[/]; stopping the devstack")
    except KeyboardInterrupt:
        pass
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the stop short
        stack.stop()


@app.command()
def testnet(
    hosts: Annotated[
        int, typer.Option(help="hosts (network namespaces); host 0 runs the requester")
    ] = 3,
    rtt_ms: Annotated[float, typer.Option(help="round-trip delay between hosts, ms")] = 0.0,
    loss: Annotated[float, typer.Option(help="per-packet loss between hosts, 0..1")] = 0.0,
    data_dir: Annotated[Path | None, typer.Option(help="where nodes keep their data")] = None,
    nodes: Annotated[bool, typer.Option(help="start a devstack in the hosts")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest as JSON")] = False,
) -> None:
    """Each node in its own Linux network namespace, with real delay, loss and partitions (root)."""
    from node.dev.testnet import testnet_main

    raise typer.Exit(testnet_main(hosts, rtt_ms, loss, data_dir, nodes, as_json))


@app.command()
def demo(
    data_dir: Annotated[Path | None, typer.Option(help="scratch dir (default: a temp dir)")] = None,
    compute: Annotated[int, typer.Option(help="number of compute nodes")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary")] = False,
) -> None:
    """Run one real ONNX job end to end on a fresh local network, and check it."""
    from node.dev.demo import run_demo

    try:
        summary = run_demo(data_dir, compute=compute, console=None if as_json else console)
    except MeshrunError as exc:
        _fail(exc, as_json)
    if as_json:
        print(json.dumps(summary, indent=2))


# -------------------------------------------------------------------------- client


_client_options: dict[str, Any] = {"token": None, "rpc": None, "json": False}


@client_app.callback()
def client_options(
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="RPC token [env MESHRUN_TOKEN; default: the rpc.token next to the "
            "node.json the URL came from]",
            show_default=False,
        ),
    ] = None,
    rpc: Annotated[
        str | None, typer.Option("--rpc", help="node JSON-RPC URL [env MESHRUN_RPC]")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Talk to a running node over JSON-RPC. --rpc, --token and --json go before or
    after the verb."""
    # Reset on every invocation: one process may run the CLI many times (tests, SDK
    # embedding), and an earlier `--json` must not leak into the next call.
    _client_options.update(token=token, rpc=rpc, json=as_json)


def _json(as_json: bool) -> bool:
    """A verb's --json, or the one given to `meshrun client` itself."""
    return as_json or bool(_client_options["json"])


def _endpoint(explicit: str | None) -> NodeEndpoint:
    """URL: --rpc, $MESHRUN_RPC, the node.json of a default data dir, the default port.
    Token: --token, $MESHRUN_TOKEN, the rpc.token beside the node.json of that URL."""
    return discover(
        explicit or _client_options["rpc"],
        _client_options["token"],
        data_dirs=[default_data_dir() / mode for mode in ("requester", "compute")],
    )


def _rpc_url(explicit: str | None) -> str:
    return _endpoint(explicit).url


RpcOpt = Annotated[str | None, typer.Option("--rpc", help="node JSON-RPC URL [env MESHRUN_RPC]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
ForceOpt = Annotated[
    bool, typer.Option("--force", "-f", "--yes", "-y", help="do not ask for confirmation")
]
JobIdOpt = Annotated[
    str | None, typer.Option("--job-id", help="the job id (instead of the argument)")
]


def _confirm(question: str, force: bool, as_json: bool) -> None:
    """Ask before a destructive verb unless --force/--yes. With no terminal, the answer
    is read from stdin (`echo y | …`); no answer, or anything but y/yes, refuses."""
    if force:
        return
    if sys.stdin.isatty():
        if not typer.confirm(question, err=True):
            _refuse_unconfirmed(question, as_json)
        return
    err_console.print(f"{question} [y/N] (reading the answer from stdin)", highlight=False)
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        _refuse_unconfirmed(question, as_json, answer)


def _refuse_unconfirmed(question: str, as_json: bool, answer: str | None = None) -> NoReturn:
    heard = "no answer" if not answer else f"the answer {answer!r}"
    _fail(
        MeshrunError(
            ErrorCode.CANCELED,
            f"not done: {question.rstrip('?')} was not confirmed ({heard}); "
            "answer y, or pass --yes/--force",
            {"confirmed": False},
        ),
        as_json,
    )


def _job_id(positional: str | None, option: str | None) -> str:
    """The job id, given as the argument or as --job-id (the AITBC seed's spelling)."""
    if positional and option and positional != option:
        raise typer.BadParameter(f"two different job ids: {positional!r} and --job-id {option!r}")
    job_id = positional or option
    if not job_id:
        raise typer.BadParameter("give the job id, as an argument or with --job-id")
    return job_id


def _client(rpc: str | None, timeout: float = 60.0) -> Client:
    endpoint = _endpoint(rpc)
    return Client(endpoint.url, endpoint.token, timeout=timeout)


def _job_line(job: Mapping[str, Any] | ApiModel) -> str:
    parts = [f"job {job['job_id']}: [bold]{job['status']}[/]"]
    if job.get("executor"):
        parts.append(f"executor {job['executor']}")
    if job.get("result_cid"):
        parts.append(f"result {job['result_cid']}")
    if job.get("error"):
        parts.append(f"error [{job['error']['code']}] {job['error']['message']}")
    if job.get("verification"):
        parts.append(_verification_line(job["verification"]))
    return "\n  ".join(parts)


def _verification_line(summary: Mapping[str, Any]) -> str:
    text = f"verification {summary.get('policy')}"
    if summary.get("decision"):
        text += f": {summary['decision']}"
    if summary.get("audited") is not None:
        text += ", audited" if summary["audited"] else ", not audited"
    for key in ("agreed", "disputed"):
        if summary.get(key):
            text += f", {len(summary[key])} {key}"
    if summary.get("max_abs_diff") is not None:
        text += f", max |Δ| {summary['max_abs_diff']:.3g}"
    return text


@client_app.command("submit")
def client_submit(
    model: Annotated[
        str,
        typer.Argument(
            help="an .onnx file or a catalog model name (with --input); without --input, "
            "a text prompt (refused: prompt jobs are not supported yet)",
            metavar="MODEL|PROMPT",
        ),
    ],
    input: Annotated[
        Path | None,
        typer.Option("--input", exists=True, dir_okay=False, help=".npz inputs"),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model", help="prompt jobs: the model's catalog name")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="prompt jobs: most tokens to generate")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="prompt jobs: sampling temperature")
    ] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="prompt jobs: nucleus")] = None,
    stream: Annotated[
        bool | None, typer.Option("--stream/--no-stream", help="prompt jobs: stream tokens")
    ] = None,
    wait: Annotated[bool, typer.Option(help="wait for the job to finish")] = False,
    timeout: Annotated[float, typer.Option(help="job timeout in seconds")] = 60.0,
    max_price: Annotated[float | None, typer.Option(help="highest price to accept")] = None,
    priority: Annotated[str, typer.Option(help="low, normal, high or urgent")] = "normal",
    provider: Annotated[
        str, typer.Option(help="required provider: any, cpu, cuda, tensorrt")
    ] = "any",
    gpu_count: Annotated[int, typer.Option(help="GPUs the executor must have")] = 0,
    min_vram_gb: Annotated[float, typer.Option(help="GPU memory the executor must have")] = 0.0,
    batch_chunk: Annotated[
        int | None, typer.Option(help="run the batch in slices (progress)")
    ] = None,
    output: Annotated[
        list[str] | None, typer.Option("--output-name", help="outputs to keep")
    ] = None,
    verify: Annotated[
        str | None,
        typer.Option(
            "--verify",
            help="how the result is checked: none, receipt, redundant:K (K executors "
            "must agree) or sample:P (re-run elsewhere with probability P) "
            "[default: the node's --verify]",
            show_default=False,
        ),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(help="how executors' outputs are compared: values, argmax or topk"),
    ] = None,
    atol: Annotated[float | None, typer.Option(help="values: absolute tolerance")] = None,
    rtol: Annotated[float | None, typer.Option(help="values: relative tolerance")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="topk: how many classes")] = None,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store a model and its inputs on your node and submit a job.

    `submit "PROMPT" --model NAME --max-tokens N --temperature T` (the AITBC form) is
    sent as a prompt job, which the node refuses with UNSUPPORTED: meshrun runs ONNX
    models on .npz inputs and has no text-generation executor yet."""
    as_json = _json(as_json)
    if input is None:
        _submit_prompt(
            model, model_name, rpc, as_json,
            {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
             "stream": stream},
        )  # fmt: skip
        return
    if model_name is not None:
        raise typer.BadParameter(
            "with --input, name the model as the argument (a file or catalog name), "
            "not with --model",
            param_hint="--model",
        )
    params: dict[str, Any] = {"batch_chunk": batch_chunk} if batch_chunk else {}
    given = {"mode": compare, "atol": atol, "rtol": rtol, "k": top_k}
    tolerance = {key: value for key, value in given.items() if value is not None}
    checking: dict[str, Any] = {"verification": verify} if verify is not None else {}
    if tolerance:
        checking["tolerance"] = tolerance
    model_path = Path(model)
    try:
        with _client(rpc, timeout=timeout + 30) as client:
            if model_path.is_file():
                chosen = {"model_cid": client.storage_add(model_path.read_bytes())}
            else:
                chosen = {"model": model}
            inputs_cid = client.storage_add(input.read_bytes())
            job = client.call(
                "job.submit",
                **chosen,
                inputs_cid=inputs_cid,
                timeout_seconds=timeout,
                max_price=max_price,
                priority=priority,
                params=params,
                requirements={
                    "provider": provider,
                    "gpu_count": gpu_count,
                    "min_vram_gb": min_vram_gb,
                },
                output_config={"outputs": output or []},
                **checking,
            )
            if wait:
                job = _watch(client, job["job_id"], show=not as_json, timeout=timeout + 30)
    except MeshrunError as exc:
        _fail(exc, as_json)
    _out(job, as_json, _job_line(job))
    if wait and job["status"] != "completed":
        raise typer.Exit(1)


def _submit_prompt(
    prompt: str,
    model: str | None,
    rpc: str | None,
    as_json: bool,
    knobs: Mapping[str, Any],
) -> None:
    """Send a prompt job as job.submit params; the node answers (UNSUPPORTED today)."""
    params = {key: value for key, value in knobs.items() if value is not None}
    try:
        with _client(rpc) as client:
            job = client.call("job.submit", prompt=prompt, model=model, params=params)
    except MeshrunError as exc:
        _fail(exc, as_json)
    _out(job, as_json, _job_line(job))


@client_app.command("status")
def client_status(
    job_id: Annotated[str | None, typer.Argument(show_default=False)] = None,
    job_id_opt: JobIdOpt = None,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a job's record."""
    as_json = _json(as_json)
    job_id = _job_id(job_id, job_id_opt)
    try:
        with _client(rpc) as client:
            job = client.get_job(job_id)
    except MeshrunError as exc:
        _fail(exc, as_json)
    _out(job, as_json, _job_line(job))


@client_app.command("events")
def client_events(
    job_id: Annotated[str | None, typer.Argument(show_default=False)] = None,
    job_id_opt: JobIdOpt = None,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a job's event log."""
    as_json = _json(as_json)
    job_id = _job_id(job_id, job_id_opt)
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
    cid: Annotated[
        str | None,
        typer.Argument(help="a CID, or a job id (its result)", show_default=False),
    ] = None,
    job_id_opt: JobIdOpt = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="directory to write into (else: show the job)"),
    ] = None,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a file or a result directory by CID, or a job's result by its job id.

    Without --output, a job id shows the job's details (as `status`)."""
    as_json = _json(as_json)
    target = _job_id(cid, job_id_opt)
    try:
        with _client(rpc) as client:
            job = _find_job(client, target)
            if output is None:
                if job is None:
                    raise MeshrunError(
                        ErrorCode.INVALID_PARAMS,
                        f"{target} is not a job on this node; give --output DIR to fetch a CID",
                    )
                _out(job, as_json, _job_line(job))
                return
            cid = target
            if job is not None:
                if not job.get("result_cid"):
                    raise MeshrunError(
                        ErrorCode.JOB_NOT_FINISHED,
                        f"job {target} has no result (status {job['status']})",
                        {"job_id": target, "status": job["status"]},
                    )
                cid = str(job["result_cid"])
            try:
                _ensure_local(client, cid)  # here, else mesh providers, else the IPFS daemon
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
        target_path = (root / rel).resolve()
        if root not in target_path.parents:
            err_console.print(f"[red]skipping unsafe path {rel!r}[/]")
            continue
        target_path.parent.mkdir(parents=True, exist_ok=True)
        target_path.write_bytes(base64.b64decode(b64))
        written.append(str(target_path))
    summary: dict[str, Any] = {"cid": cid, "files": written}
    if job is not None:
        summary["job_id"] = target
    _out(summary, as_json, f"wrote {len(written)} file(s) of {cid} under {root}")


def _find_job(client: Client, target: str) -> Mapping[str, Any] | ApiModel | None:
    """The job whose id is `target`, or None when it names no job here (a job id is a
    CID too: the spec's)."""
    try:
        return client.get_job(target)
    except RpcError as exc:
        if exc.code in (ErrorCode.JOB_NOT_FOUND, ErrorCode.INVALID_PARAMS):
            return None
        raise


@client_app.command("info")
def client_info(rpc: RpcOpt = None, as_json: JsonOpt = False) -> None:
    """Show who the node is and how it is connected."""
    as_json = _json(as_json)
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


def _counts_line(counts: Mapping[str, int]) -> str:
    return " ".join(f"{name.replace('_', ' ')} {n}" for name, n in counts.items() if n)


@client_app.command("peers")
def client_peers(
    role: Annotated[
        str | None, typer.Option(help="only peers seen as executor or as requester")
    ] = None,
    limit: Annotated[int, typer.Option(help="most records to show, latest first")] = 100,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show connected peers and what this node knows of each one's past."""
    as_json = _json(as_json)
    if role not in (None, "executor", "requester"):
        raise typer.BadParameter("role must be 'executor' or 'requester'", param_hint="--role")
    try:
        with _client(rpc) as client:
            peers = client.node_peers(limit=limit, role=role)
    except MeshrunError as exc:
        _fail(exc, as_json)
    if as_json:
        _out(peers, True)
        return
    records = peers.get("reputation", [])
    title = (
        f"{len(peers['peers'])} connected, {len(peers['topic_peers'])} on the job topic; "
        f"{peers.get('known', len(records))} known"
    )
    table = Table(title=title)
    for column in ("peer", "role", "score", "why", "counts", "latency"):
        table.add_column(column)
    for p in records:
        latency = p.get("latency")
        score = f"{p['score']:.2f}"
        table.add_row(
            "…" + p["peer"][-12:],
            p["role"],
            f"[red]{score}[/]" if p.get("excluded_until") else score,
            p["why"],
            _counts_line(p.get("counts") or {}),
            "" if latency is None else f"{latency:.2f}s",
        )
    console.print(table)


TERMINAL = ("completed", "failed", "timeout", "canceled")


def _watch(
    client: Client, job_id: str, show: bool, timeout: float = 3600.0
) -> Mapping[str, Any] | ApiModel:
    """Follow a job to its end, with a live progress bar when a person is watching.

    Uses the node's live event stream when the client offers one, else polls.
    """
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    job = client.get_job(job_id)
    plain = show and not err_console.is_terminal  # piped or logged: one line per change
    last_line: list[tuple[Any, ...]] = []

    def line(j: Mapping[str, Any] | ApiModel) -> None:
        progress = j.get("progress")
        key = (j["status"], j.get("substate"), None if progress is None else int(progress))
        if last_line and last_line[-1] == key:
            return
        last_line.append(key)
        when = time.strftime("%H:%M:%S")
        pct = "" if key[2] is None else f" {key[2]}%"
        step = f" {key[1]}" if key[1] else ""
        print(f"{when} {job_id} {key[0]}{step}{pct}", flush=True)

    with Progress(
        TextColumn("[bold]{task.fields[status]}[/] {task.fields[substate]}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not show or plain,
        transient=False,
    ) as bar:
        task = bar.add_task("job", total=100, status=job["status"], substate="")

        def draw(j: Mapping[str, Any] | ApiModel) -> None:
            if plain:
                line(j)
            bar.update(
                task,
                completed=j.get("progress") or 0,
                status=j["status"],
                substate=j.get("substate") or "",
            )

        draw(job)
        stream = getattr(client, "stream_status", None)
        if stream is not None and job["status"] not in TERMINAL:
            try:
                for event in stream(job_id):
                    draw(
                        {
                            **job,
                            **{
                                k: event[k]
                                for k in ("status", "substate", "progress")
                                if k in event
                            },
                        }
                    )
                    if event.get("status") in TERMINAL or time.monotonic() > deadline:
                        break
            except MeshrunError:
                pass  # fall back to polling below
        while True:
            job = client.get_job(job_id)
            draw(job)
            if job["status"] in TERMINAL or time.monotonic() > deadline:
                return job
            time.sleep(1.0)  # a default node allows 60 calls a minute


@client_app.command("watch")
def client_watch(
    job_id: Annotated[str | None, typer.Argument(show_default=False)] = None,
    job_id_opt: JobIdOpt = None,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow a job live until it ends: a progress bar on a terminal, else one line
    per change (status, step or whole percent)."""
    as_json = _json(as_json)
    job_id = _job_id(job_id, job_id_opt)
    try:
        with _client(rpc) as client:
            job = _watch(client, job_id, show=not as_json)
    except MeshrunError as exc:
        _fail(exc, as_json)
    _out(job, as_json, _job_line(job))
    if job["status"] != "completed":
        raise typer.Exit(1)


def _parse_when(value: str | None) -> float | None:
    """Unix seconds or an ISO-8601 date/time (UTC unless it says otherwise)."""
    if value is None:
        return None
    from datetime import UTC, datetime

    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither unix seconds nor ISO-8601") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _when(ts: float | None) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


@client_app.command("list")
def client_list(
    status: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
    days: Annotated[float | None, typer.Option(help="only the last N days")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="since (ISO-8601 or unix)")] = None,
    to: Annotated[str | None, typer.Option(help="until (ISO-8601 or unix)")] = None,
    limit: Annotated[int, typer.Option(help="page size")] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page")] = None,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    as_json = _json(as_json)
    params: dict[str, Any] = {"limit": limit}
    for key, value in (
        ("status", status),
        ("days", days),
        ("cursor", cursor),
        ("from_time", _parse_when(from_)),
        ("to_time", _parse_when(to)),
    ):
        if value is not None:
            params[key] = value
    try:
        with _client(rpc) as client:
            page = client.call("job.list", **params)
    except MeshrunError as exc:
        _fail(exc, as_json)
    if as_json:
        _out(page, True)
        return
    table = Table(title=f"{page['total']} job(s)")
    for column in ("job id", "status", "executor", "created (UTC)", "took", "result"):
        table.add_column(column)
    for j in page["jobs"]:
        took = ""
        if j.get("completed_at"):
            took = f"{j['completed_at'] - j['created_at']:.2f}s"
        table.add_row(
            j["job_id"],
            j["status"],
            (j.get("executor") or "")[-12:],
            _when(j["created_at"]),
            took,
            j.get("result_cid") or "",
        )
    console.print(table)
    if page["has_more"]:
        console.print(f"more: --cursor {page['next_cursor']}")


client_app.command("jobs", help="List jobs, newest first (alias of `list`).")(client_list)


# --------------------------------------------------------------------------- models


model_app = typer.Typer(help="Name models in your node's catalog: `submit NAME` resolves them.")
client_app.add_typer(model_app, name="model")


@model_app.command("add")
def client_model_add(
    name: Annotated[str, typer.Argument(help="the catalog name, e.g. resnet50 or mlp:v2")],
    source: Annotated[
        str, typer.Argument(help="an .onnx file to store, or the CID of a stored model")
    ],
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name a model: store an .onnx file (or take a CID already stored) under NAME."""
    as_json = _json(as_json)
    path = Path(source)
    try:
        with _client(rpc, timeout=300) as client:
            if path.is_file():
                data = base64.b64encode(path.read_bytes()).decode()
                result = client.call("model.add", name=name, data_b64=data)
            else:
                result = client.call("model.add", name=name, cid=source)
    except MeshrunError as exc:
        _fail(exc, as_json)
    _out(result, as_json, f"model {result['name']} = {result['cid']}")


@model_app.command("list")
def client_model_list(rpc: RpcOpt = None, as_json: JsonOpt = False) -> None:
    """The node's model catalog."""
    as_json = _json(as_json)
    try:
        with _client(rpc) as client:
            result = client.call("model.list")
    except MeshrunError as exc:
        _fail(exc, as_json)
    if as_json:
        _out(result, True)
        return
    table = Table(title=f"{len(result['models'])} model(s)")
    for column in ("name", "cid", "added (UTC)"):
        table.add_column(column)
    for m in result["models"]:
        table.add_row(m["name"], m["cid"], _when(m.get("added_at")))
    console.print(table)


def _result_files(
    client: Client, job_id: str
) -> tuple[Mapping[str, Any] | ApiModel, dict[str, bytes]]:
    job = client.get_job(job_id)
    if not job.get("result_cid"):
        raise MeshrunError(
            ErrorCode.JOB_NOT_FINISHED, f"job {job_id} has no result (status {job['status']})"
        )
    tree = client.call("storage.tree", cid=job["result_cid"])["files"]
    return job, {path: base64.b64decode(b64) for path, b64 in tree.items()}


@client_app.command("download")
def client_download(
    job_id: Annotated[str | None, typer.Argument(show_default=False)] = None,
    job_id_opt: JobIdOpt = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="directory, or a .zip file [default: job_<id>/]"),
    ] = None,
    checksum: Annotated[
        bool,
        typer.Option(
            "--checksum", help="also check every file against output.sha256 (exit 1 if not)"
        ),
    ] = False,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a job's result package: the files, an output.sha256 for `sha256sum -c`,
    and meshrun/ (signed spec, receipts, verification summary) for `client verify DIR`."""
    as_json = _json(as_json)
    job_id = _job_id(job_id, job_id_opt)
    output = output or Path(f"job_{job_id}")
    import zipfile

    from protocol.package import PackageError, assemble

    try:
        with _client(rpc) as client:
            job, files = _result_files(client, job_id)
        extras = _package_extras(job)
        package = assemble(files, extras)
        if output.suffix != ".zip":
            _check_download_dir(output, job_id)
    except PackageError as exc:
        _fail(MeshrunError(ErrorCode.VERIFICATION_MISMATCH, str(exc)), as_json)
    except MeshrunError as exc:
        _fail(exc, as_json)
    if not extras:
        err_console.print(
            "[yellow]the node sent no signed spec or receipt: this package cannot be "
            "verified offline[/]"
        )
    if output.suffix == ".zip":
        output.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
            for path, data in sorted(package.items()):
                archive.writestr(path, data)
        where = str(output)
    else:
        root = output.resolve()
        for path, data in package.items():
            target = (root / path).resolve()
            if root not in target.parents:
                err_console.print(f"[red]skipping unsafe path {path!r}[/]")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        where = str(root)
    summary: dict[str, Any] = {
        "job_id": job_id,
        "result_cid": job["result_cid"],
        "output": where,
        "files": sorted(files),
        "verifiable_offline": bool(extras),
    }
    if checksum:
        bad = _checksum_failures(package)
        summary["checksum_ok"] = not bad
        summary["checksum_failures"] = bad
    _out(
        summary,
        as_json,
        f"wrote {len(files)} file(s) of {job['result_cid']} to {where}"
        + (f"; check it with `meshrun client verify {where}`" if extras else "")
        + (
            ""
            if not checksum
            else "\nchecksums: all match output.sha256"
            if not summary["checksum_failures"]
            else f"\nchecksums: MISMATCH {', '.join(summary['checksum_failures'])}"
        ),
    )
    if checksum and summary["checksum_failures"]:
        raise typer.Exit(1)


def _checksum_failures(package: Mapping[str, bytes]) -> list[str]:
    """Files whose sha256 differs from output.sha256's line (or that it lists but lack)."""
    import hashlib

    listing = package.get("output.sha256")
    if listing is None:
        return ["output.sha256 (missing)"]
    bad = []
    for line in listing.decode(errors="replace").splitlines():
        digest, _, path = line.partition("  ")
        data = package.get(path.strip())
        if data is None or hashlib.sha256(data).hexdigest() != digest.strip():
            bad.append(path.strip())
    return bad


def _package_extras(job: Mapping[str, Any] | ApiModel) -> dict[str, bytes]:
    """The meshrun/ files, or none when the node predates signed specs in job.get."""
    from protocol.package import package_extras

    spec, receipt = job.get("spec_envelope_b64"), job.get("receipt_envelope_b64")
    if not (spec and receipt and job.get("executor")):
        return {}
    return package_extras(
        job_id=job["job_id"],
        result_cid=job["result_cid"],
        spec_envelope=base64.b64decode(spec),
        executor=job["executor"],
        receipt_envelope=base64.b64decode(receipt),
        verification=job.get("verification"),
    )


def _check_download_dir(output: Path, job_id: str) -> None:
    """Refuse to mix two packages: stray files would fail (or confuse) `client verify`.
    Downloading the same job again over its own package is fine."""
    from protocol.package import INDEX_PATH

    if not output.is_dir() or not any(output.iterdir()):
        return
    try:
        same = json.loads((output / INDEX_PATH).read_text()).get("job_id") == job_id
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS,
            f"{output} is not empty; download into a new directory or a .zip",
            {"output": str(output)},
        )


def _read_package(path: Path) -> dict[str, bytes]:
    """A downloaded package's files by relative path; symlinks are refused, not followed."""
    from protocol.package import MAX_PACKAGE_BYTES, PackageError, read_zip

    if not path.is_dir():
        with path.open("rb") as stream:
            return read_zip(stream)
    files: dict[str, bytes] = {}
    total = 0
    for folder, dirs, names in os.walk(path):
        for name in [*dirs, *names]:
            if (Path(folder) / name).is_symlink():
                rel = (Path(folder) / name).relative_to(path).as_posix()
                raise PackageError(f"refusing {rel!r}: a symlink")
        for name in names:
            file = Path(folder) / name
            total += file.stat().st_size
            if total > MAX_PACKAGE_BYTES:
                raise PackageError(f"the package holds more than {MAX_PACKAGE_BYTES} bytes")
            files[file.relative_to(path).as_posix()] = file.read_bytes()
    return files


def _verify_offline(path: Path, as_json: bool) -> None:
    from crypto.envelope import open_envelope
    from protocol.package import PackageError, Verdict, verify_package
    from protocol.receipts import Check
    from storage.cid import cid_for_raw
    from storage.digest import digest_tree

    try:
        files = _read_package(path)
    except (PackageError, OSError) as exc:
        verdict = Verdict(checks=[Check("package readable", False, str(exc))])
    else:
        verdict = verify_package(
            files,
            open_envelope=open_envelope,
            cid_of=lambda data: str(cid_for_raw(data)),
            digest_tree=digest_tree,
        )
    _print_checks({"package": str(path), **verdict.to_json()}, verdict.checks, as_json)


def _print_checks(report: dict[str, Any], checks: list[Any], as_json: bool) -> None:
    passed = bool(checks) and all(c.ok for c in checks)
    if as_json:
        _out({**report, "verified": passed}, True)
    else:
        for c in checks:
            mark = "[green]✓[/]" if c.ok else "[red]✗[/]"
            console.print(f"{mark} {c.name}: {c.detail}", highlight=False)
        console.print("[bold green]verified[/]" if passed else "[bold red]NOT verified[/]")
    if not passed:
        raise typer.Exit(1)


@client_app.command("verify")
def client_verify(
    target: Annotated[
        str | None,
        typer.Argument(
            help="a job id (checked against your node), or a downloaded package "
            "(directory or .zip, checked offline with no node)",
            metavar="JOB_ID|DIR|ZIP",
            show_default=False,
        ),
    ] = None,
    job_id_opt: JobIdOpt = None,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check signatures, CIDs, the result's re-hash and every output checksum, locally."""
    as_json = _json(as_json)
    target = _job_id(target, job_id_opt)
    if Path(target).exists():
        _verify_offline(Path(target), as_json)
        return
    from crypto.envelope import open_envelope
    from protocol.messages import Receipt
    from protocol.receipts import Check, receipt_checks, result_checks
    from storage.digest import digest_tree

    job_id = target
    checks: list[Check] = []
    try:
        with _client(rpc) as client:
            job, files = _result_files(client, job_id)
        envelope = job.get("receipt_envelope_b64")
        if not envelope:
            raise MeshrunError(ErrorCode.JOB_NOT_FINISHED, f"job {job_id} has no receipt")
        opened = open_envelope(base64.b64decode(envelope), Receipt)
        receipt = opened.message
        assert isinstance(receipt, Receipt)
        checks.append(Check("receipt signature", True, f"Ed25519 by {opened.signer}"))
        checks += receipt_checks(
            receipt,
            signer=opened.signer,
            executor=job["executor"],
            job_id=job_id,
            model_cid=job["model_cid"],
            inputs_cid=job["inputs_cid"],
        )
        rebuilt, digests = digest_tree(files)
        checks += result_checks(
            receipt, rebuilt_cid=rebuilt, file_digests=digests, recorded_cid=job["result_cid"]
        )
    except MeshrunError as exc:
        if exc.code in (ErrorCode.SIGNATURE_INVALID, ErrorCode.MALFORMED_MESSAGE):
            checks.append(Check("receipt signature", False, exc.message))
        else:
            _fail(exc, as_json)
    _print_checks({"job_id": job_id, "checks": [c.to_json() for c in checks]}, checks, as_json)


@client_app.command("cancel")
def client_cancel(
    job_id: Annotated[str | None, typer.Argument(show_default=False)] = None,
    job_id_opt: JobIdOpt = None,
    force: ForceOpt = False,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job; a running executor is told to stop. Asks first (from stdin when
    it is not a terminal) unless --yes/--force."""
    as_json = _json(as_json)
    job_id = _job_id(job_id, job_id_opt)
    _confirm(f"Cancel job {job_id}?", force, as_json)
    try:
        with _client(rpc) as client:
            job = client.call("job.cancel", job_id=job_id, force=force)
    except MeshrunError as exc:
        _fail(exc, as_json)
    _out(job, as_json, _job_line(job))


@client_app.command("export")
def client_export(
    format: Annotated[str, typer.Option("--format", help="json or csv")] = "json",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="file (default: stdout)")
    ] = None,
    status: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
    days: Annotated[float | None, typer.Option(help="only the last N days")] = None,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export job history as JSON or CSV. With --json: `{format, count, content}` on
    stdout, or with --output the file's summary `{file, format, count}`."""
    as_json = _json(as_json)
    params: dict[str, Any] = {"format": format}
    if status:
        params["status"] = status
    if days:
        params["days"] = days
    try:
        with _client(rpc) as client:
            result = client.call("job.export", **params)
    except MeshrunError as exc:
        _fail(exc, as_json)
    content = result["content"]
    text = content if isinstance(content, str) else json.dumps(content, indent=2, default=str)
    if output is None:
        if as_json:
            _out(result, True)
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        output.write_text(text)
        summary = {"file": str(output), "format": result["format"], "count": result["count"]}
        if as_json:
            _out(summary, True)
        else:
            err_console.print(f"wrote {result['count']} job(s) to {output}")


@client_app.command("stats")
def client_stats(
    days: Annotated[float | None, typer.Option(help="only the last N days")] = None,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Totals, success rate, average completion time and amount spent."""
    as_json = _json(as_json)
    try:
        with _client(rpc) as client:
            stats = client.call("job.stats", **({"days": days} if days else {}))
    except MeshrunError as exc:
        _fail(exc, as_json)
    rate = stats["success_rate"]
    avg = stats["average_completion_seconds"]
    counts = ", ".join(f"{n} {s}" for s, n in sorted(stats["by_status"].items()))
    lines = [
        f"{stats['total']} job(s): {counts}",
        f"success rate {rate:.1%}" if rate is not None else "success rate n/a",
        f"average completion {avg:.2f}s" if avg else "average completion n/a",
        f"total spent {stats['total_spent']:g}",
    ]
    _out(stats, as_json, "\n".join(lines))


@client_app.command("delete")
def client_delete(
    job_id: Annotated[str | None, typer.Argument(show_default=False)] = None,
    job_id_opt: JobIdOpt = None,
    force: ForceOpt = False,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a finished job and its result blocks from your node (asks first, as cancel)."""
    as_json = _json(as_json)
    job_id = _job_id(job_id, job_id_opt)
    _confirm(f"Delete job {job_id} and its results?", force, as_json)
    try:
        with _client(rpc) as client:
            result = client.call("job.delete", job_id=job_id)
    except MeshrunError as exc:
        _fail(exc, as_json)
    _out(result, as_json, f"deleted job {job_id} ({result['blocks_removed']} block(s) removed)")


# ------------------------------------------------------------------------ earnings


earnings_app = typer.Typer(
    help="What a compute node earned: settled totals, unsettled jobs, a verifiable export."
)
client_app.add_typer(earnings_app, name="earnings")

EARNINGS_PAGE = 500


@earnings_app.callback(invoke_without_command=True)
def client_earnings(
    ctx: typer.Context,
    days: Annotated[float | None, typer.Option(help="only settlements of the last N days")] = None,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            metavar="FILE",
            help="write every settlement as a JSON line to FILE "
            "(check it offline with `meshrun client earnings verify FILE`)",
        ),
    ] = None,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Settled earnings by day and by requester, and completed jobs not settled yet."""
    as_json = _json(as_json)
    if ctx.invoked_subcommand is not None:
        return
    try:
        with _client(rpc) as client:
            if export is not None:
                count = _export_earnings(client, export, days)
                _out(
                    {"file": str(export), "count": count},
                    as_json,
                    f"wrote {count} settlement(s) to {export}",
                )
                return
            earnings = client.node_earnings(days=days)
    except MeshrunError as exc:
        _fail(exc, as_json)
    except OSError as exc:
        err_console.print(f"[bold red]error[/] cannot write {export}: {exc}")
        raise typer.Exit(1) from None
    if as_json:
        _out(earnings, True)
        return
    for title, key, first in (
        ("earnings by day (UTC)", "by_day", "day"),
        ("earnings by requester", "by_requester", "requester"),
    ):
        rows = earnings[key]
        if rows:
            table = Table(title=title)
            for column in (first, "jobs", "amount"):
                table.add_column(column, justify="left" if column == first else "right")
            for row in rows:
                table.add_row(str(row[first]), str(row["jobs"]), f"{row['amount']:g}")
            console.print(table)
    unsettled = earnings["unsettled"]
    if unsettled:
        table = Table(title="completed, not settled yet")
        for column in ("job", "requester", "price", "completed"):
            table.add_column(column)
        for job in unsettled[:50]:
            price = job.get("price")
            done = job.get("completed_at")
            table.add_row(
                job["job_id"],
                job.get("requester") or "",
                "" if price is None else f"{price:g}",
                _when(done),
            )
        console.print(table)
    disputed = earnings["disputed_jobs"]
    console.print(
        f"earned [bold]{earnings['total']:g}[/] from {earnings['settled_jobs']} settled job(s)"
        + (f" ({disputed} disputed, paid 0)" if disputed else "")
        + f"; {earnings['unsettled_jobs']} job(s) worth {earnings['unsettled_amount']:g}"
        + " not settled yet"
    )


def _export_earnings(client: Client, path: Path, days: float | None) -> int:
    """Every received settlement, page by page, one JSON object a line."""
    count = 0
    cursor: int | None = 0
    tmp = path.with_name(path.name + ".part")
    try:
        with tmp.open("w") as out:
            while cursor is not None:
                page = client.earnings_export(days=days, cursor=cursor, limit=EARNINGS_PAGE)
                for line in page["lines"]:
                    out.write(json.dumps(line, sort_keys=True) + "\n")
                count += len(page["lines"])
                cursor = page.get("next_cursor")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


@earnings_app.command("verify")
def client_earnings_verify(
    file: Annotated[Path, typer.Argument(help="an export of `meshrun client earnings --export`")],
    as_json: JsonOpt = False,
) -> None:
    """Check an earnings export offline: each line's signature, key and fields.

    A line holds when its settlement is signed with the key its requester's PeerID
    embeds and every field equals the signed one; each failing line is named, and
    any failure exits 1. No node is needed.
    """
    as_json = _json(as_json)
    from crypto.envelope import open_envelope
    from protocol.messages import Settlement
    from protocol.settlement import MAX_SETTLEMENT_BYTES, verify_line

    def opener(data: bytes) -> Any:
        return open_envelope(data, Settlement, MAX_SETTLEMENT_BYTES)

    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        err_console.print(f"[bold red]error[/] cannot read {file}: {exc}")
        raise typer.Exit(2) from None
    results: list[dict[str, Any]] = []
    total = 0.0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        checks = verify_line(line, opener)
        failed = [c.to_json() for c in checks if not c.ok]
        try:
            fields = json.loads(line)
        except ValueError:
            fields = {}
        fields = fields if isinstance(fields, dict) else {}
        if not failed:
            total += float(fields["price"])
        results.append(
            {"line": number, "ok": not failed, "job_id": fields.get("job_id"), "failed": failed}
        )
    bad = [r for r in results if not r["ok"]]
    summary = {
        "file": str(file),
        "lines": len(results),
        "verified": len(results) - len(bad),
        "total": round(total, 9),
        "failures": bad,
    }
    if as_json:
        _out(summary, True)
    else:
        for r in bad:
            what = "; ".join(f"{c['check']} ({c['detail']})" for c in r["failed"])
            err_console.print(f"[red]✗[/] line {r['line']} (job {r['job_id']}): {what}")
        mark = "[bold green]verified[/]" if not bad else "[bold red]NOT verified[/]"
        console.print(f"{mark}: {summary['verified']}/{summary['lines']} line(s), total {total:g}")
    if bad:
        raise typer.Exit(1)


# ------------------------------------------------------------------ IPFS content


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _parse_size(text: str, option: str) -> int:
    """Bytes from "1073741824", "512M", "2G" or "2GiB" (units are powers of 1024)."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (raw[:-1], raw[-1]) if raw[-1:] in ("K", "M", "G", "T") else (raw, "")
    try:
        value = int(float(number) * _SIZE_UNITS[unit])
    except (ValueError, OverflowError):
        raise ValueError(f"{option}: {text!r} is not a size (e.g. 1073741824, 512M, 2G)") from None
    if value <= 0:
        raise ValueError(f"{option} must be > 0")
    return value


def _check_ipfs_api(api: str | None) -> None:
    """A mistyped --ipfs-api fails at start, not at the first result."""
    if api:
        from storage.kubo import KuboBackend

        KuboBackend(api)


def _ensure_local(client: Client, cid: str) -> None:
    try:
        client.call("storage.fetch", cid=cid, timeout=60)
    except RpcError as exc:
        if exc.code != ErrorCode.METHOD_NOT_FOUND:  # an older node: it only looks locally
            raise


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _parse_duration(text: str) -> int:
    """'30m', '12h', '7d', '2w' or plain seconds → seconds (the node checks the range)."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _DURATION_UNITS else ""
    number = value[: len(value) - len(unit)]
    try:
        seconds = int(float(number) * _DURATION_UNITS[unit])
    except ValueError:
        raise MeshrunError(
            ErrorCode.INVALID_PARAMS, f"not a duration: {text!r} (use e.g. 30m, 12h, 7d, 2w)"
        ) from None
    return seconds


@client_app.command("share")
def client_share(
    target: Annotated[
        str | None,
        typer.Argument(
            help="a job id (its result), a CID, or with --revoke: a link/id", show_default=False
        ),
    ] = None,
    job_id_opt: JobIdOpt = None,
    expires: Annotated[
        str, typer.Option("--expires", help="how long the link works: 30m, 12h, 7d, 2w")
    ] = "7d",
    path: Annotated[str, typer.Option("--path", help="only this path under the CID")] = "",
    revoke: Annotated[
        bool, typer.Option("--revoke", help="revoke the link (or token, or id) given instead")
    ] = False,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a link that opens a result in a browser with no token, or revoke one."""
    as_json = _json(as_json)
    target = _job_id(target, job_id_opt)
    try:
        with _client(rpc) as client:
            if revoke:
                result = client.call("share.revoke", share=target)
            else:
                seconds = _parse_duration(expires)
                result = client.call("share.create", target=target, path=path, expires_in=seconds)
    except MeshrunError as exc:
        _fail(exc, as_json)
    if revoke:
        _out(result, as_json, f"revoked share {result['id']}")
        return
    _out(result, as_json, str(result["url"]))


@client_app.command("open")
def client_open(
    browser: Annotated[
        bool, typer.Option("--browser/--no-browser", help="also open it in a web browser")
    ] = False,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a one-time link (2 minutes) that logs a browser into the node's explorer."""
    as_json = _json(as_json)
    try:
        with _client(rpc) as client:
            result = client.call("explorer.login_link")
    except MeshrunError as exc:
        _fail(exc, as_json)
    if browser:
        import webbrowser

        webbrowser.open(str(result["url"]))
    _out(result, as_json, str(result["url"]))


@client_app.command("export-car")
def client_export_car(
    cid: str,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="file (default: <cid>.car)")
    ] = None,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a CID's whole DAG as a CAR file (`ipfs dag import` reads it)."""
    as_json = _json(as_json)
    try:
        with _client(rpc, timeout=300) as client:
            _ensure_local(client, cid)
            result = client.call("storage.export_car", cid=cid)
    except MeshrunError as exc:
        _fail(exc, as_json)
    target = output or Path(f"{result['cid']}.car")
    target.write_bytes(base64.b64decode(result["car_b64"]))
    summary = {k: result[k] for k in ("cid", "size", "blocks")} | {"file": str(target)}
    _out(summary, as_json, f"wrote {result['blocks']} block(s), {result['size']} bytes to {target}")


@client_app.command("import-car")
def client_import_car(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="a CARv1 file")],
    pin: Annotated[bool, typer.Option(help="pin the CAR's roots")] = True,
    rpc: RpcOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store every block of a CAR file on your node (each checked against its CID)."""
    as_json = _json(as_json)
    try:
        with _client(rpc, timeout=300) as client:
            data = base64.b64encode(file.read_bytes()).decode()
            result = client.call("storage.import_car", car_b64=data, pin=pin)
    except MeshrunError as exc:
        _fail(exc, as_json)
    roots = ", ".join(f"{r}{'' if ok else ' (incomplete)'}" for r, ok in result["complete"].items())
    _out(result, as_json, f"imported {result['blocks']} block(s); roots: {roots}")


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# --------------------------------------------------------------------------- bench


@app.command()
def bench(
    only: Annotated[
        list[str] | None,
        typer.Option(help="run only these (repeatable or comma-separated): see benchmarks/"),
    ] = None,
    quick: Annotated[bool, typer.Option(help="tiny variants: a smoke test, not figures")] = False,
    json_out: Annotated[Path | None, typer.Option(help="also write the figures as JSON")] = None,
) -> None:
    """Measure meshrun against baselines taken in the same run; print a table."""
    from benchmarks.runner import run_benchmarks

    names = [n.strip() for item in only or [] for n in item.split(",") if n.strip()]
    try:
        run_benchmarks(names or None, quick=quick, json_out=json_out, console=console)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--only") from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
