"""Error codes (protocol.errors): one stable name and one stable JSON-RPC number each."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ErrorCode, MeshrunError, code_from_rpc

KNOWN = {code.rpc_code for code in ErrorCode}


def test_rpc_codes_are_unique() -> None:
    numbers = [code.rpc_code for code in ErrorCode]
    assert len(numbers) == len(set(numbers)) == len(ErrorCode)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_code_from_rpc_round_trip(code: ErrorCode) -> None:
    assert code_from_rpc(code.rpc_code) is code


@pytest.mark.parametrize("code", list(ErrorCode))
def test_names_and_values_agree(code: ErrorCode) -> None:
    assert code.value == code.name
    assert ErrorCode(code.value) is code
    assert isinstance(code.rpc_code, int)


def test_json_rpc_spec_codes() -> None:
    assert ErrorCode.PARSE_ERROR.rpc_code == -32700
    assert ErrorCode.INVALID_REQUEST.rpc_code == -32600
    assert ErrorCode.METHOD_NOT_FOUND.rpc_code == -32601
    assert ErrorCode.INVALID_PARAMS.rpc_code == -32602
    assert ErrorCode.INTERNAL_ERROR.rpc_code == -32603


def test_own_codes_in_server_range() -> None:
    spec_codes = {-32700, -32600, -32601, -32602, -32603}
    for code in ErrorCode:
        if code.rpc_code not in spec_codes:
            assert -32099 <= code.rpc_code <= -32000, code


def test_pinned_numbers_never_change() -> None:
    """Clients match on these numbers: changing one is a protocol break."""
    assert ErrorCode.JOB_NOT_FOUND.rpc_code == -32001
    assert ErrorCode.SIGNATURE_INVALID.rpc_code == -32003
    assert ErrorCode.MALFORMED_MESSAGE.rpc_code == -32008
    assert ErrorCode.ILLEGAL_TRANSITION.rpc_code == -32016
    assert ErrorCode.UNSUPPORTED_VERSION.rpc_code == -32017
    assert ErrorCode.UNAUTHORIZED.rpc_code == -32019
    assert ErrorCode.RATE_LIMITED.rpc_code == -32020


@given(st.integers())
def test_unknown_numbers_are_internal_error(number: int) -> None:
    code = code_from_rpc(number)
    if number in KNOWN:
        assert code.rpc_code == number
    else:
        assert code is ErrorCode.INTERNAL_ERROR


@pytest.mark.parametrize("number", [0, 1, -32000, -32099, -32090, -32604, -32701, 32001])
def test_specific_unknown_numbers(number: int) -> None:
    assert code_from_rpc(number) is ErrorCode.INTERNAL_ERROR


def test_meshrun_error_carries_code_message_details() -> None:
    err = MeshrunError(ErrorCode.NO_BIDS, "nobody answered", {"waited": 3})
    assert err.code is ErrorCode.NO_BIDS
    assert err.message == "nobody answered"
    assert err.details == {"waited": 3}
    assert str(err) == "NO_BIDS: nobody answered"
    assert isinstance(err, Exception)
    assert MeshrunError(ErrorCode.TIMEOUT, "x").details == {}
