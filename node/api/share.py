"""Share links: a read capability for one CID (and paths under it), signed by the node.

A share token is `<payload>.<signature>`, both base64url without padding. The
payload is canonical JSON `{"v": 1, "id", "cid", "path", "exp"}`; the signature
is the node's Ed25519 key over `meshrun-share-v1\\0` + payload (a domain
prefix, so no other message the key signs can pass for a share). The gateway
checks it with the node's own public key: no table of issued links is needed,
and a restart (which replaces the RPC token) leaves links working.

Threats and answers: a forged or altered token fails the signature; a link to
`bafyA` opens nothing but `bafyA` and the paths under `path` (never a sibling
CID, never `..`); `exp` bounds how long a leaked link works; `--revoke` puts the
link's `id` on a list in the data dir, kept only until the link would have
expired anyway (so the list stays bounded). A share grants GET/HEAD on the
gateway only: never the RPC, the REST API, or the explorer.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.keys import Identity, verify_signature
from protocol.errors import ErrorCode, MeshrunError

SHARE_PARAM = "share"
SHARE_VERSION = 1
REVOKED_FILE = "shares-revoked.json"
MAX_SHARE_SECONDS = 365 * 86400
MAX_TOKEN_CHARS = 2048
# Revoked links are remembered only until they expire; more than this many live
# revocations at once is refused (revoke less, or let links expire sooner).
MAX_REVOKED = 10_000
_DOMAIN = b"meshrun-share-v1\x00"
_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ShareRefused(Exception):
    """Why a share token does not open a path; the message is shown on the 403 page."""


@dataclass(frozen=True)
class Share:
    id: str
    cid: str
    path: str
    expires_at: int

    def covers(self, cid: str, path: str) -> bool:
        """Whether `/ipfs/<cid>/<path>` lies inside this share's scope."""
        if cid != self.cid:
            return False
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            return False
        wanted = "/".join(parts)
        return not self.path or wanted == self.path or wanted.startswith(self.path + "/")


