"""scripts/device-check.sh, the GPU proof of issue 13, exercised the way CI can: on CPU.

`--cpu` runs the whole script (install check, device report, a real job through
a devstack, the comparison with a local CPU run, `meshrun bench --only
exec,gpu --quick`) with the CPU provider; on a GPU box the same script runs the
job with CUDA (and TensorRT) and the bench's CUDA rows. ~20 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "device-check.sh"


def _run(*args: str, timeout: float = 170) -> subprocess.CompletedProcess[str]:
    # The script runs the project's .venv (`make install` creates it when missing).
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_cpu_run_checks_the_job_against_cpu_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run("--cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device-check passed (cpu)" in proc.stdout

    report = json.loads((out / "device-check.json").read_text())
    assert report["ok"] is True and report["mode"] == "cpu"
    assert [d["slot"] for d in report["capacity"]["devices"]] == ["cpu:0"]
    assert report["device"]["providers"] == ["CPUExecutionProvider"]
    (job,) = report["jobs"]
    assert job["status"] == "completed"
    assert job["provider_requested"] == "cpu"
    assert job["execution_provider"] == "CPUExecutionProvider"
    assert job["matches_cpu"] is True and job["compare"]["agree"] is True
    assert job["compare"]["max_abs_diff"] <= 1e-5
    assert {"cpu_s", "max_rss_mb"} <= set(job["resources"])
    assert not any(key.startswith("gpu_") for key in job["resources"])

    bench = json.loads((out / "bench.json").read_text())
    assert bench["quick"] is True
    assert [b["name"] for b in bench["benchmarks"]] == ["exec", "gpu"]
    gpu = report["bench"]["gpu"]
    assert not (gpu["skipped"] or "").startswith("crashed")
    rows = {row["metric"]: row for row in gpu["rows"]}
    cuda = rows["CUDA execution path p50"]
    assert cuda["value"] is None and "no CUDA device" in cuda["note"]
    if not gpu["skipped"]:  # a benchmark model is installed: the CPU side was measured
        assert rows["CPU execution path p50"]["value"] > 0


def test_unknown_argument_is_refused() -> None:
    proc = _run("--no-such-flag", timeout=30)
    assert proc.returncode == 2
    assert "unknown argument --no-such-flag" in proc.stderr
