"""What a node keeps and where it looks: pins, GC and retention, the IPFS daemon
mirror, provider announcements, and fetching a CID from anywhere.

The embedded blockstore is always the source of truth: an IPFS daemon is an
optional mirror, never needed to run or fetch a job. On top of it:

- Everything worth keeping is pinned with a reason (`job:<id>`, `added`,
  `fetched`, `user`); garbage collection deletes what no pin reaches, and the
  retention setting expires pins older than N days.
- With `--ipfs-api`, every pinned root is also published to the user's daemon
  in the background, from a durable queue: a daemon that is down or slow delays
  publication, logs one clear warning, and loses nothing.
- Every pinned root is announced on the providers topic, so any node can
  fetch it without knowing who made it; `fetch` looks locally, then asks
  providers on the mesh (block exchange, bitswap as the fallback), then the
  daemon.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from node.content.bitswap import Bitswap
from node.content.blocks import fetch_dag
from node.content.providers import REANNOUNCE_INTERVAL, Providers
from node.jobs.store import JobDB
from node.transport.mesh import Mesh
from protocol.errors import ErrorCode, MeshrunError
from storage.blockstore import Blockstore
from storage.car import import_car
from storage.cid import Cid
from storage.errors import ContentTooLarge, MalformedBlock, StorageError
from storage.kubo import IpfsError, IpfsUnavailable, KuboBackend
from storage.pins import GcStats, PinStore, collect_garbage, reachable
from storage.unixfs import DagWalk

log = logging.getLogger("meshrun.content")

PINS_FILE = "pins.sqlite"
DAY = 86400.0
# Blocks younger than this survive a periodic collection: an import or a fetch
# may have written them and not pinned its root yet.
GC_GRACE = 600.0
DEFAULT_GC_INTERVAL = 3600.0
MIRROR_RETRY_MIN = 2.0
MIRROR_RETRY_MAX = 60.0
MESH_PROVIDER_TIMEOUT = 20.0
# Asking every connected peer over bitswap (no provider known, or none had it):
# a peer that lacks a block says so at once, so this only bounds the wait for
# one that stays silent; a fetch that keeps receiving blocks goes on.
MESH_BROADCAST_IDLE = 2.0
DEFAULT_MAX_CONTENT_BYTES = 2 * 1024**3


@dataclass
class ContentConfig:
    ipfs_api: str | None = None
    retention_days: float | None = None
    gc_interval: float = DEFAULT_GC_INTERVAL
    ipfs_timeout: float = 60.0
    # The most a fetch or read that no spec or receipt sizes may take (storage.fetch,
    # storage.get, the gateway): the DAG's cumulative size, every link counted.
    max_content_bytes: int | None = DEFAULT_MAX_CONTENT_BYTES


def _gc_dict(stats: GcStats) -> dict[str, Any]:
    return {
        "marked_blocks": stats.marked,
        "removed_blocks": stats.removed,
        "freed_bytes": stats.freed_bytes,
        "spared_young_blocks": stats.spared_young,
        "seconds": round(stats.seconds, 4),
    }


class Content:
    def __init__(
        self,
        data_dir: Path,
        store: Blockstore,
        mesh: Mesh,
        db: JobDB,
        config: ContentConfig | None = None,
    ) -> None:
        self.config = config or ContentConfig()
        self.store = store
        self.mesh = mesh
        self.db = db
        self.pins = PinStore(data_dir / PINS_FILE)
        self.providers = Providers(mesh)
        self.kubo = (
            KuboBackend(self.config.ipfs_api, timeout=self.config.ipfs_timeout)
            if self.config.ipfs_api
            else None
        )
        self._lock = trio.Lock()
        self._active: Counter[Cid] = Counter()
        self._mirror_wake = trio.Event()
        self.ipfs_reachable: bool | None = None
        self.ipfs_last_error: str | None = None
        self.last_gc: dict[str, Any] | None = None

    @property
    def retention_seconds(self) -> float | None:
        days = self.config.retention_days
        return None if days is None or days <= 0 else days * DAY

    def close(self) -> None:
        self.pins.close()

    # ---- background work ---------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._adopt_results()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.providers.run)
            nursery.start_soon(self._reannounce_loop)
            nursery.start_soon(self._gc_loop)
            if self.kubo is not None:
                nursery.start_soon(self._probe_daemon)
                nursery.start_soon(self._mirror_loop)
            task_status.started()

    async def _probe_daemon(self) -> None:
        """Say once, at start, whether the configured daemon answers (and what it is)."""
        kubo = self.kubo
        assert kubo is not None
        try:
            info = await trio.to_thread.run_sync(kubo.version)
        except StorageError as exc:
            self.ipfs_reachable, self.ipfs_last_error = False, str(exc)
            log.warning(
                "%s; results stay in the embedded blockstore and are published when it is up",
                exc,
            )
            return
        self.ipfs_reachable = True
        log.info("IPFS daemon at %s answers (version %s)", kubo.api, info.get("Version"))

    def _adopt_results(self) -> None:
        """Pin results of jobs finished before pins existed, dated by their completion."""
        for record in self.db.list_jobs("completed", 1_000_000):
            if record.result_cid:
                try:
                    cid = Cid.decode(record.result_cid)
                except ValueError:
                    continue
                self.pins.pin(cid, f"job:{record.job_id}", now=record.completed_at)

    async def _reannounce_loop(self) -> None:
        while True:
            await trio.sleep(REANNOUNCE_INTERVAL)
            roots = [c for c in self.pins.roots() if self.store.has(c)]
            if roots:
                await self.providers.announce(roots)

    async def _gc_loop(self) -> None:
        while True:
            await trio.sleep(self.config.gc_interval)
            try:
                await self.gc(grace_seconds=GC_GRACE)
            except Exception:
                log.exception("periodic garbage collection failed")

    # ---- keeping ---------------------------------------------------------------------

    async def keep(
        self, cid: Cid, label: str, *, expires: bool = True, publish: bool = True
    ) -> None:
        """Pin `cid` for `label`, queue it for the daemon, tell the mesh we provide it
        (in the next announcement, a moment later)."""
        self.pins.pin(cid, label, expires=expires)
        if isinstance(self.mesh.bitswap, Bitswap):
            self.mesh.bitswap.blocks_added([cid])  # peers that asked before we had it
        if publish:
            self._queue_publish(cid)
        self.providers.announce_soon([cid])

    async def add_bytes(self, data: bytes, label: str = "added") -> Cid:
        async with self._lock:
            cid = await trio.to_thread.run_sync(self.store.add_bytes, data)
            await self.keep(cid, label)
        return cid

    async def add_tree(self, files: Mapping[str, bytes], label: str) -> Cid:
        """Store a result package and pin it in one step, so no collection runs between."""
        async with self._lock:
            cid = await trio.to_thread.run_sync(self.store.add_tree, files)
            await self.keep(cid, label)
        return cid

    async def unpin(self, cid: Cid, label: str | None = None) -> list[Cid]:
        orphans = self.pins.unpin(cid, label)
        self._queue_unpublish(orphans)
        return orphans

    async def unpin_label(self, label: str) -> list[Cid]:
        _, orphans = self.pins.unpin_label(label)
        self._queue_unpublish(orphans)
        return orphans

    async def import_car(self, data: bytes, *, pin: bool = True) -> dict[str, Any]:
        """Store a CAR's blocks (each verified) and pin its roots, with no GC in between."""
        async with self._lock:
            result = await trio.to_thread.run_sync(import_car, self.store, io.BytesIO(data))
            complete = {}
            for root in result.roots:
                missing = await trio.to_thread.run_sync(self.store.missing_blocks, root)
                complete[str(root)] = not missing
                if pin:
                    await self.keep(root, "imported")
        return {
            "roots": [str(r) for r in result.roots],
            "blocks": result.blocks,
            "bytes": result.bytes,
            "complete": complete,
        }

    async def forget_job(self, job_id: str, result_cid: str | None = None) -> dict[str, Any]:
        """The job.delete hook: drop the job's pins and collect what only it kept.

        Only the blocks of the job's own DAGs are candidates, so this costs the
        size of the result, not of the store, and needs no grace period: a
        block shared with another pinned DAG (the empty log file every result
        has, say) is reachable from that pin and stays.
        """
        label = f"job:{job_id}"
        async with self._lock:
            dropped, orphans = self.pins.unpin_label(label)
            if result_cid:
                try:
                    extra = Cid.decode(result_cid)
                except ValueError:
                    extra = None
                if extra is not None and extra not in dropped and not self.pins.is_pinned(extra):
                    orphans.append(extra)
            self._queue_unpublish(orphans)
            roots = self._live_roots()
            stats = await trio.to_thread.run_sync(self._collect_dags, orphans, roots)
        return {"unpinned": [str(c) for c in orphans], **_gc_dict(stats)}

    def _collect_dags(self, dags: list[Cid], roots: list[Cid]) -> GcStats:
        candidates = list(reachable(self.store, dags).values())
        return collect_garbage(self.store, roots, candidates=candidates)

    def _live_roots(self) -> list[Cid]:
        """Pinned roots plus what running jobs, the model catalog and fetches still need."""
        texts: list[str] = []
        for record in self.db.unfinished():
            spec = record.spec or {}
            texts += [str(spec.get("model_cid") or ""), str(spec.get("inputs_cid") or "")]
            texts.append(record.result_cid or "")
        texts += [str(m.get("cid") or "") for m in self.db.models()]
        roots = self.pins.roots()
        for text in texts:
            try:
                roots.append(Cid.decode(text))
            except ValueError:
                continue
        roots += list(self._active)
        return roots

    @contextmanager
    def _protect(self, cid: Cid) -> Iterator[None]:
        """Keep a DAG being fetched out of reach of a concurrent collection."""
        self._active[cid] += 1
        try:
            yield
        finally:
            self._active[cid] -= 1
            if self._active[cid] <= 0:
                del self._active[cid]

    async def gc(self, grace_seconds: float = GC_GRACE) -> dict[str, Any]:
        """Expire pins past retention, then delete every block no pin reaches."""
        async with self._lock:
            expired = []
            if self.retention_seconds is not None:
                expired = self.pins.expire(self.retention_seconds)
                orphans = [p.cid for p in expired if not self.pins.is_pinned(p.cid)]
                self._queue_unpublish(list(dict.fromkeys(orphans)))
            roots = self._live_roots()
            stats = await trio.to_thread.run_sync(
                lambda: collect_garbage(self.store, roots, grace_seconds=grace_seconds)
            )
        result = {
            "expired_pins": [{"cid": str(p.cid), "label": p.label} for p in expired],
            "retention_days": self.config.retention_days,
            **_gc_dict(stats),
        }
        self.last_gc = {"at": time.time(), **result}
        if stats.removed or expired:
            log.info(
                "garbage collection: %d pin(s) expired, %d block(s) / %d bytes removed",
                len(expired),
                stats.removed,
                stats.freed_bytes,
            )
        return result

    # ---- the IPFS daemon mirror ------------------------------------------------------

    def _queue_publish(self, cid: Cid) -> None:
        if self.kubo is None:
            return
        task = self.pins.remote_task(cid)
        if task is None or task.op != "publish":
            self.pins.queue_remote(cid, "publish")
            self._mirror_wake.set()

    def _queue_unpublish(self, cids: list[Cid]) -> None:
        if self.kubo is None:
            return
        for cid in cids:
            if self.pins.remote_task(cid) is not None:  # only what we put there
                self.pins.queue_remote(cid, "unpin")
        if cids:
            self._mirror_wake.set()

    async def _mirror_loop(self) -> None:
        delay = MIRROR_RETRY_MIN
        while True:
            self._mirror_wake = trio.Event()
            progressed, failed = await self.mirror_pending()
            if failed:
                with trio.move_on_after(delay):
                    await self._mirror_wake.wait()
                delay = min(delay * 2, MIRROR_RETRY_MAX)
                continue
            delay = MIRROR_RETRY_MIN
            if not progressed:
                await self._mirror_wake.wait()

    async def mirror_pending(self) -> tuple[int, bool]:
        """Work through the daemon queue once: (tasks done, whether the daemon failed)."""
        kubo = self.kubo
        if kubo is None:
            return 0, False
        done = 0
        for task in self.pins.remote_pending():
            try:
                if task.op == "publish":
                    if not self.store.has(task.cid):
                        self.pins.remote_done(task.cid, task.op, 0.0)  # collected meanwhile
                        continue
                    result = await trio.to_thread.run_sync(kubo.publish, self.store, task.cid)
                    seconds = result.seconds
                    log.info(
                        "published %s to the IPFS daemon (%s, %.2fs)",
                        task.cid,
                        result.method,
                        seconds,
                    )
                else:
                    started = time.perf_counter()
                    await trio.to_thread.run_sync(kubo.unpin, task.cid)
                    seconds = time.perf_counter() - started
            except IpfsUnavailable as exc:
                self.pins.remote_failed(task.cid, task.op, str(exc))
                if self.ipfs_reachable is not False:
                    log.warning(
                        "%s; results stay in the embedded blockstore and are published "
                        "when it is back (%d waiting)",
                        exc,
                        len(self.pins.remote_pending()),
                    )
                self.ipfs_reachable = False
                self.ipfs_last_error = str(exc)
                return done, True
            except (IpfsError, StorageError) as exc:
                self.pins.remote_failed(task.cid, task.op, str(exc))
                self.ipfs_last_error = str(exc)
                log.warning("IPFS daemon %s of %s failed: %s", task.op, task.cid, exc)
                continue
            if self.ipfs_reachable is False:
                log.info("IPFS daemon at %s is reachable again", kubo.api)
            self.ipfs_reachable = True
            self.pins.remote_done(task.cid, task.op, seconds)
            done += 1
        return done, False

    async def publish_now(self, cid: Cid) -> dict[str, Any]:
        """Publish one DAG to the daemon right away (queued as well, so nothing is lost)."""
        kubo = self._require_kubo()
        self.pins.queue_remote(cid, "publish")
        try:
            result = await trio.to_thread.run_sync(kubo.publish, self.store, cid)
        except IpfsUnavailable as exc:
            self.pins.remote_failed(cid, "publish", str(exc))
            self.ipfs_reachable, self.ipfs_last_error = False, str(exc)
            self._mirror_wake.set()
            raise MeshrunError(
                ErrorCode.IPFS_UNAVAILABLE,
                f"{exc}; {cid} stays in this node's blockstore and is queued for publication",
                {"cid": str(cid), "api": kubo.api},
            ) from None
        except (IpfsError, StorageError) as exc:
            self.pins.remote_failed(cid, "publish", str(exc))
            raise MeshrunError(
                ErrorCode.FETCH_FAILED, str(exc), {"cid": str(cid), "api": kubo.api}
            ) from None
        self.pins.remote_done(cid, "publish", result.seconds)
        self.ipfs_reachable = True
        return {"cid": str(cid), "method": result.method, "seconds": round(result.seconds, 4)}

    def _require_kubo(self) -> KuboBackend:
        if self.kubo is None:
            raise MeshrunError(
                ErrorCode.IPFS_UNAVAILABLE,
                "this node has no IPFS daemon configured; start it with --ipfs-api",
            )
        return self.kubo

    # ---- fetching from anywhere ------------------------------------------------------

    def limit(self, max_bytes: int | None = None) -> int | None:
        """The byte budget of a fetch or read: the caller's, never above the node's."""
        node = self.config.max_content_bytes
        if max_bytes is None:
            return node
        return max_bytes if node is None else min(max_bytes, node)

    async def discard(self, root: Cid, blocks: list[Cid]) -> None:
        """Delete what a refused fetch of `root` wrote, sparing blocks another live DAG reaches.

        fetch_dag's `discard` hook: a block the refused DAG shares with a
        pinned result, a running job or another fetch in progress stays.
        """
        if not blocks:
            return
        async with self._lock:
            roots = [r for r in self._live_roots() if r.multihash != root.multihash]
            stats = await trio.to_thread.run_sync(
                lambda: collect_garbage(self.store, roots, candidates=blocks)
            )
        log.info("discarded %d block(s) of refused %s", stats.removed, root)

    async def fetch(
        self,
        cid: Cid,
        *,
        timeout: float = 60.0,
        peer: str | None = None,
        pin: bool = True,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Make the DAG under `cid` local: here, else providers on the mesh, else the daemon.

        Bounded by `limit(max_bytes)`: a DAG over it, or one whose blocks
        contradict its declared sizes, is refused with CONTENT_TOO_LARGE (or
        FETCH_FAILED when malformed otherwise), whether local or not, and what
        a refused fetch wrote is discarded.
        """
        started = time.perf_counter()
        limit = self.limit(max_bytes)
        try:
            missing = await trio.to_thread.run_sync(
                self.store.walk_local, DagWalk(cid, limit), [cid]
            )
        except MalformedBlock as exc:
            raise _refused(cid, exc, limit) from None
        if not missing:
            return {"cid": str(cid), "source": "local", "blocks": 0, "bytes": 0, "seconds": 0.0}
        deadline = trio.current_time() + timeout
        tried: list[str] = []
        with self._protect(cid):
            result = await self._fetch_mesh(cid, deadline, peer, tried, limit)
            if result is None and self.kubo is not None:
                result = await self._fetch_daemon(cid, deadline, tried, limit)
        if result is None:
            raise MeshrunError(
                ErrorCode.CID_NOT_FOUND,
                f"{cid} is not on this node and could not be fetched ({'; '.join(tried)})",
                {"cid": str(cid), "tried": tried},
            )
        if pin:  # what came from the daemon need not go back to it
            await self.keep(cid, "fetched", publish=result["source"] != "ipfs")
        result["seconds"] = round(time.perf_counter() - started, 4)
        return {"cid": str(cid), **result}

    async def _fetch_mesh(
        self, cid: Cid, deadline: float, peer: str | None, tried: list[str], limit: int | None
    ) -> dict[str, Any] | None:
        candidates: list[tuple[str, list[str]]] = []
        if peer:
            candidates.append((peer, []))
        for record in self.providers.table.get(cid):
            if record.peer_id != self.mesh.peer_id and record.peer_id != peer:
                candidates.append((record.peer_id, record.addrs))
        if not candidates:
            tried.append("no provider known on the mesh")
        for provider, addrs in candidates:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            connected = provider in self.mesh.connected_peers()
            if not connected and not await self._dial(provider, addrs):
                tried.append(f"provider {provider} unreachable")
                continue
            try:
                stats = await fetch_dag(
                    self.mesh,  # the mesh, not its bitswap: a named provider gets the exchange
                    self.store,
                    cid,
                    provider,
                    min(remaining, MESH_PROVIDER_TIMEOUT),
                    max_bytes=limit,
                    discard=self.discard,
                )
            except MeshrunError as exc:
                if exc.code == ErrorCode.CONTENT_TOO_LARGE:
                    raise  # the CID itself is too large: no other provider can help
                tried.append(f"provider {provider}: {exc.message}")
                self.providers.table.forget(cid, provider)
                continue
            return {"source": "mesh", "provider": provider, **_fetch_stats(stats)}
        remaining = deadline - trio.current_time()
        if self.mesh.connected_peers() and remaining > 0:
            try:
                stats = await fetch_dag(
                    self.mesh,
                    self.store,
                    cid,
                    None,
                    remaining,
                    max_bytes=limit,
                    discard=self.discard,
                    idle_timeout=MESH_BROADCAST_IDLE,
                )
            except MeshrunError as exc:
                if exc.code == ErrorCode.CONTENT_TOO_LARGE:
                    raise
                tried.append("no connected peer sent it over bitswap")
            else:
                return {"source": "mesh", "provider": None, **_fetch_stats(stats)}
        return None

    async def _dial(self, peer_id: str, addrs: list[str]) -> bool:
        """Dial a provider at the addresses its signed announcement names, within the
        mesh's dial budget: a stranger's announcement must not aim this node at a host."""
        if not self.mesh.may_dial(peer_id, addrs):
            log.info("not dialling provider %s: over the dial budget", peer_id)
            return False
        for addr in addrs:
            full = addr if "/p2p/" in addr else f"{addr}/p2p/{peer_id}"
            try:
                with trio.fail_after(5):
                    await self.mesh.connect(full)
                return True
            except Exception as exc:
                log.info("could not dial provider %s at %s: %s", peer_id, addr, exc)
        return False

    async def _fetch_daemon(
        self, cid: Cid, deadline: float, tried: list[str], limit: int | None
    ) -> dict[str, Any] | None:
        kubo = self.kubo
        assert kubo is not None
        remaining = max(1.0, deadline - trio.current_time())
        try:
            blocks = await trio.to_thread.run_sync(
                lambda: kubo.fetch(
                    self.store, cid, timeout=min(remaining, kubo.missing_timeout), max_bytes=limit
                )
            )
            await trio.to_thread.run_sync(lambda: self.store.check_dag(cid, max_bytes=limit))
        except IpfsUnavailable as exc:
            self.ipfs_reachable, self.ipfs_last_error = False, str(exc)
            tried.append(str(exc))
            return None
        except MalformedBlock as exc:
            # The daemon's copy is as bad as anyone's: drop what it sent, and stop.
            written = await trio.to_thread.run_sync(
                lambda: list(reachable(self.store, [cid]).values())
            )
            await self.discard(cid, written)
            raise _refused(cid, exc, limit) from None
        except (IpfsError, StorageError) as exc:
            tried.append(f"IPFS daemon at {kubo.api}: {exc}")
            return None
        self.ipfs_reachable = True
        return {"source": "ipfs", "provider": kubo.api, "blocks": blocks, "bytes": None}

    # ---- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        ipfs: dict[str, Any] | None = None
        if self.kubo is not None:
            ipfs = {
                "api": self.kubo.api,
                "reachable": self.ipfs_reachable,
                "last_error": self.ipfs_last_error,
                **self.pins.remote_counts(),
            }
        return {
            "pins": len(self.pins.pins()),
            "pinned_roots": len(self.pins.roots()),
            "retention_days": self.config.retention_days,
            "gc_interval_seconds": self.config.gc_interval,
            "last_gc": self.last_gc,
            "ipfs": ipfs,
            "providers": self.providers.status(),
        }


def _refused(cid: Cid, exc: MalformedBlock, limit: int | None) -> MeshrunError:
    """The error for a DAG a size check refused (CONTENT_TOO_LARGE) or that is malformed."""
    too_large = isinstance(exc, ContentTooLarge)
    return MeshrunError(
        ErrorCode.CONTENT_TOO_LARGE if too_large else ErrorCode.FETCH_FAILED,
        f"refused {cid}: {exc}",
        {"cid": str(cid), "limit": limit},
    )


def _fetch_stats(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "blocks": int(stats.get("blocks", 0)),
        "bytes": int(stats.get("bytes", 0)),
        "via": stats.get("via"),  # "exchange", "bitswap", or "local" (nothing was missing)
    }