def parse_duration(text: str) -> int:
    """'7d', '12h', '30m', '3600' (seconds) → seconds, within (0, one year]."""
    match = _DURATION.match(text or "")
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 12h, 7d, 2w)")
    seconds = int(float(match.group(1)) * _UNITS[match.group(2)])
    if not 0 < seconds <= MAX_SHARE_SECONDS:
        raise ValueError("a share must expire after more than 0 s and at most 365 days")
    return seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _normal_path(path: str) -> str:
    parts = [p for p in (path or "").split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise MeshrunError(ErrorCode.INVALID_PARAMS, "a shared path may not contain . or ..")
    return "/".join(parts)


def issue(
    identity: Identity, cid: str, path: str, seconds: int, now: float | None = None
) -> tuple[Share, str]:
    """Sign a share of `cid` (and `path` under it) for `seconds`; returns it and its token."""
    share = Share(
        id=_b64(secrets.token_bytes(12)),
        cid=cid,
        path=_normal_path(path),
        expires_at=int((now or time.time()) + seconds),
    )
    payload = json.dumps(
        {"v": SHARE_VERSION, "id": share.id, "cid": share.cid, "path": share.path,
         "exp": share.expires_at},
        sort_keys=True, separators=(",", ":"),
    ).encode()  # fmt: skip
    return share, f"{_b64(payload)}.{_b64(identity.sign(_DOMAIN + payload))}"


def decode(token: str) -> tuple[Share, bytes, bytes]:
    """The share a token claims, its payload and signature; unverified (ShareRefused)."""
    if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise ShareRefused("this is not a meshrun share link")
    head, _, tail = token.partition(".")
    try:
        payload, signature = _unb64(head), _unb64(tail)
        body = json.loads(payload)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ShareRefused("this share link is damaged") from None
    if not isinstance(body, dict) or body.get("v") != SHARE_VERSION:
        raise ShareRefused("this share link is of an unknown kind")
    try:
        share = Share(
            id=str(body["id"]),
            cid=str(body["cid"]),
            path=str(body["path"]),
            expires_at=int(body["exp"]),
        )
    except (KeyError, TypeError, ValueError):
        raise ShareRefused("this share link is damaged") from None
    if not _ID.match(share.id):
        raise ShareRefused("this share link is damaged")
    return share, payload, signature


def share_id(token_or_id: str) -> str:
    """The id of a token, a link containing one, or an id as given."""
    text = token_or_id.strip()
    if f"{SHARE_PARAM}=" in text:
        text = text.split(f"{SHARE_PARAM}=", 1)[1].split("&", 1)[0]
    if "." in text:
        return decode(text)[0].id
    if not _ID.match(text):
        raise ShareRefused("not a share link, token or id")
    return text


class RevocationList:
    """Ids of revoked shares with their expiry, persisted in the data dir.

    Written whole to a temporary file and renamed, so a crash leaves the old or
    the new list, never half of one; entries past their expiry are dropped on
    every write, which keeps the file as small as the set of live revocations.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / REVOKED_FILE
        self._lock = threading.Lock()
        self._revoked: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            raw = json.loads(self.path.read_text())
            self._revoked = {str(k): int(v) for k, v in raw.get("revoked", {}).items()}

    def __contains__(self, share_id: object) -> bool:
        return share_id in self._revoked

    def __len__(self) -> int:
        return len(self._revoked)

    def revoke(self, share_id: str, expires_at: int, now: float | None = None) -> bool:
        """Add one; False if it was already there. Raises INVALID_PARAMS when full."""
        now = now or time.time()
        with self._lock:
            live = {k: v for k, v in self._revoked.items() if v > now}
            if share_id in live:
                return False
            if len(live) >= MAX_REVOKED:
                raise MeshrunError(
                    ErrorCode.INVALID_PARAMS,
                    f"{MAX_REVOKED} share links are revoked and not yet expired; "
                    "no more can be revoked until some expire",
                )
            live[share_id] = max(int(expires_at), int(now) + 1)
            self._write(live)
            self._revoked = live
            return True

    def _write(self, revoked: dict[str, int]) -> None:
        tmp = self.path.with_name(f".{REVOKED_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"revoked": revoked}, sort_keys=True))
        os.replace(tmp, self.path)


class Shares:
    """Issue, check and revoke a node's share links."""

    def __init__(self, identity: Identity, data_dir: Path) -> None:
        self.identity = identity
        self.revoked = RevocationList(data_dir)

    def issue(self, cid: str, path: str, seconds: int) -> tuple[Share, str]:
        return issue(self.identity, cid, path, seconds)

    def check(self, token: str, cid: str, path: str, now: float | None = None) -> Share:
        """The share if `token` opens `/ipfs/<cid>/<path>` now, else ShareRefused (why)."""
        share, payload, signature = decode(token)
        if not verify_signature(self.identity.public_key, _DOMAIN + payload, signature):
            raise ShareRefused("this share link was not signed by this node (forged or altered)")
        if share.expires_at <= (now or time.time()):
            raise ShareRefused("this share link has expired")
        if share.id in self.revoked:
            raise ShareRefused("this share link was revoked by its owner")
        if not share.covers(cid, path):
            raise ShareRefused("this share link does not cover this address")
        return share

    def revoke(self, token_or_id: str) -> dict[str, Any]:
        """Revoke by token, link or id. A bare id is kept a year (its expiry is unknown)."""
        text = token_or_id.strip()
        if f"{SHARE_PARAM}=" in text:
            text = text.split(f"{SHARE_PARAM}=", 1)[1].split("&", 1)[0]
        try:
            if "." in text:
                share, payload, signature = decode(text)
                if not verify_signature(self.identity.public_key, _DOMAIN + payload, signature):
                    raise ShareRefused("this share link was not signed by this node")
                ident, expires = share.id, share.expires_at
            else:
                ident, expires = share_id(text), int(time.time()) + MAX_SHARE_SECONDS
        except ShareRefused as exc:
            raise MeshrunError(ErrorCode.INVALID_PARAMS, str(exc)) from None
        added = self.revoked.revoke(ident, expires)
        return {"id": ident, "revoked": True, "already": not added, "until": expires}
