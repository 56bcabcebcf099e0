"""A user's IPFS daemon (Kubo, or anything speaking its `/api/v0`) as a mirror.

The embedded blockstore stays the source of truth; the daemon is where results
are *also* published so any IPFS tool or gateway can serve them. Three rules:

- Same CIDs. Content goes to the daemon with `add --cid-version=1
  --raw-leaves`, i.e. the daemon re-chunks and re-hashes it itself, and the
  root it reports is compared with ours as bytes. Agreement proves the
  daemon names the content exactly as meshrun does. If it ever disagrees
  (a DAG meshrun did not build, e.g. imported from a CAR with another
  chunker), the exact blocks are sent instead with `dag import`, so the CID
  users were given still resolves on the daemon.
- Every block from the daemon is hashed before it is stored (`import_car`
  and `put` verify), so a confused or hostile daemon cannot plant data.
- Down or slow is an error with a clear message (`IpfsUnavailable`), never a
  hang: every call has a connect and a read timeout, and asking for an
  absent CID carries a daemon-side `timeout` too, because Kubo (and js-ipfs)
  otherwise search for it forever.

ipfshttpclient 0.7.0 is used through its `Client` constructor, not
`connect()`: `connect()` refuses daemons outside 0.4.23..0.8.0 (every current
Kubo, and js-ipfs, which reports 0.18.1), the constructor does not check.
Its default requests backend is used (its httpx backend is broken with httpx
0.28). Directory uploads are built here as a multipart stream because the
library can only upload directories that exist on disk.
"""

from __future__ import annotations

import contextlib
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import ipfshttpclient
import ipfshttpclient.exceptions as ipfs_exc

from storage.blockstore import BaseBlockstore
from storage.car import CAR_MEDIA_TYPE, import_car, iter_car
from storage.cid import Cid
from storage.errors import StorageError
from storage.ranges import is_directory

__all__ = ["BadIpfsAddress", "IpfsError", "IpfsUnavailable", "KuboBackend", "PublishResult"]

# ipfshttpclient passes `strict=` to urllib3, which warns on every new pool.
warnings.filterwarnings("ignore", message=".*'strict' parameter", category=FutureWarning)

_ROOT_NAME = "meshrun"  # js-ipfs ignores multipart file names shorter than two characters
_PART_CHUNK = 256 * 1024


class IpfsUnavailable(StorageError):
    """The daemon could not be reached, or did not answer in time."""


class IpfsError(StorageError):
    """The daemon answered, but with an error or something we cannot use."""


class BadIpfsAddress(StorageError, ValueError):
    """The daemon address is not a multiaddr ipfshttpclient can dial."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    cid: Cid
    method: str  # "add" (daemon re-derived the same CID) or "dag-import" (exact blocks)
    seconds: float


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


class _Multipart:
    """multipart/form-data in the shape `ipfs add` expects, streamed part by part."""

    def __init__(self) -> None:
        self.boundary = uuid.uuid4().hex

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def part(self, filename: str, content_type: str, body: Iterator[bytes]) -> Iterator[bytes]:
        yield (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{_quote(filename)}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        yield from body
        yield b"\r\n"

    def end(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()


class _ChunkReader:
    """A read()-able view of an iterator of byte strings, for streaming CAR parsing."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = bytearray()

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buf) < size:
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                break
        if size < 0:
            size = len(self._buf)
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out


