"""The SDK's one error type: what a node reported, or why it could not be reached.

Errors carry the same `ErrorCode` names the node uses (protocol/errors.py), so
scripts and the CLI branch on `err.code`, never on message text.
"""

from __future__ import annotations

from protocol.errors import ErrorCode, MeshrunError, code_from_rpc


class RpcError(MeshrunError):
    """An error reported by (or about reaching) a node.

    It is a MeshrunError so code that already handles local errors by code
    handles remote ones the same way. `retry_after` is the node's advice, in
    seconds, on a RATE_LIMITED refusal (from the error's details or the HTTP
    Retry-After header); None when it gave none.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        details: dict[str, object] | None = None,
        *,
        rpc_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, message, details)
        self.rpc_code = code.rpc_code if rpc_code is None else rpc_code
        advised = _seconds(self.details.get("retry_after"))
        self.retry_after = retry_after if advised is None else advised

    @classmethod
    def from_error_object(cls, error: object, *, retry_after: float | None = None) -> RpcError:
        """A JSON-RPC error object ({code, message, data: {code, details}}) as an RpcError.

        The code's name in `data.code` wins; a node that sent only the number is
        understood by the number.
        """
        if not isinstance(error, dict):
            return cls(ErrorCode.INTERNAL_ERROR, f"malformed error from node: {error!r}")
        number = error.get("code")
        data = error.get("data")
        code: ErrorCode | None = None
        details: dict[str, object] = {}
        if isinstance(data, dict):
            try:
                code = ErrorCode(str(data.get("code")))
            except ValueError:
                code = None
            if isinstance(data.get("details"), dict):
                details = data["details"]
        if code is None:
            code = (
                code_from_rpc(number)
                if isinstance(number, int) and not isinstance(number, bool)
                else ErrorCode.INTERNAL_ERROR
            )
        message = error.get("message")
        return cls(
            code,
            message if isinstance(message, str) else str(message),
            details,
            rpc_code=number if isinstance(number, int) else None,
            retry_after=retry_after,
        )


def _seconds(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def unreachable(url: str, reason: str) -> RpcError:
    return RpcError(
        ErrorCode.NODE_UNREACHABLE,
        f"cannot reach a meshrun node at {url} ({reason}); "
        "is the node running? Start one with `meshrun node`.",
        {"url": url},
    )


def timed_out(url: str, what: str, kind: str) -> RpcError:
    return RpcError(
        ErrorCode.TIMEOUT,
        f"{what} on {url} got no reply in time ({kind})",
        {"url": url, "method": what},
    )


def malformed(what: str) -> RpcError:
    return RpcError(ErrorCode.MALFORMED_MESSAGE, what)


__all__ = ["RpcError", "malformed", "timed_out", "unreachable"]
