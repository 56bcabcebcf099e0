"""Every SDK operation, written once as a sans-io generator (see node/sdk/core.py).

Each function here takes the `Session` and the call's arguments and yields
effects; `Client` and `AsyncClient` expose each one as a method of the same
name, signature and docstring (node/sdk/clients.py). So the rate-limit retry,
the job.wait long-poll, the status stream's reconnect-and-resume and the typed
decoding of every result exist once, for both clients.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from node.sdk.core import (
    Emit,
    HttpReply,
    Machine,
    Session,
    Sleep,
    SseMessage,
    SseParser,
    Stream,
    TransportFailure,
    open_stream,
    read,
    send,
)
from node.sdk.errors import RpcError, malformed
from node.sdk.models import (
    ApiDocument,
    Bids,
    CarExport,
    CarImport,
    CatalogModel,
    Deleted,
    Earnings,
    EarningsExport,
    Event,
    EventLog,
    Fetched,
    GcReport,
    Job,
    JobBatch,
    JobExport,
    JobPage,
    LoginLink,
    ModelCatalog,
    NodeInfo,
    Peers,
    Pinned,
    Pins,
    Providers,
    Published,
    Results,
    Revoked,
    Share,
    Stats,
    StorageAdd,
    StorageFile,
    StorageStatus,
    StorageTree,
    Unpinned,
)
from protocol.errors import ErrorCode

M = TypeVar("M", bound=BaseModel)

WAIT_SLICE = 30.0  # longest single job.wait, so no request outlives a proxy's timeout
WAIT_MARGIN = 10.0  # HTTP timeout beyond the slice


# ---------------------------------------------------------------------------- calls


def rpc(
    session: Session, method: str, params: Mapping[str, Any], timeout: float | None = None
) -> Machine[Any]:
    """One JSON-RPC call, repeated after a pause while the node rate-limits it."""
    attempt = 0
    while True:
        request_id, request = session.rpc_request(method, params, timeout)
        outcome = yield from send(request)
        try:
            return session.rpc_result(request_id, method, outcome)
        except RpcError as err:
            pause = session.retry.rate_limit_pause(err, attempt)
            if pause is None:
                raise
        attempt += 1
        yield Sleep(pause)


def parse(model: type[M], method: str, result: Any) -> M:
    """A method's result as its model; a reply of the wrong shape is MALFORMED_MESSAGE."""
    try:
        return model.model_validate(result)
    except ValidationError as exc:
        raise RpcError(
            ErrorCode.MALFORMED_MESSAGE,
            f"{method} returned a result that is not a {model.__name__}: {exc}",
            {"method": method},
        ) from None


def typed(
    session: Session,
    model: type[M],
    method: str,
    params: Mapping[str, Any],
    timeout: float | None = None,
) -> Machine[M]:
    return parse(model, method, (yield from rpc(session, method, params, timeout)))


def _given(**params: Any) -> dict[str, Any]:
    """The params the caller gave: None means "the node's default", so it is left out."""
    return {name: value for name, value in params.items() if value is not None}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def call(session: Session, method: str, /, **params: Any) -> Machine[Any]:
    """Any method by name; its result as the node sent it (JSON, untyped)."""
    return (yield from rpc(session, method, params))


# ---------------------------------------------------------------------------- node


def node_info(session: Session, /) -> Machine[NodeInfo]:
    """Who the node is: peer ID, mode, addresses, RPC URL, providers, device."""
    return (yield from typed(session, NodeInfo, "node.info", {}))


def node_peers(
    session: Session, /, *, limit: int | None = None, role: str | None = None
) -> Machine[Peers]:
    """Peers the node is connected to, those on the job topic, and what it knows of
    each peer's past (score, why, exclusion, counts; `limit` most recently seen)."""
    return (yield from typed(session, Peers, "node.peers", _given(limit=limit, role=role)))


def rpc_discover(session: Session, /) -> Machine[ApiDocument]:
    """The node's API as an OpenRPC document."""
    return (yield from typed(session, ApiDocument, "rpc.discover", {}))


# ---------------------------------------------------------------------------- storage