class KuboBackend:
    """Blocking client for one daemon; the node calls it from worker threads.

    No HTTP session is kept: each call opens its own loopback connection, so
    calls from several threads never share a connection pool.
    """

    def __init__(
        self,
        api: str,
        *,
        timeout: float = 60.0,
        connect_timeout: float = 3.0,
        missing_timeout: float = 10.0,
    ) -> None:
        self.api = api
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.missing_timeout = missing_timeout
        try:
            self._client = ipfshttpclient.Client(api, timeout=(connect_timeout, timeout))
        except (ipfs_exc.Error, ValueError) as exc:
            raise BadIpfsAddress(
                f"bad IPFS API address {api!r} (expected e.g. /ip4/127.0.0.1/tcp/5001): {exc}"
            ) from None

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ipfs_exc.ConnectionError, ipfs_exc.TimeoutError) as exc:
            raise IpfsUnavailable(
                f"IPFS daemon at {self.api} is not reachable ({what}: {type(exc).__name__}: {exc})"
            ) from None
        except ipfs_exc.Error as exc:
            raise IpfsError(f"IPFS daemon at {self.api} refused {what}: {exc}") from None

    def _request(self, path: str, what: str, *args: Any, **kwargs: Any) -> Any:
        return self._call(what, self._client._client.request, path, *args, **kwargs)

    # ---- status ------------------------------------------------------------------

    def version(self) -> dict[str, Any]:
        """The daemon's version record; the cheap "is it up?" probe."""
        info = self._call("version", self._client.version, timeout=(self.connect_timeout, 10))
        return dict(info)

    def has(self, cid: Cid) -> bool:
        """Whether the daemon holds the block `cid` locally (it is never asked to search)."""
        try:
            self._call(
                "block/stat",
                self._client.block.stat,
                cid.encode(),
                opts={"timeout": "1s", "offline": "true"},
            )
        except IpfsError:
            return False
        return True

    def is_pinned(self, cid: Cid) -> bool:
        try:
            listed = self._call(
                "pin/ls",
                self._client.pin.ls,
                cid.encode(),
                type="recursive",
                opts={"timeout": "2s"},
            )
        except IpfsError:
            return False
        keys = listed.get("Keys", {}) if hasattr(listed, "get") else {}
        return any(Cid.decode(str(k)).to_bytes() == cid.to_bytes() for k in keys)

    def cat(self, cid: Cid) -> bytes:
        data = self._call(
            "cat", self._client.cat, cid.encode(), opts={"timeout": f"{self.missing_timeout}s"}
        )
        assert isinstance(data, bytes)
        return data

    # ---- publish -------------------------------------------------------------------

    def publish(self, store: BaseBlockstore, root: Cid, *, pin: bool = True) -> PublishResult:
        """Add and pin the DAG under `root` on the daemon under the very same CID."""
        started = time.perf_counter()
        try:
            theirs = self._add(store, root, pin=pin)
        except IpfsError:
            theirs = None  # not UnixFS the daemon can re-add (or refused): send blocks as-is
        if theirs is not None and theirs.to_bytes() == root.to_bytes():
            return PublishResult(root, "add", time.perf_counter() - started)
        if theirs is not None and pin:
            # The daemon named our content differently; drop its pin of the stray copy.
            with contextlib.suppress(StorageError):
                self.unpin(theirs)
        self.import_car(iter_car(store.get, [root]), pin=pin)
        return PublishResult(root, "dag-import", time.perf_counter() - started)

    def _add(self, store: BaseBlockstore, root: Cid, *, pin: bool) -> Cid:
        form = _Multipart()
        if is_directory(store.get, root):
            body = self._dir_parts(form, store, root)
        else:
            body = form.part(_ROOT_NAME, "application/octet-stream", store.iter_file(root))

        def stream() -> Iterator[bytes]:
            yield from body
            yield form.end()

        entries = self._request(
            "/add",
            "add",
            decoder="json",
            data=stream(),
            headers={"Content-Type": form.content_type},
            opts={
                "cid-version": "1",
                "raw-leaves": "true",
                "cid-base": "base32",
                "pin": "true" if pin else "false",
                "progress": "false",
            },
        )
        if not isinstance(entries, list) or not entries:
            raise IpfsError(f"IPFS daemon at {self.api} returned no entries for add")
        for entry in entries:
            if entry.get("Name") == _ROOT_NAME:
                return Cid.decode(str(entry["Hash"]))
        return Cid.decode(str(entries[-1]["Hash"]))

    def _dir_parts(self, form: _Multipart, store: BaseBlockstore, root: Cid) -> Iterator[bytes]:
        """Directory parts before their contents, as `ipfs add -r` sends them."""
        yield from form.part(_ROOT_NAME, "application/x-directory", iter(()))
        stack = [(_ROOT_NAME, root)]
        while stack:
            prefix, dir_cid = stack.pop()
            subdirs = []
            for entry in store.list_directory(dir_cid):
                path = f"{prefix}/{entry.name}"
                if is_directory(store.get, entry.cid):
                    yield from form.part(path, "application/x-directory", iter(()))
                    subdirs.append((path, entry.cid))
                else:
                    yield from form.part(
                        path, "application/octet-stream", store.iter_file(entry.cid)
                    )
            stack.extend(reversed(subdirs))

    def import_car(self, car: Iterator[bytes], *, pin: bool = True) -> list[Cid]:
        """`dag import` a CAR stream; returns the roots the daemon pinned."""
        form = _Multipart()

        def stream() -> Iterator[bytes]:
            yield from form.part("meshrun.car", CAR_MEDIA_TYPE, car)
            yield form.end()

        entries = self._request(
            "/dag/import",
            "dag import",
            decoder="json",
            data=stream(),
            headers={"Content-Type": form.content_type},
            opts={"pin-roots": "true" if pin else "false"},
        )
        roots = []
        for entry in entries or []:
            root = entry.get("Root") if hasattr(entry, "get") else None
            if root and isinstance(root, dict) and root.get("Cid"):
                cid_field = root["Cid"]
                text = cid_field.get("/") if isinstance(cid_field, dict) else cid_field
                roots.append(Cid.decode(str(text)))
        return roots

    def unpin(self, cid: Cid) -> None:
        """Drop the daemon's recursive pin (its own GC reclaims the blocks later)."""
        try:
            self._call("pin/rm", self._client.pin.rm, cid.encode(), opts={"timeout": "10s"})
        except IpfsError as exc:
            if "not pinned" in str(exc).lower():
                return
            raise

    # ---- fetch -----------------------------------------------------------------------

    def fetch(
        self,
        store: BaseBlockstore,
        root: Cid,
        *,
        timeout: float | None = None,
        max_bytes: int | None = None,
    ) -> int:
        """Copy the DAG under `root` from the daemon into `store`; returns blocks written.

        One streamed `dag export` (a CAR) rather than a request per block; each
        block is verified by the CAR reader before `store.put` (which verifies
        again, cheaply, as it does for every untrusted source). With
        `max_bytes`, the export is broken off (ContentTooLarge) once its blocks
        pass it; check the DAG's declared sizes with `store.check_dag` after.
        """
        limit = self.missing_timeout if timeout is None else timeout
        chunks = self._request(
            "/dag/export",
            "dag export",
            (root.encode(),),
            stream=True,
            opts={"timeout": f"{limit:g}s"},
            timeout=(self.connect_timeout, max(limit, 1.0) + 5.0),
        )
        reader: BinaryIO = _ChunkReader(iter(chunks))  # type: ignore[assignment]
        try:
            result = import_car(store, reader, max_bytes=max_bytes)
        except ipfs_exc.Error as exc:
            raise IpfsUnavailable(
                f"IPFS daemon at {self.api} broke off dag export of {root}: {exc}"
            ) from None
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        if root.multihash not in {r.multihash for r in result.roots}:
            raise IpfsError(f"IPFS daemon at {self.api} exported {result.roots}, not {root}")
        if store.missing_blocks(root):
            raise IpfsError(f"IPFS daemon at {self.api} does not hold all of {root}")
        return result.blocks
