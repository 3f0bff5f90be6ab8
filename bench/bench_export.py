"""The export stage's exporters and the encoders' INT8 variants, on a trained model.

1. **Export time**: the encoders and pair scorer written by ``torch.onnx.export`` with the dynamo
   exporter (``dynamo=True``, the stage's) and with the TorchScript one (``dynamo=False``), each
   timed (``write_encoders``; ``--export-passes`` times each, alternated: the first pass pays
   each exporter's one-time costs in the process, as the stage does), and then put through the
   stage's own checks (``verify``: parity against PyTorch at batch 1 and above, rsum from ONNX
   against PyTorch on the test split). The INT8 files below are made from the float32 files of
   ``export.exporter``.
2. **Latency**: each encoder in ONNX Runtime (CPU provider) in float32, INT8 dynamic
   (``quantize_dynamic_encoder``) and INT8 static QDQ (``quantize_static_encoder``, calibrated on
   ``--calibration-images`` training images and captions preprocessed by the runtime), and in
   PyTorch, at each of ``--batches`` on real test inputs. Baseline: ONNX Runtime float32 in the
   same run; the ratio is its time over the variant's (above 1: faster).
3. **Recall**: rsum on the test split from the embeddings of each variant (the inputs of the
   stage's recall check: ``eval_transform`` images and the prepared tokens).

Fairness: PyTorch and ONNX Runtime get the same threads (``torch.set_num_threads`` and the
sessions' ``intra_op_num_threads``, ``--threads``, default every CPU; inter-op 1). The runners take
turns in blocks (``--rounds`` blocks each, ``--warmup`` untimed runs at the start of every block),
not call by call: both thread pools spin for a while after a call and would tax whichever runs
next. The table gives the median of ``--repeats`` timed calls.

INT8 speed depends on the CPU's integer dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX); the
table's heading lists the ones this CPU has.

``--smoke`` renders a tiny dataset, builds an untrained tiny model and runs every step once at
tiny sizes (a test runs it so that a refactor cannot silently break this script); its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from _table import print_and_write_table  # bench/, the script's own directory
from _tiny import smoke_model_config, smoke_prepared  # bench/, the script's own directory

from imtext.config import ExportConfig, load_stage_config
from imtext.data.store import VOCAB_FILE as PREPARED_VOCAB_FILE
from imtext.data.store import PreparedSplit
from imtext.eval.metrics import retrieval_metrics
from imtext.export.onnx import (
    ImageEncoder,
    TextEncoder,
    calibration_inputs,
    quantize_dynamic_encoder,
    quantize_static_encoder,
    write_encoders,
)
from imtext.export.runtime import (
    CPU,
    IMAGE_ENCODER,
    IMAGE_INPUT,
    TEXT_ENCODER,
    TEXT_INPUT,
    VOCAB_FILE,
    OnnxEncoders,
    make_session,
    run_encoder,
)
from imtext.export.stage import load_inputs
from imtext.export.verify import image_batches, verify
from imtext.models.files import load_model

REPO = Path(__file__).resolve().parents[1]
#: CPU flags that ONNX Runtime's INT8 kernels use (``/proc/cpuinfo`` names).
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")
EXPORTERS = ("dynamo", "torchscript")
#: The float32 files and the INT8 variants, as (image file, text file) in one export directory.
VARIANTS = {
    "fp32": (IMAGE_ENCODER, TEXT_ENCODER),
    "int8 dynamic": ("image.dynamic.onnx", "text.dynamic.onnx"),
    "int8 static": ("image.static.onnx", "text.static.onnx"),
}


def cpu_flags(wanted: tuple[str, ...] = INT8_FLAGS) -> list[str]:
    """Which of ``wanted`` the first CPU in ``/proc/cpuinfo`` has (empty where it is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return [flag for flag in wanted if flag in flags]


def median_ms(
    runners: dict[str, Callable[[], Any]], warmup: int, repeats: int, rounds: int
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


def compare_exporters(
    cfg: ExportConfig, model_path: Path, prepared: Path, root: Path, passes: int
) -> list[dict[str, Any]]:
    """Each exporter's seconds for the three files, ``passes`` times in alternation (the first
    pass in the process pays each exporter's one-time costs, as the stage does), and the verdict
    of the stage's checks on its first directory, ``root/<exporter>``, which stays for the INT8
    measurements."""
    model, model_cfg, split = load_inputs(model_path, prepared, cfg.recall_split)
    max_len = int(split.tokens.shape[1])
    seconds: dict[str, list[float]] = {name: [] for name in EXPORTERS}
    errors: dict[str, str] = {}
    for index in range(passes):
        for name in EXPORTERS:
            if name in errors:
                continue
            out = root / (name if index == 0 else f"{name}-{index}")
            out.mkdir()
            start = time.perf_counter()
            try:
                write_encoders(
                    model, model_cfg, max_len, dataclasses.replace(cfg, exporter=name), out
                )
            except Exception as exc:  # an exporter that cannot convert the model is a result
                errors[name] = repr(exc)
                continue
            seconds[name].append(time.perf_counter() - start)
    rows = []
    for name in EXPORTERS:
        if name in errors:
            rows.append({"exporter": name, "seconds": None, "passed": False, "error": errors[name]})
            continue
        out = root / name
        shutil.copyfile(prepared / PREPARED_VOCAB_FILE, out / VOCAB_FILE)
        report = verify(dataclasses.replace(cfg, exporter=name), model, split, out)
        rows.append(
            {
                "exporter": name,
                "seconds": seconds[name],
                "passed": report["passed"],
                "failures": report["failures"],
                "parity_image": report["parity"]["image"]["max_abs_diff"],
                "parity_text": report["parity"]["text"]["max_abs_diff"],
                "parity_scorer": report["parity"]["scorer"]["max_abs_diff"],
                "torch_rsum": report["recall"]["torch"]["rsum"],
                "onnx_rsum": report["recall"]["onnx"]["rsum"],
            }
        )
    return rows


def write_int8_variants(export_dir: Path, prepared: Path, calibration_images: int) -> dict:
    """The dynamic and static INT8 files of both encoders in ``export_dir``; seconds of each."""
    seconds = {}
    start = time.perf_counter()
    for src, dst in zip(VARIANTS["fp32"], VARIANTS["int8 dynamic"], strict=True):
        quantize_dynamic_encoder(export_dir / src, export_dir / dst)
    seconds["int8 dynamic"] = time.perf_counter() - start
    start = time.perf_counter()
    images, tokens = calibration_inputs(prepared, export_dir, calibration_images)
    for src, dst, name, inputs in zip(
        VARIANTS["fp32"], VARIANTS["int8 static"], (IMAGE_INPUT, TEXT_INPUT), (images, tokens),
        strict=True,
    ):  # fmt: skip
        quantize_static_encoder(export_dir / src, export_dir / dst, name, inputs)
    seconds["int8 static"] = time.perf_counter() - start
    return seconds


def embed(session: ort.InferenceSession, name: str, inputs: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate(
        [run_encoder(session, name, inputs[s : s + batch]) for s in range(0, len(inputs), batch)]
    )


def measure_variants(
    export_dir: Path, model_path: Path, split: PreparedSplit, args: argparse.Namespace
) -> tuple[list[tuple], dict[str, float]]:
    """Latency rows (encoder, batch, {runner: ms}) and the test rsum of each runner."""
    model, _ = load_model(model_path, "cpu")
    # Verified above (compare_exporters); this directory has no parity.json of its own.
    encoders = OnnxEncoders.load(export_dir, providers=[CPU], threads=args.threads, verified=False)
    images = np.concatenate([reference for reference, _ in image_batches(split, encoders)])
    tokens = split.tokens.astype(np.int64)
    sessions = {
        variant: {
            kind: make_session(export_dir / name, [CPU], args.threads)
            for kind, name in zip(("image", "text"), files, strict=True)
        }
        for variant, files in VARIANTS.items()
    }
    torch_encoders = {"image": ImageEncoder(model), "text": TextEncoder(model)}
    inputs = {"image": (IMAGE_INPUT, images), "text": (TEXT_INPUT, tokens)}

    rsum = {}
    with torch.inference_mode():
        rsum["PyTorch"] = retrieval_metrics(
            torch.cat([torch_encoders["image"](torch.from_numpy(images[s : s + 32]))
                       for s in range(0, len(images), 32)]).numpy(),
            torch_encoders["text"](torch.from_numpy(tokens)).numpy(),
            split.caption_image,
        )["rsum"]  # fmt: skip
    for variant, by_kind in sessions.items():
        embeddings = [embed(by_kind[kind], *inputs[kind], 32) for kind in ("image", "text")]
        rsum[variant] = retrieval_metrics(*embeddings, split.caption_image)["rsum"]

    rows = []
    for kind, (name, all_inputs) in inputs.items():
        for batch in args.batches:
            x = all_inputs[np.arange(batch) % len(all_inputs)]
            tensor = torch.from_numpy(x)

            def run_torch(encoder=torch_encoders[kind], tensor=tensor) -> None:
                with torch.inference_mode():
                    encoder(tensor)

            runners: dict[str, Callable[[], Any]] = {"PyTorch": run_torch}
            for variant, by_kind in sessions.items():
                runners[variant] = lambda s=by_kind[kind], n=name, x=x: run_encoder(s, n, x)
            rows.append((kind, batch, median_ms(runners, args.warmup, args.repeats, args.rounds)))
    return rows, rsum


def smoke_inputs(root: Path, params: Path) -> tuple[Path, Path]:
    """A tiny rendered and prepared dataset and an untrained tiny model file for ``--smoke``."""
    from imtext.data.store import read_vocabulary
    from imtext.models import build_model
    from imtext.models.files import model_record, save_atomic

    prepared = smoke_prepared(root, params)
    model_cfg = smoke_model_config(params)
    vocab_size = len(read_vocabulary(prepared))
    n_classes = int(PreparedSplit.load(prepared, "train").image_labels.max()) + 1
    torch.manual_seed(0)
    model = build_model(model_cfg, vocab_size, n_classes).eval()
    path = root / "model.pt"
    save_atomic(model_record(model, model_cfg, vocab_size, n_classes), path)
    return path, prepared


def table(exporters: list[dict], rows: list[tuple], rsum: dict[str, float], heading: str) -> str:
    lines = [
        heading,
        "",
        "Export (the image and text encoders and the pair scorer), then the stage's checks:",
        "",
    ]
    lines += [
        "| exporter | export s, first / later passes | checks | max abs diff image / text / "
        "scorer | rsum ONNX / PyTorch |",
        "|---|---|---|---|---|",
    ]
    for row in exporters:
        if row["seconds"] is None:
            lines.append(f"| {row['exporter']} | failed | - | {row['error'][:80]} | - |")
            continue
        verdict = "passed" if row["passed"] else "FAILED: " + "; ".join(row["failures"])[:120]
        times = " / ".join(f"{t:.1f}" for t in row["seconds"])
        lines.append(
            f"| {row['exporter']} | {times} | {verdict} | {row['parity_image']:.1e} / "
            f"{row['parity_text']:.1e} / {row['parity_scorer']:.1e} | {row['onnx_rsum']:.2f} / "
            f"{row['torch_rsum']:.2f} |"
        )
    lines += [
        "",
        "Latency (ms, median) and test rsum; speed-up over ONNX Runtime fp32 in brackets:",
        "",
    ]
    names = list(rows[0][2]) if rows else []
    lines.append("| encoder | batch | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for kind, batch, ms in rows:
        cells = [f"{ms[n]:.2f} ({ms['fp32'] / ms[n]:.2f}x)" for n in names]
        lines.append(f"| {kind} | {batch} | " + " | ".join(cells) + " |")
    lines.append("| test rsum | | " + " | ".join(f"{rsum[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "artifacts" / "finetune" / "model.pt")
    parser.add_argument("--prepared", type=Path, default=REPO / "artifacts" / "prepared")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="blocks per runner, alternated")
    parser.add_argument("--calibration-images", type=int, default=None,
                        help="default: export.calibration_images of --params")  # fmt: skip
    parser.add_argument("--export-passes", type=int, default=3, help="exports per exporter")
    parser.add_argument("--smoke", action="store_true", help="tiny data and model, one repeat")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: artifacts/bench/export.md (none with --smoke)")  # fmt: skip
    args = parser.parse_args()

    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(load_stage_config("export", args.params), quantize="none")
    calibration = (
        args.calibration_images or load_stage_config("export", args.params).calibration_images
    )
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        model_path, prepared = args.model, args.prepared
        if args.smoke:
            model_path, prepared = smoke_inputs(root, args.params)
            args.batches, args.warmup, args.repeats, args.rounds = [1, 4], 0, 1, 1
            args.export_passes = 1
            calibration = 8
        exporters = compare_exporters(cfg, model_path, prepared, root, args.export_passes)
        # The INT8 files are made from the float32 ones of the stage's own exporter.
        quantize_s = write_int8_variants(root / cfg.exporter, prepared, calibration)
        split = PreparedSplit.load(prepared, cfg.recall_split)
        rows, rsum = measure_variants(root / cfg.exporter, model_path, split, args)
        model_cfg = load_model(model_path, "cpu")[1]["model_config"]
    heading = (
        f"{model_path}: {model_cfg['image_backbone']} at {model_cfg['image_size']} px, embed "
        f"{model_cfg['embed_dim']}, text {model_cfg['text_encoder']}; {cfg.recall_split} split "
        f"{split.n_images} images / {split.n_captions} captions; INT8 from the {cfg.exporter} "
        f"export. PyTorch {torch.__version__}, "
        f"ONNX Runtime {ort.__version__}, {args.threads} threads of {os.cpu_count()} CPUs; INT8 "
        f"CPU flags: {', '.join(cpu_flags()) or 'none'}. Median of {args.repeats} runs in "
        f"{args.rounds} alternated blocks after {args.warmup} warm-up runs each. Static INT8: "
        f"{calibration} training images and captions, quantized in "
        f"{quantize_s['int8 static']:.1f} s; dynamic in {quantize_s['int8 dynamic']:.1f} s."
        + (" SMOKE RUN: numbers mean nothing." if args.smoke else "")
    )
    text = table(exporters, rows, rsum, heading)
    print_and_write_table(text, "export", args.out, args.smoke)


if __name__ == "__main__":
    main()
