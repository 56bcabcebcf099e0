"""The table of JSON-RPC methods a node serves.

Binding and validating params lives here rather than in the HTTP server so every
transport (HTTP now, WebSocket later) applies the same rules and errors, and so
the same declarations can describe the API as an OpenRPC document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from protocol.errors import ErrorCode, MeshrunError

P = TypeVar("P", bound=BaseModel)

Handler = Callable[[Any], Awaitable[Any]]

OPENRPC_VERSION = "1.3.2"
_REF_TEMPLATE = "#/components/schemas/{model}"


class NoParams(BaseModel):
    """Params model for methods that take none, so a stray param is still rejected."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Method:
    name: str
    params_model: type[BaseModel]
    handler: Handler
    summary: str
    result: str
    result_model: type[BaseModel] | None = None
    errors: tuple[ErrorCode, ...] = field(default=())

    def bind(self, params: object) -> BaseModel:
        """Turn raw JSON params into the model, raising INVALID_PARAMS a user can act on."""
        if params is None:
            params = {}
        if isinstance(params, list):
            names = [f.alias or n for n, f in self.params_model.model_fields.items()]
            if len(params) > len(names):
                raise MeshrunError(
                    ErrorCode.INVALID_PARAMS,
                    f"{self.name} takes at most {len(names)} positional params "
                    f"({', '.join(names) or 'none'}), got {len(params)}",
                    {"expected": names, "got": len(params)},
                )
            params = dict(zip(names, params, strict=False))
        if not isinstance(params, dict):
            raise MeshrunError(ErrorCode.INVALID_PARAMS, "params must be an object or an array")
        try:
            return self.params_model.model_validate(params)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False, include_input=False)
            problems = "; ".join(
                f"{'.'.join(str(part) for part in e['loc']) or '(params)'}: {e['msg']}"
                for e in errors
            )
            raise MeshrunError(
                ErrorCode.INVALID_PARAMS,
                f"invalid params for {self.name}: {problems}",
                {"errors": [dict(e) for e in errors]},
            ) from None


class Registry:
    """Methods by name; the node and tests build one, the server only reads it."""

    def __init__(self, *, title: str = "meshrun node", version: str = "0.1.0") -> None:
        self.title = title
        self.version = version
        self._methods: dict[str, Method] = {}

    def register(
        self,
        name: str,
        params_model: type[P],
        handler: Callable[[P], Awaitable[Any]],
        *,
        summary: str,
        result: str,
        result_model: type[BaseModel] | None = None,
        errors: Sequence[ErrorCode] = (),
    ) -> Method:
        if name in self._methods:
            raise ValueError(f"RPC method {name!r} is already registered")
        if params_model.model_config.get("extra") != "forbid":
            raise ValueError(
                f"params model for {name!r} must set extra='forbid' so typos in "
                "param names are reported instead of ignored"
            )
        method = Method(
            name=name,
            params_model=params_model,
            handler=handler,
            summary=summary,
            result=result,
            result_model=result_model,
            errors=tuple(errors),
        )
        self._methods[name] = method
        return method

    def method(
        self,
        name: str,
        params_model: type[P],
        *,
        summary: str,
        result: str,
        result_model: type[BaseModel] | None = None,
        errors: Sequence[ErrorCode] = (),
    ) -> Callable[[Callable[[P], Awaitable[Any]]], Callable[[P], Awaitable[Any]]]:
        """Decorator form of `register`, returning the handler unchanged."""

        def decorate(handler: Callable[[P], Awaitable[Any]]) -> Callable[[P], Awaitable[Any]]:
            self.register(
                name,
                params_model,
                handler,
                summary=summary,
                result=result,
                result_model=result_model,
                errors=errors,
            )
            return handler

        return decorate

    def get(self, name: str) -> Method:
        try:
            return self._methods[name]
        except KeyError:
            raise MeshrunError(
                ErrorCode.METHOD_NOT_FOUND, f"no such method: {name}", {"method": name}
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[Method]:
        return iter(sorted(self._methods.values(), key=lambda m: m.name))

    def __len__(self) -> int:
        return len(self._methods)

    async def invoke(self, name: str, params: object) -> Any:
        """Look up, bind and run one call; errors surface as MeshrunError or the handler's own."""
        method = self.get(name)
        return await method.handler(method.bind(params))

    def openrpc(self) -> dict[str, Any]:
        """The API as an OpenRPC document, for `rpc.discover` and generated docs."""
        schemas: dict[str, Any] = {}

        def schema_of(model: type[BaseModel]) -> dict[str, Any]:
            schema = model.model_json_schema(ref_template=_REF_TEMPLATE)
            schemas.update(schema.pop("$defs", {}))
            return schema

        methods = []
        for method in self:
            params_schema = schema_of(method.params_model)
            required = set(params_schema.get("required", []))
            params = []
            for prop, prop_schema in params_schema.get("properties", {}).items():
                descriptor: dict[str, Any] = {
                    "name": prop,
                    "required": prop in required,
                    "schema": prop_schema,
                }
                if "description" in prop_schema:
                    descriptor["description"] = prop_schema["description"]
                params.append(descriptor)
            result_schema = schema_of(method.result_model) if method.result_model else {}
            entry: dict[str, Any] = {
                "name": method.name,
                "summary": method.summary,
                "paramStructure": "either",
                "params": params,
                "result": {
                    "name": "result",
                    "description": method.result,
                    "schema": result_schema,
                },
            }
            if method.errors:
                entry["errors"] = [
                    {"code": code.rpc_code, "message": code.value, "data": {"code": code.value}}
                    for code in method.errors
                ]
            methods.append(entry)
        return {
            "openrpc": OPENRPC_VERSION,
            "info": {"title": self.title, "version": self.version},
            "methods": methods,
            "components": {"schemas": schemas},
        }
