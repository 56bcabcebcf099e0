"""GET /openapi.json describes the REST routes the node really has, and a bounded
schemathesis run against a live node finds no 5xx and no response off its schema."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import schemathesis
import trio
from hypothesis import HealthCheck, given, settings
from pydantic import BaseModel, ConfigDict, Field
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from node.api.httpapi import install_http_api
from node.api.rest import OPERATIONS
from node.api.rpc import Registry, RpcServer
from node.api.seeds import SEED_ROUTES
from node.dev.devstack import Devstack
from node.jobs.bus import EventBus
from protocol.errors import ErrorCode, MeshrunError

# ------------------------------------------------------------ an in-process server


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: str | None = None
    limit: int = Field(default=10, ge=1, le=50)
    tags: list[str] | None = None


class GetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(min_length=1, max_length=128)


@pytest.fixture
async def small_node(nursery: trio.Nursery) -> AsyncIterator[str]:
    """A node with only job.list and job.get: the other routes must not be advertised."""
    registry = Registry(title="small", version="9.9")

    async def job_list(p: ListParams) -> dict[str, Any]:
        return {"jobs": [], "echo": p.model_dump()}

    async def job_get(p: GetParams) -> dict[str, Any]:
        raise MeshrunError(ErrorCode.JOB_NOT_FOUND, f"no job {p.job_id}")

    registry.register("job.list", ListParams, job_list, summary="s", result="r")
    registry.register("job.get", GetParams, job_get, summary="s", result="r")
    server = RpcServer(registry)
    install_http_api(server.app, registry, bus=EventBus(), gate=None)
    port = await nursery.start(server.serve)
    yield f"http://127.0.0.1:{port}"


async def test_document_follows_the_registry(small_node: str) -> None:
    async with httpx.AsyncClient(base_url=small_node) as http:
        doc = (await http.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.1")
        assert doc["info"]["title"] == "small" and doc["info"]["version"] == "9.9"
        assert set(doc["paths"]) == {
            "/v1/jobs",
            "/v1/jobs/history",
            "/v1/jobs/{job_id}",
            "/v1/jobs/{job_id}/status/stream",
            "/v1/jobs/{job_id}/download",  # works through job.get when job.results is absent
            "/v1/jobs/status/batch",  # likewise, from job.get
            # the seeds' routes whose method the node has (node/api/seeds.py)
            *(r.path for r in SEED_ROUTES if r.rpc in ("job.get", "job.list")),
        }
        assert "/requester/submit" not in doc["paths"]  # job.submit is absent
        assert "delete" not in doc["paths"]["/v1/jobs/{job_id}"]
        assert "post" not in doc["paths"]["/v1/jobs"]
        listing = doc["paths"]["/v1/jobs"]["get"]
        params = {p["name"]: p for p in listing["parameters"]}
        assert params["limit"]["schema"]["maximum"] == 50
        assert params["tags"]["schema"]["type"] == "array"
        assert "anyOf" not in params["status"]["schema"]  # no null in a query string
        assert {"200", "401", "404", "422", "429", "500"} <= set(listing["responses"])
        assert doc["security"] == [{"bearerAuth": []}, {"apiKey": []}]

        # A route without its method answers 501, with the REST error body.
        missing = await http.post("/v1/jobs", json={})
        assert missing.status_code == 501 and missing.json()["error"] == "METHOD_NOT_FOUND"
        echoed = (await http.get("/v1/jobs", params={"tags": "a,b", "limit": "3"})).json()
        assert echoed["echo"] == {"status": None, "limit": 3, "tags": ["a", "b"]}
        echoed = (await http.get("/v1/jobs?tags=a&tags=b")).json()
        assert echoed["echo"]["tags"] == ["a", "b"]


# ------------------------------------------------------------- a live node, fuzzed


MAX_EXAMPLES = 50
RUN_BUDGET_SECONDS = 60.0
_started: list[float] = []


@pytest.fixture(scope="module")
def live_schema(api_stack: Devstack) -> Any:
    base = api_stack.requester.rpc_url.removesuffix("/rpc")
    headers = {"Authorization": f"Bearer {api_stack.requester.token}"}
    document = httpx.get(f"{base}/openapi.json", headers=headers, timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=base, headers=headers, request_timeout=10)
    _started.append(time.monotonic())
    return schema


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(
    ("method", "path"), [(op.http_method, op.path) for op in OPERATIONS], ids=str
)
def test_live_node_against_its_own_openapi(
    live_schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    """Valid and invalid input alike: never a 5xx, always a documented status, content
    type and body. (Not "invalid input is always refused": query strings are text
    the RPC models coerce on purpose, so "5" is a fine limit.)

    Driven through `as_strategy` rather than schemathesis' pytest plugin, whose lazy
    loader relies on pytest internals that pytest 9 removed.
    """
    if path not in live_schema or method not in live_schema[path]:
        pytest.skip(f"{method} {path} is not advertised by this node")
    if time.monotonic() - _started[0] > RUN_BUDGET_SECONDS:
        pytest.skip("the schemathesis run is over its time budget")
    strategy = live_schema[path][method].as_strategy(generation_mode=mode)

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: Any) -> None:
        case.call_and_validate(checks=CHECKS)

    run()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_node_still_serves_after_the_fuzzing(api_stack: Devstack) -> None:
    assert api_stack.alive()
    with api_stack.requester.client() as client:
        assert client.node_info()["mode"] == "requester"
