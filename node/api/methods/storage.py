"""JSON-RPC methods for content beyond add/get: fetch from anywhere, CAR export and
import, pins, garbage collection, the IPFS daemon, providers.

CARs travel base64 inside JSON, so one call is capped (EXPORT_LIMIT); the
gateway's `GET /ipfs/<cid>?format=car` streams a CAR of any size.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

import trio
from pydantic import BaseModel, ConfigDict, Field

from node.api.methods.jobs import parse_cid
from node.api.rpc import NoParams, Registry
from protocol.errors import ErrorCode, MeshrunError
from storage.car import iter_car
from storage.errors import (
    BlockNotFound,
    ContentTooLarge,
    CorruptBlock,
    MalformedBlock,
    StorageError,
)

if TYPE_CHECKING:
    from node.api.methods.served import ServedNode
    from node.content.service import Content

EXPORT_LIMIT = 48 * 1024 * 1024


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CidParams(_Params):
    cid: str


class FetchParams(_Params):
    cid: str
    timeout: float = Field(default=60.0, gt=0, le=600)
    peer: str | None = Field(default=None, description="a provider to ask first (PeerID)")
    pin: bool = Field(default=True, description="pin what was fetched (label 'fetched')")
    max_bytes: int | None = Field(
        default=None,
        ge=0,
        description="refuse a DAG bigger than this (cumulative size); never above the node's limit",
    )


class ImportCarParams(_Params):
    car_b64: str = Field(description="a CARv1 file, base64")
    pin: bool = Field(default=True, description="pin the CAR's roots (label 'imported')")


class PinParams(_Params):
    cid: str
    label: str = Field(default="user", min_length=1, max_length=200)
    expires: bool = Field(default=False, description="subject to the retention setting")
    timeout: float = Field(default=60.0, gt=0, le=600)


class UnpinParams(_Params):
    cid: str | None = None
    label: str | None = Field(default=None, min_length=1, max_length=200)


class PinsParams(_Params):
    cid: str | None = None
    label: str | None = None


class GcParams(_Params):
    grace_seconds: float = Field(default=600.0, ge=0, description="spare blocks younger than this")


def register_storage_methods(registry: Registry, node: ServedNode) -> None:
    def content() -> Content:
        return node.ctx.content

    @registry.method(
        "storage.fetch", FetchParams,
        summary="Make a CID local: this node, then providers on the mesh, then the IPFS daemon",
        result="{cid, source: local|mesh|ipfs, provider, blocks, bytes, seconds}",
        errors=[ErrorCode.INVALID_CID, ErrorCode.CID_NOT_FOUND, ErrorCode.CONTENT_TOO_LARGE],
    )  # fmt: skip
    async def storage_fetch(p: FetchParams) -> dict[str, Any]:
        return await content().fetch(
            parse_cid(p.cid), timeout=p.timeout, peer=p.peer, pin=p.pin, max_bytes=p.max_bytes
        )

    @registry.method(
        "storage.export_car", CidParams,
        summary="The DAG under a CID as a CARv1 file (what `ipfs dag export` writes)",
        result="{cid, car_b64, size, blocks}",
        errors=[ErrorCode.INVALID_CID, ErrorCode.CID_NOT_FOUND, ErrorCode.MESSAGE_TOO_LARGE],
    )  # fmt: skip
    async def storage_export_car(p: CidParams) -> dict[str, Any]:
        root = parse_cid(p.cid)
        store = content().store

        def build() -> tuple[bytes, int]:
            out = bytearray()
            blocks = -1  # the header is the first piece
            for piece in iter_car(store.get, [root]):
                out += piece
                blocks += 1
                if len(out) > EXPORT_LIMIT:
                    raise MeshrunError(
                        ErrorCode.MESSAGE_TOO_LARGE,
                        f"the CAR of {root} is over {EXPORT_LIMIT} bytes; stream it from "
                        f"the gateway instead: GET /ipfs/{root}?format=car",
                        {"limit": EXPORT_LIMIT},
                    )
            return bytes(out), blocks // 2

        try:
            car, blocks = await trio.to_thread.run_sync(build)
        except BlockNotFound as exc:
            raise MeshrunError(ErrorCode.CID_NOT_FOUND, str(exc), {"cid": p.cid}) from None
        except StorageError as exc:
            raise MeshrunError(ErrorCode.INVALID_CID, str(exc), {"cid": p.cid}) from None
        return {
            "cid": str(root),
            "car_b64": base64.b64encode(car).decode(),
            "size": len(car),
            "blocks": blocks,
        }

    @registry.method(
        "storage.import_car", ImportCarParams,
        summary="Store every block of a CARv1 file (each verified by its hash) and pin its roots",
        result="{roots, blocks, bytes, complete: {root: bool}}",
        errors=[ErrorCode.INVALID_PARAMS, ErrorCode.MALFORMED_MESSAGE,
                ErrorCode.VERIFICATION_MISMATCH],
    )  # fmt: skip
    async def storage_import_car(p: ImportCarParams) -> dict[str, Any]:
        try:
            data = base64.b64decode(p.car_b64, validate=True)
        except (binascii.Error, ValueError):
            raise MeshrunError(ErrorCode.INVALID_PARAMS, "car_b64 is not valid base64") from None
        try:
            return await content().import_car(data, pin=p.pin)
        except CorruptBlock as exc:
            raise MeshrunError(ErrorCode.VERIFICATION_MISMATCH, str(exc)) from None
        except MalformedBlock as exc:
            raise MeshrunError(ErrorCode.MALFORMED_MESSAGE, f"not a valid CAR: {exc}") from None

    @registry.method(
        "storage.pin", PinParams,
        summary="Keep a DAG (fetched first if needed) until unpinned",
        result="{cid, label, expires, fetch}",
        errors=[ErrorCode.INVALID_CID, ErrorCode.CID_NOT_FOUND, ErrorCode.CONTENT_TOO_LARGE],
    )  # fmt: skip
    async def storage_pin(p: PinParams) -> dict[str, Any]:
        cid = parse_cid(p.cid)
        fetched = await content().fetch(cid, timeout=p.timeout, pin=False)
        await content().keep(cid, p.label, expires=p.expires)
        return {"cid": str(cid), "label": p.label, "expires": p.expires, "fetch": fetched}

    @registry.method(
        "storage.unpin", UnpinParams,
        summary="Drop pins by CID and/or label (blocks go at the next garbage collection)",
        result="{unpinned: [cid]}",
        errors=[ErrorCode.INVALID_PARAMS, ErrorCode.INVALID_CID],
    )  # fmt: skip
    async def storage_unpin(p: UnpinParams) -> dict[str, Any]:
        c = content()
        if p.cid is None and p.label is None:
            raise MeshrunError(ErrorCode.INVALID_PARAMS, "give a cid, a label, or both")
        if p.cid is None:
            assert p.label is not None
            orphans = await c.unpin_label(p.label)
        else:
            orphans = await c.unpin(parse_cid(p.cid), p.label)
        return {"unpinned": [str(o) for o in orphans]}

    @registry.method(
        "storage.pins", PinsParams,
        summary="Pinned roots with their labels and ages",
        result="{pins: [{cid, label, created_at, expires}]}",
        errors=[ErrorCode.INVALID_CID],
    )  # fmt: skip
    async def storage_pins(p: PinsParams) -> dict[str, Any]:
        cid = parse_cid(p.cid) if p.cid else None
        pins = content().pins.pins(cid, p.label)
        return {
            "pins": [
                {"cid": str(x.cid), "label": x.label, "created_at": x.created_at,
                 "expires": x.expires}
                for x in pins
            ]
        }  # fmt: skip

    @registry.method(
        "storage.gc", GcParams,
        summary="Expire pins past the retention period and delete unpinned blocks",
        result="{expired_pins, removed_blocks, freed_bytes, marked_blocks, seconds}",
    )  # fmt: skip
    async def storage_gc(p: GcParams) -> dict[str, Any]:
        return await content().gc(grace_seconds=p.grace_seconds)

    @registry.method(
        "storage.publish", CidParams,
        summary="Add and pin a DAG on the IPFS daemon now, under the same CID",
        result="{cid, method, seconds}",
        errors=[ErrorCode.INVALID_CID, ErrorCode.CID_NOT_FOUND, ErrorCode.IPFS_UNAVAILABLE],
    )  # fmt: skip
    async def storage_publish(p: CidParams) -> dict[str, Any]:
        cid = parse_cid(p.cid)
        if await trio.to_thread.run_sync(content().store.missing_blocks, cid):
            raise MeshrunError(ErrorCode.CID_NOT_FOUND, f"{cid} is not complete on this node")
        return await content().publish_now(cid)

    @registry.method(
        "storage.providers", CidParams,
        summary="Peers that announced they provide a CID",
        result="{cid, providers: [{peer_id, addrs, seen_at}]}",
        errors=[ErrorCode.INVALID_CID],
    )  # fmt: skip
    async def storage_providers(p: CidParams) -> dict[str, Any]:
        cid = parse_cid(p.cid)
        records = content().providers.table.get(cid)
        return {
            "cid": str(cid),
            "providers": [
                {"peer_id": r.peer_id, "addrs": r.addrs, "seen_at": r.seen_at} for r in records
            ],
        }

    @registry.method(
        "storage.status", NoParams,
        summary="Blockstore size, pins, retention, IPFS daemon and provider state",
        result="{blocks, bytes, pins, retention_days, ipfs, providers, last_gc}",
    )  # fmt: skip
    async def storage_status(_: NoParams) -> dict[str, Any]:
        c = content()

        def count() -> tuple[int, int]:
            blocks = sum(1 for _ in c.store.iter_cids())
            return blocks, c.store.size_bytes()

        blocks, size = await trio.to_thread.run_sync(count)
        return {"blocks": blocks, "bytes": size, **c.status()}


def too_large(cid: str, exc: ContentTooLarge, limit: int | None) -> MeshrunError:
    """CONTENT_TOO_LARGE for a read the node's limit (or the DAG's own sizes) refused."""
    return MeshrunError(
        ErrorCode.CONTENT_TOO_LARGE, f"refused {cid}: {exc}", {"cid": cid, "limit": limit}
    )


__all__ = ["register_storage_methods", "too_large"]
