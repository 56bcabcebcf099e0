"""Keep local paths out of the free text a node sends to other peers.

A `Failure` or `NoBid` message is built from whatever error stopped a job, and
those errors often name files: onnxruntime names the model file it could not
load, an OSError names the data dir. Another peer needs to know *what* failed,
not where this node keeps its data (which usually names its user, too).
`scrub` rewrites absolute paths to a placeholder and keeps only the file name:

    "Load model from /home/ann/.local/share/meshrun/models/bafy.onnx failed"
    -> "Load model from <path>/bafy.onnx failed"

It handles POSIX paths, `~/...`, Windows drive (`C:\\...`) and UNC (`\\\\host\\...`)
paths and `file://` URLs, and the caller's own roots (the data dir) even where
they contain spaces; the home directory of the running user is always one of
them. A path ending in a directory (no file extension) becomes `<path>` alone,
so a user name at the end of a home path is not kept either. Other URLs,
multiaddrs (`/ip4/.../tcp/...`) and libp2p protocol IDs (`/meshrun/...`) are
left alone: they name no local file and a peer needs them to make sense of the
message.

Pure text in, text out: no file system or environment access (the caller
passes the roots it wants hidden, such as the data dir and the home dir), so it
fits the sans-io protocol package and can run on every message at the point
where it is put on the wire.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["PLACEHOLDER", "scrub"]

PLACEHOLDER = "<path>"

# A path component: anything but separators, whitespace, quotes, brackets and
# the punctuation prose puts around a path (a colon after it, a comma...).
_NAME = r"[^\s\\/'\"`<>|,;:()\[\]{}]"
_SEP = r"[\\/]"
# Where a path may start: not inside a word, a relative path or a number ("3/4").
_START = r"(?<![\w.~/\\-])"

_PATH = re.compile(
    rf"(?P<url>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"`<>]*)"
    rf"|(?P<prefix>{re.escape(PLACEHOLDER)}"
    rf"|{_START}~(?={_SEP})"
    rf"|{_START}[A-Za-z]:(?={_SEP})"
    rf"|{_START}(?=/|\\\\))"
    rf"(?P<body>(?:{_SEP}+{_NAME}+)+){_SEP}*"
)

# First components of slash-separated strings that are not local paths.
_NOT_LOCAL = frozenset(
    {
        "ip4",
        "ip6",
        "ip6zone",
        "dns",
        "dns4",
        "dns6",
        "dnsaddr",
        "tcp",
        "udp",
        "quic",
        "quic-v1",
        "p2p",
        "p2p-circuit",
        "ipfs",
        "ipns",
        "meshrun",
    }
)

# Passes of scrub before it gives up looking for a text it leaves unchanged.
_MAX_PASSES = 8

# A file name worth keeping: a name with an extension (model.onnx, identity.key).
_FILE_NAME = re.compile(r"[^.].*\.[A-Za-z0-9_-]{1,16}")


def scrub(text: str, roots: Iterable[str] = ()) -> str:
    """`text` with every absolute path replaced by `<path>` or `<path>/<file name>`.

    `roots` are directories to hide wherever they appear (the node's data dir),
    given as absolute paths; relative ones are ignored. Idempotent: scrubbing twice
    changes nothing more.
    """
    hidden = _roots(roots)
    # A replacement can make a path of what was not one: "0/srv/node~\x" for
    # root "/srv/node" becomes "0<path>~\x", where "~\x" now starts a home
    # path. So passes repeat until one changes nothing (two, where any path was
    # found); each pass only ever turns path text into placeholders.
    for _ in range(_MAX_PASSES):
        scrubbed = _scrub_once(text, hidden)
        if scrubbed == text:
            break
        text = scrubbed
    return text


def _scrub_once(text: str, hidden: list[str]) -> str:
    for root in hidden:
        text = re.sub(re.escape(root) + rf"(?!{_NAME})", PLACEHOLDER, text)
    text = _PATH.sub(_replace, text)
    # A root glued to other text ("/srv/node2" for root "/srv/node") is still
    # not sent. Each pass removes a separator, so this ends.
    for root in hidden:
        while root in text:
            text = text.replace(root, PLACEHOLDER)
    return text


def _roots(candidates: Iterable[str]) -> list[str]:
    """Absolute roots without trailing separators, longest first (nested roots)."""
    found = set()
    for candidate in candidates:
        root = str(candidate).rstrip("/\\")
        absolute = root.startswith(("/", "\\\\", "~")) or re.match(r"[A-Za-z]:[\\/]", root)
        if absolute and re.search(r"[\\/]", root) and len(root) > 1:
            found.add(root)
    return sorted(found, key=len, reverse=True)


def _replace(match: re.Match[str]) -> str:
    url = match.group("url")
    if url is not None:
        scheme, _, rest = url.partition("://")
        if scheme.lower() != "file":
            return url
        return _collapse(rest)
    body = match.group("body")
    if not match.group("prefix"):
        first = next((part for part in body.split("/") if part), "")
        if body.startswith("/") and first in _NOT_LOCAL:
            return match.group(0)
    return _collapse(body)


def _collapse(path: str) -> str:
    """`<path>/name` for a path ending in a file name, else `<path>`; a sentence's
    full stop after the path stays outside it."""
    parts = [part for part in re.split(r"[\\/]+", path) if part]
    name = parts[-1] if parts else ""
    stripped = name.rstrip(".")
    tail = name[len(stripped) :]
    if stripped and _FILE_NAME.fullmatch(stripped):
        return f"{PLACEHOLDER}/{stripped}{tail}"
    return PLACEHOLDER + tail
