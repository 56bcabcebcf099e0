"""The OpenAPI 3.1 document of the REST routes, served at `GET /openapi.json`.

Generated on each request from the same declarations the routes run on: the
operations table in node/api/rest.py and, for params and bodies, the pydantic
models of the RPC methods behind them. A route whose method this node lacks is
left out, and a param added to an RPC method appears here by itself.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from node.api.rest import OPERATIONS, ErrorBody, Operation, RestApi
from node.api.seeds import SEED_ROUTES, SeedRoute

OPENAPI_VERSION = "3.1.0"
_REF = "#/components/schemas/{model}"

_ERRORS: dict[str, tuple[str, str]] = {
    "400": ("BadRequest", "The request is not well-formed (bad JSON, not an object…)"),
    "401": ("Unauthorized", "Missing or wrong bearer token (code UNAUTHORIZED)"),
    "404": ("NotFound", "No such job, CID or route (JOB_NOT_FOUND, CID_NOT_FOUND…)"),
    "409": ("Conflict", "Not possible in the job's or the node's state (WRONG_MODE…)"),
    "422": ("Unprocessable", "Params failed validation (INVALID_PARAMS, INVALID_CID…)"),
    "429": ("TooManyRequests", "Over the rate limit (RATE_LIMITED); see Retry-After"),
    "500": ("ServerError", "The node failed; details.ref points into its log"),
}
_BODY_ERRORS = {
    "413": ("TooLarge", "The request body is over the REST limit"),
    "503": ("Busy", "The node holds all the request bodies it allows (BUSY); see Retry-After"),
}

DESCRIPTION = """\
The REST shapes of a meshrun node. Every route is an adapter over a JSON-RPC
method (POST /rpc) and shares its validation and error codes. Errors are
`{"error": CODE, "message": ..., "details": {...}}`; CODE is one of
protocol/errors.py.

Authentication: `Authorization: Bearer <token>` (or, as the seed documents
send it, `X-Api-Key: <token>` or a bare `Authorization: <token>`), the token
being the content of `rpc.token` in the node's data dir (rewritten at every
start). Only `GET /health` is open. Rate limits: `--rate-limit` calls a minute
(default 60) and 1000/60 times that an hour, per client.

The seed documents' own routes (AITBC `/api/v1/jobs…`, TensorOne
`/v2/jobs/{job_id}/status…`, Bacalhau `/requester/*`) are listed too, tagged by
seed; their bodies and answers are the seeds' shapes.

