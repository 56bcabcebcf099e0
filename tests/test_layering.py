"""Layering rules (docs/design.md) that import-linter cannot express for a top-level module."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The CLI may start a node (`meshrun node`), a devstack or the demo, and otherwise
# speaks to nodes only through the SDK client, like any user.
CLI_ALLOWED_NODE_MODULES = {
    "node.client",
    "node.service",
    "node.dev.devstack",
    "node.dev.demo",
    "node.dev.testnet",
}
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


# The node package is split into rooms, one job each. import-linter's layers
# contract (pyproject.toml) orders them; the checks below also see the imports
# it cannot: those under `if TYPE_CHECKING:` and inside functions.
NODE = ROOT / "node"
# Top-level modules of the node package that are rooms of their own.
SINGLE_MODULE_ROOMS = {"service", "client", "aio"}
# The public SDK is importable with nothing else from the node package.
SDK_ROOMS = {"client", "sdk"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _node_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(NODE.rglob("*.py"))}


def _node_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every node module `name` imports: top level, in functions and under TYPE_CHECKING."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for item in ast.walk(ast.parse(path.read_text())):
        if isinstance(item, ast.Import):
            targets = [alias.name for alias in item.names]
        elif isinstance(item, ast.ImportFrom):
            if item.level:
                base = package.split(".")[: len(package.split(".")) - (item.level - 1)]
                module = ".".join(base + ([item.module] if item.module else []))
            else:
                module = item.module or ""
            # `from node.api import auth` imports the module node.api.auth.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                for alias in item.names
            ]
        else:
            continue
        found.update(t for t in targets if t == "node" or t.startswith("node."))
    found.discard(name)
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "node"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(vertex: str) -> list[str] | None:
        state[vertex] = 1
        path.append(vertex)
        for successor in sorted(graph.get(vertex, ())):
            if state.get(successor) == 1:
                return [*path[path.index(successor) :], successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[vertex] = 2
        return None

    for vertex in sorted(graph):
        if vertex not in state and (cycle := visit(vertex)):
            return cycle
    return None


def _module_graph() -> dict[str, set[str]]:
    modules = _node_modules()
    known = set(modules)
    return {name: _node_imports(name, path, known) for name, path in modules.items()}


def test_node_modules_import_each_other_without_cycles() -> None:
    graph = _module_graph()
    # A package's __init__ re-exporting its children is not a cycle: drop parent edges.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_rooms_import_each_other_without_cycles() -> None:
    rooms: dict[str, set[str]] = {}
    for module, deps in _module_graph().items():
        room = _room(module)
        rooms.setdefault(room, set()).update(_room(d) for d in deps if _room(d) != room)
    cycle = _find_cycle(rooms)
    assert cycle is None, " -> ".join(cycle or [])


def test_every_room_is_declared_in_the_layers_contract() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (layers,) = [c for c in contracts if c["type"] == "layers" and c.get("containers") == ["node"]]
    declared = {
        room.strip() for layer in layers["layers"] for room in layer.replace(":", "|").split("|")
    }
    declared |= set(layers.get("exhaustive_ignores", ()))
    rooms = {_room(m) for m in _node_modules()} - {"node"}
    assert rooms <= declared, rooms - declared


def test_sdk_imports_nothing_else_from_node() -> None:
    for module, deps in _module_graph().items():
        if _room(module) in SDK_ROOMS:
            outside = {d for d in deps if _room(d) not in SDK_ROOMS}
            assert not outside, f"{module} imports {sorted(outside)}"