def storage_add(session: Session, /, data: bytes) -> Machine[str]:
    """Store bytes on the node (stored, pinned, announced); returns their CID."""
    added = yield from typed(session, StorageAdd, "storage.add", {"data_b64": _b64(data)})
    return added.cid


def storage_get(session: Session, /, cid: str, path: str | None = None) -> Machine[bytes]:
    """The bytes of a file by CID (and `path` inside a directory CID)."""
    found = yield from typed(session, StorageFile, "storage.get", _given(cid=cid, path=path))
    try:
        return found.data
    except (binascii.Error, ValueError):
        raise malformed("node returned no valid base64 'data_b64'") from None


def storage_tree(session: Session, /, cid: str) -> Machine[StorageTree]:
    """Every file under a directory CID (`.contents()` decodes them)."""
    return (yield from typed(session, StorageTree, "storage.tree", {"cid": cid}))


def storage_fetch(
    session: Session,
    /,
    cid: str,
    *,
    timeout: float | None = None,
    peer: str | None = None,
    pin: bool | None = None,
) -> Machine[Fetched]:
    """Make a CID local: this node, then providers on the mesh, then the IPFS daemon."""
    params = _given(cid=cid, timeout=timeout, peer=peer, pin=pin)
    http_timeout = None if timeout is None else timeout + WAIT_MARGIN
    return (yield from typed(session, Fetched, "storage.fetch", params, http_timeout))


def storage_providers(session: Session, /, cid: str) -> Machine[Providers]:
    """Peers that announced they provide a CID."""
    return (yield from typed(session, Providers, "storage.providers", {"cid": cid}))


def storage_export_car(session: Session, /, cid: str) -> Machine[CarExport]:
    """The DAG under a CID as a CARv1 file (`.car` is its bytes)."""
    return (yield from typed(session, CarExport, "storage.export_car", {"cid": cid}))


def storage_import_car(session: Session, /, car: bytes, *, pin: bool = True) -> Machine[CarImport]:
    """Store every block of a CARv1 file (each verified by its hash) and pin its roots."""
    params = {"car_b64": _b64(car), "pin": pin}
    return (yield from typed(session, CarImport, "storage.import_car", params))


def storage_pin(
    session: Session,
    /,
    cid: str,
    *,
    label: str | None = None,
    expires: bool | None = None,
    timeout: float | None = None,
) -> Machine[Pinned]:
    """Keep a DAG (fetched first if needed) until unpinned."""
    params = _given(cid=cid, label=label, expires=expires, timeout=timeout)
    http_timeout = None if timeout is None else timeout + WAIT_MARGIN
    return (yield from typed(session, Pinned, "storage.pin", params, http_timeout))


def storage_unpin(
    session: Session, /, cid: str | None = None, *, label: str | None = None
) -> Machine[Unpinned]:
    """Drop pins by CID and/or label (their blocks go at the next garbage collection)."""
    return (yield from typed(session, Unpinned, "storage.unpin", _given(cid=cid, label=label)))


def storage_pins(
    session: Session, /, cid: str | None = None, *, label: str | None = None
) -> Machine[Pins]:
    """Pinned roots with their labels and ages."""
    return (yield from typed(session, Pins, "storage.pins", _given(cid=cid, label=label)))


def storage_gc(session: Session, /, *, grace_seconds: float | None = None) -> Machine[GcReport]:
    """Expire pins past the retention period and delete unpinned blocks."""
    params = _given(grace_seconds=grace_seconds)
    return (yield from typed(session, GcReport, "storage.gc", params))


def storage_publish(session: Session, /, cid: str) -> Machine[Published]:
    """Add and pin a DAG on the node's IPFS daemon now, under the same CID."""
    return (yield from typed(session, Published, "storage.publish", {"cid": cid}))


def storage_status(session: Session, /) -> Machine[StorageStatus]:
    """Blockstore size, pins, retention, IPFS daemon and provider state."""
    return (yield from typed(session, StorageStatus, "storage.status", {}))


# ---------------------------------------------------------------------------- jobs


