"""The node's HTTP door: bearer token on everything but /health, a
per-client rate limit, loopback-only unless asked, and clients that find the token."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from pydantic import BaseModel, ConfigDict
from trio_websocket import ConnectionRejected, open_websocket_url
from typer.testing import CliRunner

import cli
from node.api import auth as node_auth
from node.api.auth import (
    TOKEN_FILE,
    Gate,
    RateLimiter,
    RemoteBindRefused,
    check_rpc_bind,
    is_loopback,
    read_token,
    remove_token,
    write_token,
)
from node.api.httpapi import install_http_api
from node.api.rpc import NoParams, Registry, RpcServer
from node.client import TOKEN_FILE as CLIENT_TOKEN_FILE
from node.client import (
    AsyncClient,
    Client,
    RpcError,
    _rate_limit_pause,
    discover,
    read_node_file,
)
from node.dev.devstack import Devstack
from node.jobs.bus import EventBus
from node.service import NodeConfig
from protocol.errors import ErrorCode, MeshrunError

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class JobIdParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str


def make_registry() -> Registry:
    registry = Registry()

    async def node_info(_: NoParams) -> dict[str, Any]:
        return {
            "peer_id": "12D3KooWtest",
            "mode": "requester",
            "rpc_url": "",
            "connected_peers": 0,
            "topic_peers": 0,
        }

    async def job_get(p: JobIdParams) -> dict[str, Any]:
        raise MeshrunError(ErrorCode.JOB_NOT_FOUND, f"no job with id {p.job_id}")

    registry.register("node.info", NoParams, node_info, summary="s", result="r")
    registry.register("job.get", JobIdParams, job_get, summary="s", result="r")
    return registry


async def serve(nursery: trio.Nursery, *, rate_limit: int = 0) -> str:
    registry = make_registry()
    server = RpcServer(registry)
    install_http_api(
        server.app, registry, bus=EventBus(), gate=Gate(TOKEN, RateLimiter(rate_limit))
    )
    port = await nursery.start(server.serve)
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def base(nursery: trio.Nursery) -> str:
    return await serve(nursery)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def rpc(method: str, request_id: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method}


# ------------------------------------------------------------------------ token


async def test_health_is_the_only_open_door(base: str, http: httpx.AsyncClient) -> None:
    assert (await http.get(f"{base}/health")).json() == {"ok": True}
    for method, path in [
        ("POST", "/rpc"),
        ("GET", "/v1/jobs/x"),
        ("GET", "/openapi.json"),
        ("GET", "/v1/jobs/x/status/stream"),
        ("GET", "/no/such/path"),
        ("POST", "/health"),
    ]:
        response = await http.request(method, f"{base}{path}", json=rpc("node.info"))
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_rpc_refusal_is_a_json_rpc_error(base: str, http: httpx.AsyncClient) -> None:
    missing = await http.post(f"{base}/rpc", json=rpc("node.info"))
    assert missing.status_code == 401
    error = missing.json()["error"]
    assert error["code"] == -32019 == ErrorCode.UNAUTHORIZED.rpc_code
    assert error["data"]["code"] == "UNAUTHORIZED"
    assert "rpc.token" in error["message"]

    wrong = await http.post(
        f"{base}/rpc", json=rpc("node.info"), headers={"Authorization": "Bearer guess"}
    )
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    basic = await http.post(
        f"{base}/rpc", json=rpc("node.info"), headers={"Authorization": f"Basic {TOKEN}"}
    )
    assert basic.status_code == 401

    ok = await http.post(f"{base}/rpc", json=rpc("node.info"), headers=AUTH)
    assert ok.status_code == 200 and ok.json()["result"]["mode"] == "requester"
    scheme_any_case = await http.post(
        f"{base}/rpc", json=rpc("node.info"), headers={"Authorization": f"bearer {TOKEN}"}
    )
    assert scheme_any_case.status_code == 200


async def test_rest_refusal_is_a_rest_error(base: str, http: httpx.AsyncClient) -> None:
    response = await http.get(f"{base}/v1/jobs/abc")
    assert response.status_code == 401
    assert response.json()["error"] == "UNAUTHORIZED"
    assert set(response.json()) == {"error", "message", "details"}
    # With the token the same route answers for itself.
    found = await http.get(f"{base}/v1/jobs/abc", headers=AUTH)
    assert found.status_code == 404 and found.json()["error"] == "JOB_NOT_FOUND"


async def test_query_token_only_where_browsers_need_it(base: str, http: httpx.AsyncClient) -> None:
    """EventSource cannot set headers, so the SSE route takes ?access_token=;
    plain REST does not, which keeps tokens out of ordinary URLs."""
    stream = await http.get(f"{base}/v1/jobs/abc/status/stream?access_token={TOKEN}")
    assert stream.status_code == 404  # past the door, and the job is unknown
    plain = await http.get(f"{base}/v1/jobs/abc?access_token={TOKEN}")
    assert plain.status_code == 401


async def test_websocket_handshake_needs_the_token(base: str) -> None:
    ws_base = base.replace("http://", "ws://")
    for path in ("/rpc/ws", "/v1/jobs/ws"):
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(f"{ws_base}{path}"):
                pass
        assert rejected.value.status_code == 401
        assert rejected.value.body is not None
        assert b"UNAUTHORIZED" in rejected.value.body
    headers = [(b"authorization", f"Bearer {TOKEN}".encode())]
    async with open_websocket_url(f"{ws_base}/rpc/ws", extra_headers=headers) as ws:
        await ws.send_message(json.dumps(rpc("node.info", 7)))
        assert json.loads(await ws.get_message())["result"]["peer_id"] == "12D3KooWtest"
    async with open_websocket_url(f"{ws_base}/rpc/ws?access_token={TOKEN}") as ws:
        await ws.send_message(json.dumps(rpc("node.info", 8)))
        assert json.loads(await ws.get_message())["id"] == 8


async def test_sdk_reports_unauthorized_by_code(base: str) -> None:
    async with AsyncClient(f"{base}/rpc", token="wrong") as client:
        with pytest.raises(RpcError) as caught:
            await client.node_info()
    assert caught.value.code is ErrorCode.UNAUTHORIZED
    async with AsyncClient(f"{base}/rpc", token=TOKEN) as client:
        assert (await client.node_info())["mode"] == "requester"


# ------------------------------------------------------------------- rate limit


def test_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(20.0)  # 3/min: one call every 20 s
    assert limiter.acquire("b") == 0.0  # buckets are per client
    now[0] += 10
    assert limiter.acquire("a") == pytest.approx(10.0)
    now[0] += 10
    assert limiter.acquire("a") == 0.0
    now[0] += 3600
    assert [limiter.acquire("a") for _ in range(4)][-1] > 0  # burst is capped at the rate
    off = RateLimiter(0)
    assert not off.enabled and all(off.acquire("a") == 0.0 for _ in range(1000))
    with pytest.raises(ValueError):
        RateLimiter(-1)


def test_buckets_are_pruned_when_full() -> None:
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])
    for i in range(RateLimiter._PRUNE_AT):
        limiter.acquire(i)
    now[0] += 120
    limiter.acquire("fresh")
    assert len(limiter._buckets) <= 1


async def test_over_the_limit_is_429_with_retry_after(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    base = await serve(nursery, rate_limit=3)
    for _ in range(3):
        assert (await http.post(f"{base}/rpc", json=rpc("node.info"), headers=AUTH)).is_success
    limited = await http.post(f"{base}/rpc", json=rpc("node.info"), headers=AUTH)
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) == 20
    error = limited.json()["error"]
    assert error["code"] == -32020 and error["data"]["code"] == "RATE_LIMITED"
    assert error["data"]["details"]["retry_after"] == 20
    rest = await http.get(f"{base}/v1/jobs/x", headers=AUTH)
    assert rest.status_code == 429 and rest.json()["error"] == "RATE_LIMITED"
    assert rest.headers["retry-after"] == "20"
    # Liveness probes are never throttled.
    assert (await http.get(f"{base}/health")).status_code == 200


async def test_a_token_guesser_cannot_lock_the_owner_out(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    base = await serve(nursery, rate_limit=3)
    bad = {"Authorization": "Bearer guess"}
    codes = [(await http.get(f"{base}/v1/jobs/x", headers=bad)).status_code for _ in range(5)]
    assert codes == [401, 401, 401, 429, 429]
    assert (await http.post(f"{base}/rpc", json=rpc("node.info"), headers=AUTH)).is_success


async def test_sdk_rides_out_a_short_limit(nursery: trio.Nursery, http: httpx.AsyncClient) -> None:
    base = await serve(nursery, rate_limit=60)
    for _ in range(60):
        await http.post(f"{base}/rpc", json=rpc("node.info"), headers=AUTH)
    started = trio.current_time()
    async with AsyncClient(f"{base}/rpc", token=TOKEN) as client:
        assert (await client.node_info())["mode"] == "requester"
    assert trio.current_time() - started >= 0.9  # waited out Retry-After: 1


def test_sdk_gives_up_on_long_waits() -> None:
    def limited(seconds: float) -> RpcError:
        return RpcError(ErrorCode.RATE_LIMITED, "slow down", {"retry_after": seconds})

    assert _rate_limit_pause(limited(1), 0) == 1
    assert _rate_limit_pause(limited(1), 3) is None
    assert _rate_limit_pause(limited(60), 0) is None
    assert _rate_limit_pause(RpcError(ErrorCode.JOB_NOT_FOUND, "x"), 0) is None


async def test_websocket_calls_count_against_the_limit(nursery: trio.Nursery) -> None:
    base = await serve(nursery, rate_limit=3)
    headers = [(b"authorization", f"Bearer {TOKEN}".encode())]
    async with open_websocket_url(
        f"{base.replace('http', 'ws')}/rpc/ws", extra_headers=headers
    ) as ws:  # the handshake is call 1
        replies = []
        for i in range(3):
            await ws.send_message(json.dumps(rpc("node.info", i)))
            replies.append(json.loads(await ws.get_message()))
    assert "result" in replies[0] and "result" in replies[1]
    assert replies[2]["error"]["data"]["code"] == "RATE_LIMITED"


# ------------------------------------------------------------- token file, bind


def test_token_file_is_private_and_new_each_time(tmp_path: Path) -> None:
    token, path = write_token(tmp_path)
    assert path == tmp_path / TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token(path) == token and len(token) >= 40
    again, _ = write_token(tmp_path)
    assert again != token and read_token(path) == again
    remove_token(path, token)  # an older node's shutdown must not delete the new token
    assert path.exists()
    remove_token(path, again)
    assert not path.exists()
    assert not list(tmp_path.iterdir())
    assert CLIENT_TOKEN_FILE == node_auth.TOKEN_FILE


def test_a_token_never_starts_with_a_dash() -> None:
    """argparse (the examples) reads `--token -abc` as a missing value: one token
    in 64 used to start with "-"."""
    tokens = [node_auth.new_token() for _ in range(2000)]
    assert not any(t.startswith("-") for t in tokens)
    assert len(set(tokens)) == len(tokens) and min(map(len, tokens)) >= 40


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_binds_are_fine(host: str) -> None:
    assert is_loopback(host)
    check_rpc_bind(host, allow_remote=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_remote_binds_need_consent(host: str) -> None:
    with pytest.raises(RemoteBindRefused, match="--allow-remote-rpc"):
        check_rpc_bind(host, allow_remote=False)
    check_rpc_bind(host, allow_remote=True)


def test_node_config_and_cli_refuse_remote_rpc(tmp_path: Path) -> None:
    with pytest.raises(RemoteBindRefused):
        NodeConfig(mode="requester", data_dir=tmp_path, rpc_host="0.0.0.0")
    NodeConfig(mode="requester", data_dir=tmp_path, rpc_host="0.0.0.0", allow_remote_rpc=True)
    result = CliRunner().invoke(
        cli.app,
        ["node", "--mode", "requester", "--data-dir", str(tmp_path), "--rpc-host", "0.0.0.0"],
    )
    assert result.exit_code == 2
    assert "--allow-remote-rpc" in result.output
    assert not (tmp_path / TOKEN_FILE).exists()


# -------------------------------------------------------------------- discovery


def _fake_node_dir(root: Path, url: str, token: str, *, token_file: bool = True) -> Path:
    root.mkdir(parents=True)
    info: dict[str, Any] = {"rpc_url": url, "peer_id": "p"}
    if token_file:
        info["token_file"] = str(root / TOKEN_FILE)
    (root / "node.json").write_text(json.dumps(info))
    (root / TOKEN_FILE).write_text(token + "\n")
    return root


def test_discover_order(tmp_path: Path) -> None:
    one = _fake_node_dir(tmp_path / "requester", "http://127.0.0.1:1111/rpc", "tok1")
    two = _fake_node_dir(
        tmp_path / "compute", "http://127.0.0.1:2222/rpc", "tok2", token_file=False
    )
    dirs = [one, two]
    assert read_node_file(two).token == "tok2"  # node.json without token_file: the neighbour
    found = discover(data_dirs=dirs, env={})
    assert (found.url, found.token) == ("http://127.0.0.1:1111/rpc", "tok1")
    # An explicit URL takes the token of the node.json that advertises it.
    found = discover("http://localhost:2222/rpc", data_dirs=dirs, env={})
    assert found.token == "tok2"
    assert discover("http://127.0.0.1:9/rpc", data_dirs=dirs, env={}).token is None
    env = {"MESHRUN_RPC": "http://127.0.0.1:2222/rpc", "MESHRUN_TOKEN": "from-env"}
    found = discover(data_dirs=dirs, env=env)
    assert (found.url, found.token) == ("http://127.0.0.1:2222/rpc", "from-env")
    assert discover(token="flag", data_dirs=dirs, env=env).token == "flag"
    fallback = discover(data_dirs=[tmp_path / "nothing"], env={})
    assert fallback.url == "http://127.0.0.1:7780/rpc" and fallback.token is None
    with pytest.raises(RpcError) as missing:
        read_node_file(tmp_path / "nothing")
    assert missing.value.code is ErrorCode.NODE_UNREACHABLE


async def test_client_from_data_dir_and_cli_find_the_token(
    base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    _fake_node_dir(home / "requester", f"{base}/rpc", TOKEN)
    monkeypatch.setenv("MESHRUN_HOME", str(home))
    monkeypatch.delenv("MESHRUN_RPC", raising=False)
    monkeypatch.delenv("MESHRUN_TOKEN", raising=False)

    def use_sync_paths() -> list[tuple[int, str]]:
        with Client.from_data_dir(home / "requester") as client:
            assert client.node_info()["mode"] == "requester"
        runner = CliRunner()
        outcomes = []
        for args, env in [
            (["client", "info", "--json"], {}),  # node.json of the default data dir
            (["client", "info", "--json", "--rpc", f"{base}/rpc"], {}),  # same URL
            (["client", "--token", "nope", "info", "--json"], {}),
            (["client", "info", "--json"], {"MESHRUN_TOKEN": "nope-env"}),
            (["client", "--token", TOKEN, "info", "--json", "--rpc", f"{base}/rpc"], {}),
        ]:
            result = runner.invoke(cli.app, args, env=env)
            outcomes.append((result.exit_code, result.output))
        return outcomes

    outcomes = await trio.to_thread.run_sync(use_sync_paths)
    codes = [code for code, _ in outcomes]
    assert codes == [0, 0, 1, 1, 0], outcomes
    assert json.loads(outcomes[0][1])["peer_id"] == "12D3KooWtest"
    assert json.loads(outcomes[2][1])["error"]["code"] == "UNAUTHORIZED"


# ---------------------------------------------------------------- a real node


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_real_node_writes_uses_and_removes_its_token(tmp_path: Path) -> None:
    stack = Devstack(tmp_path, compute=0)
    with stack:
        node = stack.requester
        token_file = Path(node.info["token_file"])
        assert token_file == node.data_dir / TOKEN_FILE
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        with node.client() as client:
            assert client.node_info()["peer_id"] == node.peer_id
        with Client(node.rpc_url) as anonymous, pytest.raises(RpcError) as caught:
            anonymous.node_info()
        assert caught.value.code is ErrorCode.UNAUTHORIZED
        assert httpx.get(node.rpc_url.removesuffix("/rpc") + "/health").status_code == 200
    assert not token_file.exists()
