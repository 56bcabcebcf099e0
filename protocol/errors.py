"""The one list of error codes meshrun speaks.

RPC responses, CLI exit messages, job records and logs all carry these names so
a script can match on a code without parsing prose. Each code also has a stable
JSON-RPC number (server-defined range -32000..-32099 plus the spec's own codes),
so the number a client sees never changes when the list grows.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # JSON-RPC 2.0's own codes.
    PARSE_ERROR = "PARSE_ERROR"
    INVALID_REQUEST = "INVALID_REQUEST"
    METHOD_NOT_FOUND = "METHOD_NOT_FOUND"
    INVALID_PARAMS = "INVALID_PARAMS"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # meshrun's own.
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    INVALID_SPEC = "INVALID_SPEC"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    VERIFICATION_MISMATCH = "VERIFICATION_MISMATCH"
    CID_NOT_FOUND = "CID_NOT_FOUND"
    INVALID_CID = "INVALID_CID"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    MALFORMED_MESSAGE = "MALFORMED_MESSAGE"
    EXPIRED = "EXPIRED"
    NO_BIDS = "NO_BIDS"
    EXECUTION_FAILED = "EXECUTION_FAILED"
    TIMEOUT = "TIMEOUT"
    EXECUTOR_LOST = "EXECUTOR_LOST"
    FETCH_FAILED = "FETCH_FAILED"
    WRONG_MODE = "WRONG_MODE"
    ILLEGAL_TRANSITION = "ILLEGAL_TRANSITION"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    NODE_UNREACHABLE = "NODE_UNREACHABLE"
    UNAUTHORIZED = "UNAUTHORIZED"
    RATE_LIMITED = "RATE_LIMITED"
    # -32019 UNAUTHORIZED and -32020 RATE_LIMITED belong to the HTTP layer.
    CANCELED = "CANCELED"
    JOB_NOT_FINISHED = "JOB_NOT_FINISHED"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    IPFS_UNAVAILABLE = "IPFS_UNAVAILABLE"
    # The node is already holding as many request bodies in memory as it allows.
    BUSY = "BUSY"
    # A DAG over the size its spec, receipt or this node allows, or bigger than
    # its own links declare (a UnixFS "bomb"); refused, nothing of it kept.
    CONTENT_TOO_LARGE = "CONTENT_TOO_LARGE"
    # A job needed more memory than the executor's per-job limit; its worker was killed.
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    # A job's inputs declare more bytes (uncompressed) than the executor takes.
    INPUT_TOO_LARGE = "INPUT_TOO_LARGE"
    # A request asks for something this node cannot do at all (a prompt job for a
    # text-generation model, a Docker engine, an S3 destination): refused, never ignored.
    UNSUPPORTED = "UNSUPPORTED"

    @property
    def rpc_code(self) -> int:
        return _RPC_CODES[self]


_RPC_CODES: dict[ErrorCode, int] = {
    ErrorCode.PARSE_ERROR: -32700,
    ErrorCode.INVALID_REQUEST: -32600,
    ErrorCode.METHOD_NOT_FOUND: -32601,
    ErrorCode.INVALID_PARAMS: -32602,
    ErrorCode.INTERNAL_ERROR: -32603,
    ErrorCode.JOB_NOT_FOUND: -32001,
    ErrorCode.INVALID_SPEC: -32002,
    ErrorCode.SIGNATURE_INVALID: -32003,
    ErrorCode.VERIFICATION_MISMATCH: -32004,
    ErrorCode.CID_NOT_FOUND: -32005,
    ErrorCode.INVALID_CID: -32006,
    ErrorCode.MESSAGE_TOO_LARGE: -32007,
    ErrorCode.MALFORMED_MESSAGE: -32008,
    ErrorCode.EXPIRED: -32009,
    ErrorCode.NO_BIDS: -32010,
    ErrorCode.EXECUTION_FAILED: -32011,
    ErrorCode.TIMEOUT: -32012,
    ErrorCode.EXECUTOR_LOST: -32013,
    ErrorCode.FETCH_FAILED: -32014,
    ErrorCode.WRONG_MODE: -32015,
    ErrorCode.ILLEGAL_TRANSITION: -32016,
    ErrorCode.UNSUPPORTED_VERSION: -32017,
    ErrorCode.NODE_UNREACHABLE: -32018,
    ErrorCode.UNAUTHORIZED: -32019,
    ErrorCode.RATE_LIMITED: -32020,
    ErrorCode.CANCELED: -32021,
    ErrorCode.JOB_NOT_FINISHED: -32022,
    ErrorCode.MODEL_NOT_FOUND: -32023,
    ErrorCode.IPFS_UNAVAILABLE: -32024,
    ErrorCode.BUSY: -32025,
    ErrorCode.CONTENT_TOO_LARGE: -32026,
    ErrorCode.RESOURCE_EXHAUSTED: -32027,
    ErrorCode.INPUT_TOO_LARGE: -32028,
    ErrorCode.UNSUPPORTED: -32029,
}

_BY_RPC_CODE = {number: code for code, number in _RPC_CODES.items()}


def code_from_rpc(number: int) -> ErrorCode:
    """Map a JSON-RPC error number back to its code (unknown numbers are INTERNAL_ERROR)."""
    return _BY_RPC_CODE.get(number, ErrorCode.INTERNAL_ERROR)


class MeshrunError(Exception):
    """An error with a stable code, safe to show to a user or send over RPC."""

    def __init__(
        self, code: ErrorCode, message: str, details: dict[str, object] | None = None
    ) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}
        # What a failed run still produced (e.g. the batch items done before it broke).
        self.partial_outputs: dict[str, object] | None = None
