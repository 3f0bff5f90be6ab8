"""The ``export`` stage: a trained model -> ONNX encoders, checked against PyTorch before use.

Output directory (written into a temporary sibling, swapped in at the end):

| file | content |
|---|---|
| ``image_encoder.onnx`` | input ``images`` float32 (N, 3, S, S) -> ``embeddings`` (N, D), L2-normalised |
| ``text_encoder.onnx`` | input ``tokens`` int64 (N, L) -> ``embeddings`` (N, D), L2-normalised |
| ``int8/*.int8.onnx`` | with ``export.quantize`` ``static`` or ``dynamic``: both encoders in INT8 (CPU); ``int8/`` is empty with ``none`` |
| ``pair_scorer.onnx`` | ``image_codes``, ``text_codes`` (N, D) -> ``scores`` (N,): a dot product, or the similarity network's fusion |
| ``preprocess.json``, ``vocab.json`` | what a client needs to build the inputs (``imtext.export.runtime``) |
| ``parity.json`` | every check of ``imtext.export.verify``, its tolerance and the provider it ran on |
| ``metrics.json`` | the returned numbers (DVC metrics) |

``imtext.export.onnx`` writes the encoders, ``imtext.export.verify`` checks them. A failed check
replaces the output directory with one holding only ``parity.json`` (so no unverified encoder can
be served or registered) and raises :class:`~imtext.errors.ImtextError`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from imtext._fs import atomic_directory, check_output_dir
from imtext.config import ExportConfig, ModelConfig, config_from_dict, config_to_dict
from imtext.data.store import VOCAB_FILE as PREPARED_VOCAB_FILE
from imtext.data.store import PreparedSplit, read_vocabulary
from imtext.errors import DataError, ImtextError
from imtext.export.onnx import write_export
from imtext.export.runtime import PARITY_FILE
from imtext.export.verify import flat_metrics, log_summary, verify
from imtext.logs import MessageLog
from imtext.models.dual_path import DualPathModel
from imtext.models.files import load_model

__all__ = ["export", "load_inputs"]

METRICS_FILE = "metrics.json"


def _no_log(message: str) -> None:
    pass


def load_inputs(
    model_path: Path, prepared: Path, split_name: str
) -> tuple[DualPathModel, ModelConfig, PreparedSplit]:
    """The model (CPU, eval mode), its config, and the recall split, checked to belong together."""
    model, record = load_model(model_path, "cpu")
    model_cfg = config_from_dict(ModelConfig, record["model_config"], f"{model_path}: model_config")
    vocab_size = len(read_vocabulary(prepared))
    if vocab_size != record["vocab_size"]:
        raise DataError(
            f"{model_path}: trained with a vocabulary of {record['vocab_size']} words, but "
            f"{prepared / PREPARED_VOCAB_FILE} has {vocab_size}; pass the prepared data the model "
            "was trained on"
        )
    split = PreparedSplit.load(prepared, split_name)
    if split.n_images == 0:
        raise DataError(
            f"{prepared}: split {split_name!r} has no images; set export.recall_split to a split "
            "with images"
        )
    return model, model_cfg, split


def export(
    cfg: ExportConfig,
    model_path: Path,
    prepared: Path,
    out_dir: Path,
    *,
    log: MessageLog = _no_log,
    force: bool = False,
) -> dict[str, float]:
    """Run the export stage: ONNX encoders of ``model_path`` into ``out_dir``, verified on the
    ``cfg.recall_split`` split of ``prepared`` (see the module docstring).

    Returns flat numbers: ``parity_max_abs_diff_{image,text}``, ``{torch,onnx,client,int8}_rsum``,
    ``rsum_abs_diff``, ``preprocess_max_abs_diff_image``, ``token_mismatches``,
    ``int8_max_abs_diff_{image,text}``, ``{image,text}_encoder[_int8]_mb`` and ``seconds``.
    Raises :class:`ImtextError` after writing ``parity.json`` when a check fails.
    """
    start = time.perf_counter()
    model_path, prepared, out_dir = Path(model_path), Path(prepared), Path(out_dir)
    inputs = (model_path, prepared)
    check_output_dir(out_dir, inputs, force)
    model, model_cfg, split = load_inputs(model_path, prepared, cfg.recall_split)
    with atomic_directory(out_dir, inputs=inputs, force=force) as tmp:
        sizes = write_export(cfg, model, model_cfg, int(split.tokens.shape[1]), prepared, tmp)
        log("export: wrote " + ", ".join(f"{n} ({mb:.1f} MB)" for n, mb in sizes.items()))
        report = verify(cfg, model, split, tmp)
        report["model"] = str(model_path)
        report["model_config"] = config_to_dict(model_cfg)
        metrics = stage_metrics(report, sizes, time.perf_counter() - start)
        write_outcome(report, metrics, tmp)
    log_summary(report, log)
    if report["failures"]:
        raise ImtextError(
            f"export checks failed: {'; '.join(report['failures'])}. Details: {out_dir / PARITY_FILE}"
        )
    return metrics


def stage_metrics(
    report: dict[str, Any], sizes: dict[str, float], seconds: float
) -> dict[str, float]:
    """``metrics.json``: the parity report's numbers (:func:`flat_metrics`), the size in MB of each
    ONNX file (``sizes``, by file name) and the stage's ``seconds``."""
    metrics = flat_metrics(report)
    metrics.update({Path(n).stem.replace(".", "_") + "_mb": mb for n, mb in sizes.items()})
    metrics["seconds"] = seconds
    return metrics


def write_outcome(report: dict[str, Any], metrics: dict[str, float], out: Path) -> None:
    """``parity.json`` into ``out``, and ``metrics.json`` beside the encoders when every check
    passed; when one failed, ``parity.json`` is all that stays."""
    if report["failures"]:
        # Only the evidence survives: no unverified encoder can be served or registered.
        for path in out.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    else:
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    (out / PARITY_FILE).write_text(json.dumps(report, indent=1) + "\n")
