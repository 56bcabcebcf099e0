"""Nobody runs a misbehaving node by accident: only a devstack can start one.

`meshrun node --misbehave KIND` is refused unless MESHRUN_ALLOW_MISBEHAVE=1 is
in the environment, which only Devstack puts in a child's; the devstack's
`--bad KIND[:N],…` is parsed strictly; and the DAG bomb a `dag-bomb-result`
node serves is one the storage layer refuses. No process is started here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli import app
from node.dev.devstack import BAD_PRICE, Devstack, NodeProcess, parse_bad
from node.roles.compute import Compute
from node.roles.misbehave import ALLOW_ENV, KINDS, check_misbehave, compute_class, dag_bomb
from node.service import NodeConfig
from storage.errors import ContentTooLarge
from storage.unixfs import DagWalk

EXPECTED_KINDS = {
    "wrong-key-receipt",
    "wrong-cids",
    "silent",
    "bid-replay",
    "accept-forward",
    "spec-flood",
    "dag-bomb-result",
    "zeros",
    "perturb",
    "replay",
    "noise",
}


def test_every_kind_is_a_compute_role_and_honest_is_the_default() -> None:
    assert set(KINDS) == EXPECTED_KINDS
    assert compute_class(None) is Compute
    for kind, cls in KINDS.items():
        assert compute_class(kind) is cls and issubclass(cls, Compute) and cls is not Compute


def test_misbehaving_is_refused_without_the_devstacks_variable() -> None:
    with pytest.raises(ValueError, match=ALLOW_ENV):
        check_misbehave("silent", "compute", {})
    with pytest.raises(ValueError, match=ALLOW_ENV):
        check_misbehave("silent", "compute", {ALLOW_ENV: "yes"})
    with pytest.raises(ValueError, match="unknown kind"):
        check_misbehave("lie-about-everything", "compute", {ALLOW_ENV: "1"})
    with pytest.raises(ValueError, match="compute nodes only"):
        check_misbehave("silent", "requester", {ALLOW_ENV: "1"})
    check_misbehave("silent", "compute", {ALLOW_ENV: "1"})
    check_misbehave(None, "compute", {})


def test_node_config_refuses_it_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(ValueError, match=ALLOW_ENV):
        NodeConfig(mode="compute", data_dir=tmp_path, misbehave="silent")
    assert NodeConfig(mode="compute", data_dir=tmp_path).misbehave is None
    monkeypatch.setenv(ALLOW_ENV, "1")
    assert NodeConfig(mode="compute", data_dir=tmp_path, misbehave="silent").misbehave == "silent"


def test_the_cli_refuses_it_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    args = ["node", "--mode", "compute", "--data-dir", str(tmp_path), "--misbehave", "silent"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert ALLOW_ENV in result.output and "devstack --bad" in result.output
    assert not (tmp_path / "node.json").exists()


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("", {}),
        ("silent", {"silent": 1}),
        ("silent,wrong-cids:2", {"silent": 1, "wrong-cids": 2}),
        (" silent:1 , silent:2 ,", {"silent": 3}),
    ],
)
def test_bad_is_parsed(text: str, counts: dict[str, int]) -> None:
    assert parse_bad(text) == counts


@pytest.mark.parametrize("text", ["evil", "silent:0", "silent:x", "silent:-1"])
def test_bad_refuses_what_it_does_not_know(text: str) -> None:
    with pytest.raises(ValueError, match="--bad"):
        parse_bad(text)


def test_devstack_cli_refuses_an_unknown_kind(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["devstack", "--data-dir", str(tmp_path), "--bad", "evil"])
    assert result.exit_code == 2 and "unknown kind" in result.output


def test_only_the_bad_child_gets_the_variable_and_a_lower_price(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched: list[tuple[list[str], dict[str, str]]] = []

    def launch(args: list[str], data_dir: Path, extra_env: Any = None) -> Any:
        launched.append((list(args), dict(extra_env or {})))
        return subprocess.Popen(["true"])

    stack = Devstack(tmp_path, compute=1, bad={"silent": 1})
    monkeypatch.setattr(stack, "_launch", launch)
    requester = stack.spawn("requester", "requester", [])
    requester.info = {"listen_addrs": ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWRequester"]}
    stack.nodes.append(requester)
    honest = stack.spawn("compute-1", "compute", [])
    honest.info = {"listen_addrs": ["/ip4/127.0.0.1/tcp/2/p2p/12D3KooWHonest"]}
    stack.nodes.append(honest)
    bad = stack._spawn_bad("silent")
    for node in stack.nodes:
        node.process.wait()

    assert isinstance(bad, NodeProcess) and bad.misbehave == "silent"
    assert [n.name for n in stack.bad_nodes] == ["bad-silent-1"]
    assert stack.honest_nodes == [honest]
    (req_args, req_env), (honest_args, honest_env), (bad_args, bad_env) = launched
    assert ALLOW_ENV not in req_env and ALLOW_ENV not in honest_env
    assert "--misbehave" not in req_args + honest_args
    assert bad_env == {ALLOW_ENV: "1"}
    assert bad_args[bad_args.index("--misbehave") + 1] == "silent"
    assert float(bad_args[bad_args.index("--price") + 1]) == BAD_PRICE
    bootstrap = [bad_args[i + 1] for i, a in enumerate(bad_args) if a == "--bootstrap"]
    assert bootstrap == [requester.info["listen_addrs"][0], honest.info["listen_addrs"][0]]
    assert stack.manifest()["nodes"][2]["misbehave"] == "silent"


def test_the_dag_bomb_is_refused_by_a_bounded_walk() -> None:
    blocks = dag_bomb()
    root = list(blocks)[-1]
    assert sum(len(b) for b in blocks.values()) < 512 * 1024  # small on the wire
    walk, todo, visited = DagWalk(root), [root], 0
    with pytest.raises(ContentTooLarge):
        while todo:
            cid = todo.pop()
            todo += walk.visit(cid, blocks[cid])
            visited += 1
    assert visited < len(blocks)  # refused before its 256 KiB leaf is even asked for
