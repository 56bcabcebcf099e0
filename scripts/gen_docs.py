"""Regenerate the generated blocks of docs/design.md from the code.

Today one block: the job lifecycle table, from
``protocol.lifecycle.state_table_markdown()``, between the markers
``<!-- BEGIN GENERATED: lifecycle -->`` and ``<!-- END GENERATED: lifecycle -->``.

    python scripts/gen_docs.py            # rewrite the block in place
    python scripts/gen_docs.py --check    # exit 1 if the doc is stale, change nothing

tests/test_docs.py runs the same comparison, so a stale table fails the suite.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN_DOC = ROOT / "docs" / "design.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"


def lifecycle_table() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from protocol.lifecycle import state_table_markdown

    return state_table_markdown()


GENERATORS: dict[str, Callable[[], str]] = {"lifecycle": lifecycle_table}


def current_block(text: str, name: str) -> str:
    """What the doc holds between the markers of block `name` (without the marker lines)."""
    begin, end = markers(name)
    start = text.find(begin)
    stop = text.find(end, start + len(begin))
    if start < 0 or stop < 0:
        raise ValueError(f"the doc has no {begin} … {end} block")
    return text[start + len(begin) : stop].removeprefix("\n")


def replace_block(text: str, name: str, content: str) -> str:
    """`text` with block `name` holding exactly `content` (newline-terminated)."""
    begin, end = markers(name)
    current_block(text, name)  # raises when the markers are missing
    start = text.find(begin) + len(begin)
    stop = text.find(end, start)
    if content and not content.endswith("\n"):
        content += "\n"
    return text[:start] + "\n" + content + text[stop:]


def render(text: str) -> str:
    for name, generate in GENERATORS.items():
        text = replace_block(text, name, generate())
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    parser.add_argument("--doc", type=Path, default=DESIGN_DOC, help="the document to update")
    args = parser.parse_args(argv)

    text = args.doc.read_text()
    try:
        fresh = render(text)
    except ValueError as exc:
        print(f"{args.doc}: {exc}", file=sys.stderr)
        return 2
    if fresh == text:
        print(f"{args.doc}: up to date")
        return 0
    if args.check:
        print(
            f"{args.doc}: generated blocks are stale; run `python scripts/gen_docs.py`",
            file=sys.stderr,
        )
        return 1
    args.doc.write_text(fresh)
    print(f"{args.doc}: regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