def submit_job(
    session: Session,
    /,
    model_cid: str | None = None,
    inputs_cid: str | None = None,
    *,
    timeout_seconds: float = 60,
    max_price: float | None = None,
    model: str | None = None,
    priority: str | None = None,
    params: Mapping[str, str | int | float | bool] | None = None,
    requirements: Mapping[str, Any] | None = None,
    outputs: Sequence[str] | None = None,
    bid_window_seconds: float | None = None,
    verification: str | None = None,
    tolerance: Mapping[str, Any] | None = None,
    wait: float | None = None,
    **extra: Any,
) -> Machine[Job]:
    """Submit an ONNX job: the model by CID (or `model=` a catalog name, with
    model_cid None) and an .npz inputs bundle by CID. `outputs` keeps only those
    model outputs; `verification` is "receipt", "redundant:K" or "sample:P" (None:
    the node's default) and `tolerance` how executors' outputs are compared
    ({"mode": "values"|"argmax"|"topk", "atol", "rtol", "k"}); `extra` passes any
    other job.submit param through. `prompt=` (the AITBC seed's text-generation
    job) is sent as is; the node refuses it with UNSUPPORTED until prompt jobs exist.
    `wait` (seconds, at most 300) makes the node answer only once the job has ended
    or that long has passed: submit and wait in one HTTP call instead of two, which
    is what a client running many short jobs pays for; the record says which."""
    request = _given(
        model_cid=model_cid,
        model=model,
        inputs_cid=inputs_cid,
        timeout_seconds=timeout_seconds,
        max_price=max_price,
        priority=priority,
        params=None if params is None else dict(params),
        requirements=None if requirements is None else dict(requirements),
        output_config=None if outputs is None else {"outputs": list(outputs)},
        bid_window_seconds=bid_window_seconds,
        verification=verification,
        tolerance=None if tolerance is None else dict(tolerance),
        wait=wait,
    )
    request.update(extra)
    timeout = None if wait is None else wait + WAIT_MARGIN
    return (yield from typed(session, Job, "job.submit", request, timeout))


def get_job(session: Session, /, job_id: str, *, include: Sequence[str] = ()) -> Machine[Job]:
    """A job's current record; `include` adds "logs", "metrics" and/or "resources"."""
    params: dict[str, Any] = {"job_id": job_id}
    if include:
        params["include"] = list(include)
    return (yield from typed(session, Job, "job.get", params))


def get_jobs(session: Session, /, job_ids: Sequence[str]) -> Machine[JobBatch]:
    """Several job records at once (at most 100); unknown IDs are listed in `missing`."""
    return (yield from typed(session, JobBatch, "job.get_batch", {"job_ids": list(job_ids)}))


def wait_for_job(
    session: Session, /, job_id: str, timeout: float = 120, poll_interval: float = 1.0
) -> Machine[Job]:
    """The job's record once it is terminal; TIMEOUT error after `timeout` seconds.

    Long-polls `job.wait` in slices, so no single HTTP request outlives a proxy,
    or polls `job.get` every `poll_interval` on a node without job.wait.
    """
    clock = session.clock
    deadline = clock() + timeout
    use_wait = True
    job: Job | None = None
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            status = None if job is None else job.status.value
            raise RpcError(
                ErrorCode.TIMEOUT,
                f"job {job_id} did not finish within {timeout:g} s (last status: {status})",
                {"job_id": job_id, "status": status},
            )
        started = clock()
        if use_wait:
            slice_ = min(remaining, WAIT_SLICE)
            params = {"job_id": job_id, "timeout": slice_}
            try:
                job = yield from typed(session, Job, "job.wait", params, slice_ + WAIT_MARGIN)
            except RpcError as err:
                if err.code is not ErrorCode.METHOD_NOT_FOUND:
                    raise
                use_wait = False
                continue
        else:
            job = yield from get_job(session, job_id)
        if job.terminal:
            return job
        # Pause only when the node answered faster than poll_interval: a node that
        # does not block in job.wait is not hammered, one that does adds no delay.
        delay = min(started + poll_interval, deadline) - clock()
        if delay > 0:
            yield Sleep(delay)