Not described below because OpenAPI cannot: `WS /v1/jobs/ws` (JSON messages,
`{"action": "subscribe", "job_ids": [...]}` in, `{"kind": "event", ...}` out) and
JSON-RPC 2.0 over WebSocket at `/rpc/ws` (job.subscribe pushes `job.event`
notifications).
"""


def openapi_document(api: RestApi, *, title: str = "meshrun node", version: str = "0.1.0") -> Any:
    schemas: dict[str, Any] = {}

    def schema_of(model: type[BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        return schema

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        schemas[model.__name__] = schema_of(model)
        return {"$ref": _REF.format(model=model.__name__)}

    error_ref = ref(ErrorBody)
    responses: dict[str, Any] = {}
    for _status, (name, description) in {**_ERRORS, **_BODY_ERRORS}.items():
        response: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": error_ref}},
        }
        if name in ("TooManyRequests", "Busy"):
            response["headers"] = {
                "Retry-After": {
                    "description": "seconds until a call would be accepted",
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
        responses[name] = response

    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        if not api.available(op):
            continue
        paths.setdefault(op.path, {})[op.http_method.lower()] = _operation(api, op, schema_of, ref)
    for route in SEED_ROUTES:
        if route.rpc in api.registry:
            paths.setdefault(route.path, {})[route.method.lower()] = _seed_operation(route)

    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the content of <data_dir>/rpc.token",
                },
                "apiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Api-Key",
                    "description": "the same token, as the AITBC seed sends it",
                },
            },
        },
        "security": [{"bearerAuth": []}, {"apiKey": []}],
    }


def _operation(api: RestApi, op: Operation, schema_of: Any, ref: Any) -> dict[str, Any]:
    model = api.params_model(op)
    params_schema: dict[str, Any] = schema_of(model) if model is not None else {}
    props: dict[str, Any] = params_schema.get("properties", {})
    required = set(params_schema.get("required", []))
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": _query_schema(props.get(name, {"type": "string"})) or {"type": "string"},
        }
        for name in op.path_params
    ]
    entry: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "x-jsonrpc-method": op.rpc,
    }
    if op.description:
        entry["description"] = op.description
    if op.body:
        entry["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": params_schema}},
        }
    else:
        renamed = {rpc_name: rest_name for rest_name, rpc_name in op.renames.items()}
        for prop, prop_schema in props.items():
            if prop in op.path_params or prop in op.hidden_query:
                continue
            schema = _query_schema(prop_schema)
            if schema is None:
                continue
            name = renamed.get(prop, prop)
            parameter: dict[str, Any] = {
                "name": name,
                "in": "query",
                "required": prop in required,
                "schema": schema,
            }
            if prop in renamed:
                parameter["schema"] = {"type": "string"}
                parameter["description"] = "ISO-8601 date/time (UTC if no zone) or unix seconds"
            elif "description" in prop_schema:
                parameter["description"] = prop_schema["description"]
            if schema.get("type") == "array":
                parameter["style"] = "form"
                parameter["explode"] = True
            parameters.append(parameter)
    if parameters:
        entry["parameters"] = parameters

    success: dict[str, Any] = {"description": "OK"}
    if op.media_type == "application/json":
        result = _result_model(api, op)
        success["content"] = {
            "application/json": {"schema": ref(result) if result else {"type": "object"}}
        }
    elif op.media_type == "application/zip":
        success["content"] = {
            "application/zip": {"schema": {"type": "string", "contentMediaType": "application/zip"}}
        }
    else:
        success["content"] = {op.media_type: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(op.success_status): success}
    errors = {**_ERRORS, **(_BODY_ERRORS if op.body else {})}
    for status, (name, _) in sorted(errors.items()):
        responses[status] = {"$ref": f"#/components/responses/{name}"}
    entry["responses"] = responses
    return entry


def _seed_operation(route: SeedRoute) -> dict[str, Any]:
    """A seed route (node/api/seeds.py): its body and answer are the seed's own shapes,
    described loosely (objects) rather than by a pydantic model."""
    entry: dict[str, Any] = {
        "operationId": "seed_" + route.handler,
        "summary": route.summary,
        "tags": [route.seed],
        "x-jsonrpc-method": route.rpc,
    }
    parameters: list[dict[str, Any]] = [
        {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
        for _ in range(route.path.count("{job_id}"))
    ]
    if route.handler == "tensorone_status":
        parameters += [
            {"name": "include", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "comma-separated: logs, metrics, resources"},
            {"name": "format", "in": "query", "required": False,
             "schema": {"type": "string", "enum": ["json", "summary"]}},
        ]  # fmt: skip
    if parameters:
        entry["parameters"] = parameters
    if route.method == "POST" and "{job_id}" not in route.path:
        entry["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    schema: dict[str, Any] = {"type": "string"} if route.media_type != "application/json" else {}
    responses: dict[str, Any] = {
        str(route.success_status): {
            "description": "OK",
            "content": {route.media_type: {"schema": schema}},
        }
    }
    for status, (name, _) in sorted({**_ERRORS, **_BODY_ERRORS}.items()):
        responses[status] = {"$ref": f"#/components/responses/{name}"}
    entry["responses"] = responses
    return entry


def _result_model(api: RestApi, op: Operation) -> type[BaseModel] | None:
    if op.rpc in api.registry:
        declared = api.registry.get(op.rpc).result_model
        if declared is not None:
            return declared
    return op.response_model


def _query_schema(schema: dict[str, Any]) -> dict[str, Any] | None:
    """A property's schema as a query param: no null (absent means None), no objects."""
    schema = copy.deepcopy(schema)
    options = schema.pop("anyOf", None)
    if options is not None:
        kept = [o for o in options if o.get("type") != "null"]
        if len(kept) != 1:
            return None
        schema = {**kept[0], **schema}
    if schema.get("default", 0) is None:
        del schema["default"]
    if "$ref" in schema or schema.get("type") not in (
        "string",
        "integer",
        "number",
        "boolean",
        "array",
    ):
        return None
    if schema.get("type") == "array":
        items = schema.get("items", {})
        if "$ref" in items or items.get("type") not in ("string", "integer", "number", "boolean"):
            return None
    return schema
