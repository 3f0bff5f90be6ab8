"""Latency of the exported encoders in ONNX Runtime against the same encoders in PyTorch.

The model is the ``model`` section of ``params.yaml`` (by default resnet18 at 64 px, embed 256,
text width 32), untrained (latency does not depend on the weights), with a vocabulary of
``--vocab`` words and captions of ``--max-len`` ids. Both encoders are exported exactly as the
``export`` stage does (``imtext.export.exporter.export_onnx``, and ``quantize`` for the INT8 rows),
then each encoder is timed at each batch size in PyTorch (eval mode, ``torch.inference_mode``), in
ONNX Runtime and, unless ``--no-int8``, in ONNX Runtime on the INT8 file.

Fairness: PyTorch and ONNX Runtime get the same number of threads (``torch.set_num_threads`` and
the session's ``intra_op_num_threads``; ``inter_op_num_threads`` 1; ``--threads``, default every
CPU); all run on the CPU. Each timed run is one forward pass on the same input. The runtimes take
turns in blocks (``--rounds`` blocks each, ``--warmup`` untimed runs at the start of every block),
not run by run: both thread pools spin for a while after a call, and run-by-run interleaving
charges one runtime for the other's spinning threads; alternating blocks still spreads the load of
other processes over all of them. The table reports the median of ``--repeats`` timed runs. The
baseline is PyTorch: the ratio is PyTorch's time over ONNX Runtime's (above 1: ORT is faster).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from imtext.config import load_stage_config
from imtext.export.exporter import ImageEncoder, TextEncoder, export_onnx, quantize
from imtext.export.runtime import CPU, make_session, run_encoder
from imtext.models.dual_path import build_model

REPO = Path(__file__).resolve().parents[1]
OPSET = 18


def encoder_inputs(
    kind: str, batch: int, image_size: int, vocab: int, max_len: int, rng: np.random.Generator
) -> np.ndarray:
    """A batch of encoder inputs: normalised-looking images, or captions of 8-20 words, padded."""
    if kind == "image":
        return rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    tokens = np.zeros((batch, max_len), np.int64)
    for row in tokens:
        length = int(rng.integers(8, min(20, max_len) + 1))
        row[:length] = rng.integers(2, vocab, length)
    return tokens


def median_ms(
    runners: dict[str, Callable[[], np.ndarray]], warmup: int, repeats: int, rounds: int
) -> dict[str, float]:
    """Median milliseconds of each runner over ``repeats`` runs, taken in ``rounds`` blocks: each
    block runs one runner ``warmup`` times untimed, then ``repeats / rounds`` times timed."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(warmup):
                run()
            for _ in range(math.ceil(repeats / rounds)):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--vocab", type=int, default=100, help="vocabulary size (words)")
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="blocks per runner, alternated")
    parser.add_argument("--no-int8", dest="int8", action="store_false")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench" / "export.md")
    args = parser.parse_args()

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model_cfg = load_stage_config("model", args.params)
    torch.manual_seed(0)
    model = build_model(model_cfg, args.vocab, n_classes=1000).eval()
    rng = np.random.default_rng(0)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        encoders = {
            "image": (ImageEncoder(model), torch.zeros(2, 3, model_cfg.image_size, model_cfg.image_size)),
            "text": (TextEncoder(model), torch.zeros(2, args.max_len, dtype=torch.int64)),
        }  # fmt: skip
        for kind, (encoder, sample) in encoders.items():
            path = Path(tmp) / f"{kind}.onnx"
            export_onnx(encoder, sample, OPSET, path)
            sessions = {"onnx": make_session(path, [CPU], threads)}
            if args.int8:
                quantize(path, Path(tmp) / f"{kind}.int8.onnx")
                sessions["int8"] = make_session(Path(tmp) / f"{kind}.int8.onnx", [CPU], threads)
            for batch in args.batches:
                inputs = encoder_inputs(
                    kind, batch, model_cfg.image_size, args.vocab, args.max_len, rng
                )
                tensor = torch.from_numpy(inputs)

                def run_torch(encoder=encoder, tensor=tensor) -> np.ndarray:
                    with torch.inference_mode():
                        return encoder(tensor).numpy()

                runners = {"torch": run_torch}
                for name, session in sessions.items():
                    runners[name] = lambda s=session, e=encoder, x=inputs: run_encoder(
                        s, e.input_name, x
                    )
                diff = float(np.abs(runners["onnx"]() - run_torch()).max())
                rows.append(
                    (kind, batch, median_ms(runners, args.warmup, args.repeats, args.rounds), diff)
                )

    with_int8 = args.int8
    header = "| encoder | batch | PyTorch ms | ONNX Runtime ms | speed-up vs PyTorch |"
    rule = "|---|---|---|---|---|"
    if with_int8:
        header += " ORT INT8 ms | INT8 speed-up vs PyTorch |"
        rule += "---|---|"
    header += " max abs diff ORT vs PyTorch |"
    rule += "---|"
    lines = [
        f"encoder latency, {model_cfg.image_backbone} at {model_cfg.image_size} px, embed "
        f"{model_cfg.embed_dim}, text width {model_cfg.text_width}, vocabulary {args.vocab}, "
        f"max_len {args.max_len}; {threads} threads for PyTorch {torch.__version__} and ONNX "
        f"Runtime {ort.__version__} (intra-op) of {os.cpu_count()} CPUs; median of "
        f"{args.repeats} runs in {args.rounds} alternated blocks, each after {args.warmup} "
        "warm-up runs",
        "",
        header,
        rule,
    ]
    for kind, batch, ms, diff in rows:
        line = (
            f"| {kind} | {batch} | {ms['torch']:.2f} | {ms['onnx']:.2f} | "
            f"{ms['torch'] / ms['onnx']:.2f}x |"
        )
        if with_int8:
            line += f" {ms['int8']:.2f} | {ms['torch'] / ms['int8']:.2f}x |"
        lines.append(line + f" {diff:.1e} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
