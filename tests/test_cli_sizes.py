"""`meshrun node --max-*-bytes`: size parsing and the NodeConfig limits it fills."""

from __future__ import annotations

from pathlib import Path

import pytest

import cli
from node.service import NodeConfig


@pytest.mark.parametrize(
    ("text", "size"),
    [("1073741824", 1024**3), ("512M", 512 * 1024**2), ("2G", 2 * 1024**3), ("2GiB", 2 * 1024**3),
     ("1.5g", 3 * 1024**3 // 2), ("64k", 65536), ("1T", 1024**4)],
)  # fmt: skip
def test_sizes(text: str, size: int) -> None:
    assert cli._parse_size(text, "--max-model-bytes") == size


@pytest.mark.parametrize("text", ["", "G", "abc", "0", "-1G", "inf", "nan", "1X"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="--max-input-bytes"):
        cli._parse_size(text, "--max-input-bytes")


def test_node_config_limits(tmp_path: Path) -> None:
    config = NodeConfig("compute", tmp_path)
    assert (config.max_model_bytes, config.max_input_bytes, config.max_result_bytes) == (
        2 * 1024**3,
        1024**3,
        1024**3,
    )
    assert config.max_content_bytes == 2 * 1024**3
    assert NodeConfig("requester", tmp_path, max_result_bytes=3 * 1024**3).max_content_bytes == (
        3 * 1024**3
    )
    with pytest.raises(ValueError, match="max_input_bytes"):
        NodeConfig("compute", tmp_path, max_input_bytes=0)
