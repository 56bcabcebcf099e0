"""DESIGN §2 rules that import-linter cannot express for a top-level module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The CLI may start a node (`meshrun node`), a devstack or the demo, and otherwise
# speaks to nodes only through the SDK client, like any user.
CLI_ALLOWED_NODE_MODULES = {"node.client", "node.service", "node.devstack", "node.demo"}
# `meshrun bench` runs the benchmarks, which start devstacks like `meshrun devstack`.
CLI_ALLOWED_BENCH_MODULES = {"benchmarks.runner"}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for item in ast.walk(ast.parse(path.read_text())):
        if isinstance(item, ast.Import):
            found.update(alias.name for alias in item.names)
        elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
            found.add(item.module)
    return found


def test_cli_reaches_nodes_only_through_the_client() -> None:
    imports = _imports(ROOT / "cli.py")
    node_imports = {m for m in imports if m == "node" or m.startswith("node.")}
    assert node_imports <= CLI_ALLOWED_NODE_MODULES, node_imports - CLI_ALLOWED_NODE_MODULES
    bench_imports = {m for m in imports if m.split(".")[0] == "benchmarks"}
    assert bench_imports <= CLI_ALLOWED_BENCH_MODULES, bench_imports - CLI_ALLOWED_BENCH_MODULES


def test_protocol_is_sans_io() -> None:
    banned = ("trio", "libp2p", "socket", "sqlite3", "httpx", "onnxruntime", "os", "pathlib")
    for path in (ROOT / "protocol").glob("*.py"):
        for module in _imports(path):
            assert module.split(".")[0] not in banned, f"{path.name} imports {module}"