def list_jobs(
    session: Session,
    /,
    status: str | None = None,
    *,
    from_time: float | None = None,
    to_time: float | None = None,
    days: float | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> Machine[JobPage]:
    """Jobs on this node, newest first, one page (`next_cursor` asks for the next)."""
    params = _given(
        status=status, from_time=from_time, to_time=to_time, days=days, limit=limit, cursor=cursor
    )
    return (yield from typed(session, JobPage, "job.list", params))


def job_events(session: Session, /, job_id: str, *, after_seq: int = 0) -> Machine[EventLog]:
    """A job's event log (bids, refusals, progress, receipt…), after `after_seq`."""
    params = {"job_id": job_id, "after_seq": after_seq}
    return (yield from typed(session, EventLog, "job.events", params))


def job_bids(session: Session, /, job_id: str) -> Machine[Bids]:
    """The bids and reasoned refusals a job received."""
    return (yield from typed(session, Bids, "job.bids", {"job_id": job_id}))


def cancel_job(
    session: Session, /, job_id: str, *, force: bool = False, reason: str | None = None
) -> Machine[Job]:
    """Cancel a job; an executor running it is told to stop."""
    params = _given(job_id=job_id, force=force, reason=reason)
    return (yield from typed(session, Job, "job.cancel", params))


def job_results(session: Session, /, job_id: str) -> Machine[Results]:
    """The files (path, size, sha256) of a finished job's result package."""
    return (yield from typed(session, Results, "job.results", {"job_id": job_id}))


def export_jobs(
    session: Session,
    /,
    format: str = "json",
    *,
    status: str | None = None,
    from_time: float | None = None,
    to_time: float | None = None,
    days: float | None = None,
) -> Machine[JobExport]:
    """Job history as records (format "json") or CSV text (format "csv")."""
    params = _given(format=format, status=status, from_time=from_time, to_time=to_time, days=days)
    return (yield from typed(session, JobExport, "job.export", params))


def job_stats(session: Session, /, *, days: float | None = None) -> Machine[Stats]:
    """Totals, success rate, average completion time and amount spent."""
    return (yield from typed(session, Stats, "job.stats", _given(days=days)))


def node_earnings(
    session: Session,
    /,
    *,
    since: float | None = None,
    until: float | None = None,
    days: float | None = None,
) -> Machine[Earnings]:
    """A compute node's settled earnings by day and by requester, and its unsettled jobs."""
    params = _given(since=since, until=until, days=days)
    return (yield from typed(session, Earnings, "node.earnings", params))


def earnings_export(
    session: Session,
    /,
    *,
    since: float | None = None,
    until: float | None = None,
    days: float | None = None,
    cursor: int | None = None,
    limit: int | None = None,
) -> Machine[EarningsExport]:
    """One page of signed settlements as export lines; pass `next_cursor` for the next."""
    params = _given(since=since, until=until, days=days, cursor=cursor, limit=limit)
    return (yield from typed(session, EarningsExport, "node.earnings_export", params))


def delete_job(session: Session, /, job_id: str) -> Machine[Deleted]:
    """Delete a finished job and the result blocks only it kept."""
    return (yield from typed(session, Deleted, "job.delete", {"job_id": job_id}))


def share(
    session: Session, /, target: str, *, path: str | None = None, expires_in: int | None = None
) -> Machine[Share]:
    """A link to a job's result (or a CID) that a browser opens with no token, until it expires."""
    params = _given(target=target, path=path, expires_in=expires_in)
    return (yield from typed(session, Share, "share.create", params))


def revoke_share(session: Session, /, share: str) -> Machine[Revoked]:
    """Make a share link (the link, its token or its id) stop working now."""
    return (yield from typed(session, Revoked, "share.revoke", {"share": share}))


def login_link(session: Session, /, *, next: str | None = None) -> Machine[LoginLink]:
    """A one-time URL (2 minutes) that logs a browser into the node's explorer."""
    return (yield from typed(session, LoginLink, "explorer.login_link", _given(next=next)))


def add_model(
    session: Session, /, name: str, data: bytes | None = None, *, cid: str | None = None
) -> Machine[CatalogModel]:
    """Name a model in the node's catalog: its .onnx bytes, or the CID of one stored."""
    params = _given(name=name, data_b64=None if data is None else _b64(data), cid=cid)
    return (yield from typed(session, CatalogModel, "model.add", params))


def list_models(session: Session, /) -> Machine[ModelCatalog]:
    """The node's model catalog."""
    return (yield from typed(session, ModelCatalog, "model.list", {}))


# ---------------------------------------------------------------------------- stream


def stream_status(
    session: Session, /, job_id: str, *, timeout: float | None = None
) -> Stream[Event]:
    """The job's events as they happen, until one shows a terminal status.

    Over the node's SSE stream: first a `Snapshot` event (the record in
    `data["job"]`), then each event with the job's `status`, `substate` and
    `progress` after it. A dropped stream is reopened with Last-Event-ID, so no
    event is skipped; a rate-limited open waits like a call does. `timeout`
    bounds the whole wait (TIMEOUT error).
    """
    clock = session.clock
    deadline = None if timeout is None else clock() + timeout
    parser = SseParser()
    failures = 0  # drops in a row; an event resets it
    refusals = 0
    while True:
        _in_time(job_id, timeout, deadline, clock())
        request = session.stream_request(job_id, parser.last_event_id)
        opened = yield from open_stream(request)
        if isinstance(opened, HttpReply) and opened.status != 200:
            err = session.rest_error(opened)
            pause = session.retry.rate_limit_pause(err, refusals)
            if pause is None:
                raise err
            refusals += 1
            yield Sleep(pause)
            continue
        ended = opened if isinstance(opened, TransportFailure) else None
        if ended is None:
            parser.reconnect()
            while True:
                chunk = yield from read()
                if chunk is None or isinstance(chunk, TransportFailure):
                    ended = chunk
                    break
                for event in _events(parser.feed(chunk)):
                    failures = 0
                    yield Emit(event)
                    if event.terminal:
                        return
                _in_time(job_id, timeout, deadline, clock())
        if ended is not None and ended.kind == "timeout":
            raise ended.error(request.url, "status stream")
        failures += 1
        pause = session.retry.reconnect_pause(failures)
        if pause is None:
            if ended is not None:
                raise ended.error(request.url, "status stream")
            raise RpcError(
                ErrorCode.NODE_UNREACHABLE,
                f"status stream of {job_id} keeps ending before the job does",
                {"url": request.url},
            )
        yield Sleep(pause)


def _in_time(job_id: str, timeout: float | None, deadline: float | None, now: float) -> None:
    if timeout is not None and deadline is not None and now > deadline:
        raise RpcError(
            ErrorCode.TIMEOUT,
            f"job {job_id} did not finish within {timeout:g} s of streaming",
            {"job_id": job_id},
        )


def _events(messages: list[SseMessage]) -> list[Event]:
    """The job events among SSE messages (each a JSON object)."""
    events = []
    for message in messages:
        try:
            payload = json.loads(message.data)
        except ValueError as exc:
            raise malformed(f"status stream sent non-JSON data: {exc}") from None
        if isinstance(payload, dict):
            events.append(parse(Event, "status stream", payload))
    return events


__all__ = [
    "add_model",
    "call",
    "cancel_job",
    "delete_job",
    "earnings_export",
    "export_jobs",
    "get_job",
    "get_jobs",
    "job_bids",
    "job_events",
    "job_results",
    "job_stats",
    "list_jobs",
    "list_models",
    "login_link",
    "node_earnings",
    "node_info",
    "node_peers",
    "revoke_share",
    "rpc_discover",
    "share",
    "storage_add",
    "storage_export_car",
    "storage_fetch",
    "storage_gc",
    "storage_get",
    "storage_import_car",
    "storage_pin",
    "storage_pins",
    "storage_providers",
    "storage_publish",
    "storage_status",
    "storage_tree",
    "stream_status",
    "submit_job",
    "wait_for_job",
]
