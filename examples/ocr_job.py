"""OCR as a meshrun job: draw known text, recognise it on the network, check the answer.

What it shows: a real model (PP-OCRv6 text recogniser, 21 MB, from the rapidocr
wheel) run as a job, end to end:
  - draw a few lines of known text with Pillow, preprocess them into the model's
    input `x` [N, 3, 48, W] (height 48, values scaled to [-1, 1]) and send them as
    an .npz bundle;
  - store the model on the node, submit, wait for the result;
  - compare the network's output tensor [N, T, 18710] (per-step character
    probabilities) with a local onnxruntime run, within a tolerance (a GPU
    executor is not bit-identical to a CPU one);
  - decode it (greedy CTC over the character list stored in the model's metadata)
    and check the text read back is the text drawn.

Needs two optional packages: `pip install pillow` and `pip install --no-deps
rapidocr==3.10.0` (`--no-deps`: only the .onnx files inside are used, not its
OpenCV pipeline). The `examples` extra installs Pillow. Without them the script
says so and exits with code 77 ("skipped").

With no node given (`--rpc URL --token T`, `--data-dir DIR`, or $MESHRUN_RPC) it
starts a throwaway local network (1 requester + 1 compute node).

Run it:
    .venv/bin/python examples/ocr_job.py
    .venv/bin/python examples/ocr_job.py --data-dir ./requester --text "hello mesh" --text "42"

Exit code 0 when every check passed, 1 when one failed, 77 when a package is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort

from node.client import Client, Job, JobStatus, RpcError, discover

EXIT_SKIPPED = 77
MODEL_FILE = "models/PP-OCRv6_rec_small.onnx"
HEIGHT = 48
DEFAULT_TEXT = ["meshrun 2026", "HELLO WORLD", "peer to peer"]


def find_model() -> Path | str:
    """The recogniser inside the installed rapidocr wheel, or why it cannot be used.

    Located without importing rapidocr: its __init__ imports OpenCV, which a
    `--no-deps` install does not bring.
    """
    missing = []
    if importlib.util.find_spec("PIL") is None:
        missing.append("pillow (pip install pillow)")
    spec = importlib.util.find_spec("rapidocr")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        missing.append("rapidocr (pip install --no-deps rapidocr==3.10.0)")
    if missing:
        return "this example needs " + " and ".join(missing)
    model = Path(locations[0]) / MODEL_FILE
    if not model.is_file():
        return f"rapidocr is installed but has no {MODEL_FILE} (use rapidocr 3.10.0)"
    return model


def render_lines(lines: list[str]) -> np.ndarray:
    """Black text on white, one line per image, as the model's input batch."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=32)
    images = []
    for text in lines:
        left, top, right, bottom = font.getbbox(text)
        image = Image.new("RGB", (right - left + 16, HEIGHT), "white")
        ImageDraw.Draw(image).text(
            (8 - left, (HEIGHT - (bottom - top)) // 2 - top), text, fill="black", font=font
        )
        images.append(image)
    width = max(image.width for image in images)
    width += -width % 8
    batch = np.zeros((len(images), 3, HEIGHT, width), dtype=np.float32)  # 0 is mid-grey
    for i, image in enumerate(images):
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        batch[i, :, :, : image.width] = ((pixels - 0.5) / 0.5).transpose(2, 0, 1)
    return batch


def ctc_decode(probabilities: np.ndarray, alphabet: list[str]) -> list[str]:
    """Greedy CTC: best class per step, repeats merged, class 0 (blank) dropped."""
    texts = []
    for steps in probabilities:
        best = steps.argmax(axis=-1)
        keep = np.r_[True, best[1:] != best[:-1]] & (best != 0)
        texts.append("".join(alphabet[i] for i in best[keep]))
    return texts


@contextmanager
def node_endpoint(args: argparse.Namespace) -> Iterator[tuple[str, str | None]]:
    """The (RPC URL, token) of the node to use; a throwaway local network if none is given."""
    if args.rpc or args.data_dir or os.environ.get("MESHRUN_RPC"):
        data_dirs = [args.data_dir] if args.data_dir else []
        endpoint = discover(args.rpc, args.token, data_dirs=data_dirs)
        yield endpoint.url, endpoint.token
        return
    from node.dev.devstack import Devstack

    print("no node given: starting a local network (1 requester + 1 compute node)…")
    with (
        tempfile.TemporaryDirectory(prefix="meshrun-example-") as scratch,
        Devstack(Path(scratch), compute=1, bid_window=0.5) as stack,
    ):
        yield stack.requester.rpc_url, stack.requester.token


def run_on_network(client: Client, model: bytes, x: np.ndarray) -> Job:
    buffer = io.BytesIO()
    np.savez(buffer, x=x)
    model_cid = client.storage_add(model)
    inputs_cid = client.storage_add(buffer.getvalue())
    print(f"model  {model_cid} ({len(model) / 1e6:.1f} MB)")
    print(f"inputs {inputs_cid} (x {list(x.shape)})")
    submitted = client.submit_job(model_cid, inputs_cid, timeout_seconds=120)
    print(f"submitted job {submitted.job_id}")
    return client.wait_for_job(submitted.job_id, timeout=180)


def fetch_output(client: Client, result_cid: str) -> np.ndarray:
    files = client.storage_tree(result_cid).contents()
    outputs = [path for path in files if path.startswith("outputs/") and path.endswith(".npy")]
    if len(outputs) != 1:
        raise ValueError(f"expected one output tensor, the result has {outputs}")
    array: np.ndarray = np.load(io.BytesIO(files[outputs[0]]), allow_pickle=False)
    return array


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpc", help="node JSON-RPC URL, e.g. http://127.0.0.1:7780/rpc")
    parser.add_argument("--token", help="the node's RPC token (default: from its data dir)")
    parser.add_argument("--data-dir", help="data dir of a running node (reads node.json)")
    parser.add_argument("--text", action="append", help="a line to draw (repeatable)")
    args = parser.parse_args()

    model_path = find_model()
    if isinstance(model_path, str):
        print(f"skipped: {model_path}", file=sys.stderr)
        return EXIT_SKIPPED
    lines = args.text or DEFAULT_TEXT
    model = model_path.read_bytes()
    x = render_lines(lines)

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    # PaddleOCR's convention: class 0 is the CTC blank, the last class is a space.
    characters = session.get_modelmeta().custom_metadata_map["character"].splitlines()
    alphabet = ["<blank>", *characters, " "]
    local = session.run(None, {"x": x})[0]

    try:
        with node_endpoint(args) as (url, token), Client(url, token, timeout=120) as client:
            job = run_on_network(client, model, x)
            print(f"status {job.status}")
            if job.status is not JobStatus.COMPLETED or job.result_cid is None:
                error = f"{job.error.code}: {job.error.message}" if job.error else "no error given"
                print(f"job did not complete: {error}", file=sys.stderr)
                return 1
            print(f"result CID {job.result_cid}")
            print(f"executor   {job.executor}")
            remote = fetch_output(client, job.result_cid)
    except RpcError as err:
        print(f"error {err.code.name}: {err.message}", file=sys.stderr)
        return 1

    ok = remote.shape == local.shape and bool(np.allclose(remote, local, rtol=1e-3, atol=1e-4))
    print(f"output {list(remote.shape)} {'matches' if ok else 'DIFFERS FROM'} a local run")
    for drawn, read in zip(lines, ctc_decode(remote, alphabet), strict=True):
        same = read == drawn
        ok = ok and same
        print(f"  drew {drawn!r:<20} read {read!r} {'ok' if same else 'MISMATCH'}")
    print("done" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
