"""The docs stay true to the code, and the repo stands on its own.

- docs/design.md's generated blocks equal what scripts/gen_docs.py makes now;
- no file of the repo points at design notes kept outside it: a reader of the
  repo alone must find everything (docs/design.md is the project's design).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_docs = _gen_docs()


def _lifecycle_table() -> str:
    from protocol.lifecycle import state_table_markdown

    return state_table_markdown()


def test_lifecycle_table_in_design_doc_is_current() -> None:
    table = _lifecycle_table()
    doc = gen_docs.DESIGN_DOC.read_text()
    assert gen_docs.current_block(doc, "lifecycle") == table, (
        "docs/design.md's lifecycle table is stale: run `python scripts/gen_docs.py`"
    )


def test_gen_docs_check_and_rewrite(tmp_path: Path) -> None:
    _lifecycle_table()
    begin, end = gen_docs.markers("lifecycle")
    doc = tmp_path / "design.md"
    doc.write_text(f"# title\n\n{begin}\n| stale |\n{end}\n\nafter\n")
    assert gen_docs.main(["--check", "--doc", str(doc)]) == 1
    assert "| stale |" in doc.read_text()  # --check changes nothing
    assert gen_docs.main(["--doc", str(doc)]) == 0
    assert gen_docs.main(["--check", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# title\n\n") and text.endswith(f"{end}\n\nafter\n")
    assert gen_docs.current_block(text, "lifecycle") == _lifecycle_table()
    doc.write_text("no markers here\n")
    assert gen_docs.main(["--check", "--doc", str(doc)]) == 2


# Written in pieces so that this file does not match itself.
_OUTSIDE = re.compile(
    "|".join(
        [
            "DESIGN" + r"\s*§",
            "DESIGN" + r"\.md",
            "LIBP2P" + "_NOTES",
            "MODELS" + r"\.md",
            r"\.\./" + "shared",
            r"(?<![\w./-])" + "shared" + "/",
        ]
    )
)


def _repo_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (what the next commit may add)."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    names = sorted({n for n in listing.decode().split("\0") if n})
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def test_no_file_cites_notes_kept_outside_the_repo() -> None:
    offenders = []
    for path in _repo_files():
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, (
        "these lines cite design notes outside the repo; point to docs/design.md "
        "(or say it in place) instead:\n" + "\n".join(offenders)
    )


def test_every_test_the_threat_model_names_exists() -> None:
    """docs/threat-model.md cites tests as proof; a renamed or deleted one must fail here."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "threat-model.md").read_text()
    cited = re.findall(r"`(tests/[\w/]+(?:\.py)?/?)(?:::(\w+))?", text)
    assert len(cited) > 20
    last_file: Path | None = None
    for path, name in cited:
        target = root / path
        assert target.exists(), f"docs/threat-model.md cites missing {path}"
        if target.is_file():
            last_file = target
            if name:
                assert re.search(rf"def {name}\b", target.read_text()), f"{path}::{name} is gone"
    # `::name` written after a file cited earlier in the same cell.
    for name in re.findall(r"`::(\w+)`", text):
        assert last_file is not None
        found = any(
            re.search(rf"def {name}\b", p.read_text()) for p in (root / "tests").rglob("test_*.py")
        )
        assert found, f"docs/threat-model.md cites a test ::{name} that no test file defines"
