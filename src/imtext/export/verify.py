"""Verifying the export: the ONNX files ``imtext.export.onnx`` wrote, checked against the PyTorch
model before use (``imtext.export.stage`` runs it and writes the report as ``parity.json``).

Checks, on every image and caption of ``export.recall_split``:

1. parity: max |ONNX Runtime - PyTorch| over the embeddings, for batches of up to
   :data:`PARITY_BATCH` and for single items (the dynamic axis at 1 and above), both encoders fed
   the same tensors (``eval_transform`` images and the prepared tokens);
   and max |ONNX - PyTorch| of the pair scorer on one positive and one negative pair per
   caption (the PyTorch codes fed to both);
2. recall: ``rsum`` from the ONNX encoders and scorer against ``rsum`` from PyTorch's (scores:
   dot products, or every pair through the scorer);
3. client path: the runtime's own preprocessing of the raw images and captions. Its tokens must equal
   the prepared ones exactly; its image difference to ``eval_transform`` (at most a few uint8 levels,
   from Pillow's and torchvision's rounding) and its rsum are recorded, not judged;
4. INT8 encoders, when written: their max difference and rsum, recorded, not judged.

A failed check 1-3 is a sentence in the report's ``failures`` (:func:`check_failures`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from imtext.config import ExportConfig, config_to_dict
from imtext.data.datasets import eval_transform
from imtext.data.store import PreparedSplit
from imtext.eval.metrics import retrieval_metrics
from imtext.export.onnx import ImageEncoder, PairScorer, TextEncoder, model_similarity
from imtext.export.runtime import CPU, CUDA, FORMAT_VERSION, NETWORK, PAIR_SCORER, OnnxEncoders
from imtext.logs import MessageLog
from imtext.models.dual_path import DualPathModel
from imtext.models.methods import SimilarityModel

__all__ = ["verify", "flat_metrics", "log_summary", "max_abs_diff", "scorer_pairs"]

#: Largest batch of the parity and recall passes; the last one of a split is smaller.
PARITY_BATCH = 32
#: Items also run one at a time (batch 1) and compared with PyTorch.
SINGLE_ITEMS = 4
#: Pairs per PyTorch call of the pair scorer in the checks.
PAIR_BLOCK = 32768

Runner = Callable[[np.ndarray], np.ndarray]
#: Image codes (N_img, D) and text codes (N_txt, D) -> scores (N_img, N_txt).
MatrixScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
#: Pairs of rows, (N, D) each -> scores (N,).
PairRunner = Callable[[np.ndarray, np.ndarray], np.ndarray]


def select_providers() -> list[Any]:
    """CUDA when this onnxruntime build has it and a GPU is present, else the CPU."""
    if CUDA in ort.get_available_providers() and torch.cuda.is_available():
        # TF32 convolutions sit ~1e-3 from float32: parity measures the conversion, not TF32.
        return [(CUDA, {"use_tf32": "0"}), CPU]
    return [CPU]


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b|; NaN when either holds a NaN (so ``not diff <= tol`` fails it)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0


@dataclass
class Embeddings:
    """One modality of the recall split, every way the checks compare it: (M, D) float32 each."""

    #: PyTorch on the reference inputs (``eval_transform`` images, prepared tokens).
    torch: np.ndarray
    #: ONNX Runtime on the same inputs, in batches of up to ``largest_batch``.
    onnx: np.ndarray
    #: ONNX Runtime one item at a time on the first :data:`SINGLE_ITEMS` inputs: (k, D).
    single: np.ndarray
    #: ONNX Runtime on the runtime's own preprocessing of the raw images or captions.
    client: np.ndarray
    #: The INT8 encoder on the reference inputs, when there is one.
    int8: np.ndarray | None
    #: max |reference input - the runtime's own input|.
    input_max_abs_diff: float
    largest_batch: int


@dataclass(frozen=True)
class Runners:
    """Encoders of one modality: a batch of inputs (N, ...) -> (N, D) float32."""

    torch: Runner
    onnx: Runner
    int8: Runner | None = None


def torch_runner(encode: Callable[[torch.Tensor], torch.Tensor]) -> Runner:
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return encode(torch.from_numpy(batch)).numpy()

    return run


def embed_modality(
    batches: Iterable[tuple[np.ndarray, np.ndarray]], runners: Runners
) -> Embeddings:
    """Feed (reference, client) input batches to the runners; see :class:`Embeddings`."""
    outputs: dict[str, list[np.ndarray]] = {"torch": [], "onnx": [], "client": [], "int8": []}
    first: np.ndarray | None = None
    input_diff, largest = 0.0, 0
    for reference, own in batches:
        first = reference[:SINGLE_ITEMS] if first is None else first
        largest = max(largest, len(reference))
        input_diff = max(input_diff, max_abs_diff(reference, own))
        outputs["torch"].append(runners.torch(reference))
        outputs["onnx"].append(runners.onnx(reference))
        outputs["client"].append(runners.onnx(own))
        if runners.int8 is not None:
            outputs["int8"].append(runners.int8(reference))
    assert first is not None, "embed_modality needs at least one batch"
    single = np.concatenate([runners.onnx(first[i : i + 1]) for i in range(len(first))])
    return Embeddings(
        torch=np.concatenate(outputs["torch"]),
        onnx=np.concatenate(outputs["onnx"]),
        single=single,
        client=np.concatenate(outputs["client"]),
        int8=np.concatenate(outputs["int8"]) if outputs["int8"] else None,
        input_max_abs_diff=input_diff,
        largest_batch=largest,
    )


def image_batches(
    split: PreparedSplit, encoders: OnnxEncoders
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The split's images in row order, float32 (B, 3, S, S) pairs: ``eval_transform``'s tensors
    (the reference) and the runtime's own preprocessing of the same decoded images."""
    transform = eval_transform(encoders.spec.image.size)
    for start in range(0, split.n_images, PARITY_BATCH):
        rows = range(start, min(start + PARITY_BATCH, split.n_images))
        images = [split.image(row) for row in rows]
        reference = torch.stack([transform(image) for image in images]).numpy()
        yield reference, encoders.image_array(images)


def array_batches(
    reference: np.ndarray, own: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(reference), PARITY_BATCH):
        yield reference[start : start + PARITY_BATCH], own[start : start + PARITY_BATCH]


def recall_or_none(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_image: np.ndarray,
    score: MatrixScorer | None = None,
) -> dict[str, float] | None:
    """``retrieval_metrics`` (each caption matches its own image) of dot products, or of the
    ``score`` matrix when given; None for outputs that cannot be ranked (not finite: the parity
    check reports those)."""
    try:
        if score is None:
            return retrieval_metrics(image_emb, text_emb, caption_image)
        scores = score(image_emb, text_emb)
        # Rows of the identity as "text embeddings" make scores @ eye.T the score matrix itself.
        return retrieval_metrics(scores, np.eye(scores.shape[1], dtype=scores.dtype), caption_image)
    except ValueError:
        return None


@dataclass(frozen=True)
class Scoring:
    """How the recall check scores code pairs: None for dot products (``similarity: dot``)."""

    torch: MatrixScorer | None = None
    onnx: MatrixScorer | None = None


def torch_score_matrix(model: SimilarityModel) -> MatrixScorer:
    """The similarity network's fusion over every (image code, text code) pair."""

    def score(image_codes: np.ndarray, text_codes: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            codes = torch.from_numpy(image_codes), torch.from_numpy(text_codes)
            return model.score_code_matrix(*codes).numpy()

    return score


def scorer_pairs(caption_image: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (image, caption) of the scorer's parity check: each caption with its own image and
    with the next image (a negative pair, when there is more than one image)."""
    captions = np.arange(len(caption_image))
    images = np.concatenate([caption_image, (caption_image + 1) % n_images])
    return images.astype(np.int64), np.concatenate([captions, captions])


def scorer_parity(
    torch_pairs: PairRunner,
    onnx_pairs: PairRunner,
    images: Embeddings,
    texts: Embeddings,
    caption_image: np.ndarray,
) -> dict[str, Any]:
    """max |ONNX - PyTorch| of the pair scorer fed PyTorch's codes, in batches and one at a time."""
    image_rows, text_rows = scorer_pairs(caption_image, len(images.torch))
    image_codes, text_codes = images.torch[image_rows], texts.torch[text_rows]
    reference = np.concatenate(
        [
            torch_pairs(image_codes[s : s + PAIR_BLOCK], text_codes[s : s + PAIR_BLOCK])
            for s in range(0, len(image_codes), PAIR_BLOCK)
        ]
    )
    batched = onnx_pairs(image_codes, text_codes)
    n_single = min(SINGLE_ITEMS, len(reference))
    single = np.concatenate(
        [onnx_pairs(image_codes[i : i + 1], text_codes[i : i + 1]) for i in range(n_single)]
    )
    by_batch = {
        "1": max_abs_diff(single, reference[:n_single]),
        str(min(len(reference), PAIR_BLOCK)): max_abs_diff(batched, reference),
    }
    return {
        "max_abs_diff": max(by_batch.values()),
        "by_batch_size": by_batch,
        "count": len(reference),
    }


def torch_pair_runner(scorer: PairScorer) -> PairRunner:
    def run(image_codes: np.ndarray, text_codes: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return scorer(torch.from_numpy(image_codes), torch.from_numpy(text_codes)).numpy()

    return run


def parity_section(emb: Embeddings, count: int) -> dict[str, Any]:
    """max |ONNX - PyTorch| of one encoder, overall and by batch size."""
    by_batch = {
        "1": max_abs_diff(emb.single, emb.torch[: len(emb.single)]),
        str(emb.largest_batch): max_abs_diff(emb.onnx, emb.torch),
    }
    return {"max_abs_diff": max(by_batch.values()), "by_batch_size": by_batch, "count": count}


def check_failures(cfg: ExportConfig, report: dict[str, Any], split_name: str) -> list[str]:
    """The failed checks of a parity report, one sentence each (empty when all passed)."""
    failures = []
    for encoder, what in (
        ("image", "image encoder"),
        ("text", "text encoder"),
        ("scorer", "pair scorer"),
    ):
        section = report["parity"][encoder]
        diff = section["max_abs_diff"]
        # `not <=` so that a NaN difference fails too.
        if not diff <= cfg.parity_tolerance:
            failures.append(
                f"{what}: max |ONNX Runtime - PyTorch| {diff:.3g} over "
                f"{section['count']} {split_name} inputs exceeds export.parity_tolerance "
                f"{cfg.parity_tolerance:g}"
            )
    recall = report["recall"]
    if recall["torch"] is None or recall["onnx"] is None:
        failures.append("recall: embeddings are not finite, so they cannot be ranked")
    elif not recall["rsum_abs_diff"] <= cfg.recall_tolerance:
        failures.append(
            f"recall: rsum from ONNX embeddings {recall['onnx']['rsum']:.2f} vs PyTorch "
            f"{recall['torch']['rsum']:.2f} on {split_name} differs by {recall['rsum_abs_diff']:.2f}"
            f" > export.recall_tolerance {cfg.recall_tolerance:g}"
        )
    client = report["client"]
    if client["token_mismatches"]:
        failures.append(
            f"text preprocessing: the runtime's word ids differ from the prepared tokens for "
            f"{client['token_mismatches']} captions (first: caption {client['first_token_mismatch']})"
        )
    return failures


def parity_report(
    cfg: ExportConfig,
    split: PreparedSplit,
    images: Embeddings,
    texts: Embeddings,
    token_mismatches: np.ndarray,
    context: dict[str, Any],
    scorer: dict[str, Any],
    scoring: Scoring = Scoring(),
) -> dict[str, Any]:
    """Everything ``parity.json`` holds except the verdict (see :func:`check_failures`);
    ``scorer`` is :func:`scorer_parity`'s section."""
    recall = {
        name: recall_or_none(
            getattr(images, name),
            getattr(texts, name),
            split.caption_image,
            scoring.torch if name == "torch" else scoring.onnx,
        )
        for name in ("torch", "onnx", "client", "int8")
        if getattr(images, name) is not None
    }
    both = recall["torch"] is not None and recall["onnx"] is not None
    report: dict[str, Any] = {
        **context,
        "split": split.split,
        "n_images": split.n_images,
        "n_captions": split.n_captions,
        "parity": {
            "tolerance": cfg.parity_tolerance,
            "image": parity_section(images, split.n_images),
            "text": parity_section(texts, split.n_captions),
            "scorer": scorer,
        },
        "recall": {
            "tolerance": cfg.recall_tolerance,
            "protocol": "each caption matches its own image; scores are "
            + ("dot products" if scoring.onnx is None else "every pair through the pair scorer"),
            "rsum_abs_diff": abs(recall["onnx"]["rsum"] - recall["torch"]["rsum"])
            if both
            else None,
            "torch": recall["torch"],
            "onnx": recall["onnx"],
        },
        "client": {
            "what": "raw images and captions through imtext.export.runtime (its own preprocessing)",
            "image_preprocess_max_abs_diff": images.input_max_abs_diff,
            "token_mismatches": int(len(token_mismatches)),
            "first_token_mismatch": int(token_mismatches[0]) if len(token_mismatches) else None,
            "recall": recall["client"],
        },
        "int8": None,
    }
    if images.int8 is not None and texts.int8 is not None:
        report["int8"] = {
            "quantization": cfg.quantize,
            "calibration_images": cfg.calibration_images if cfg.quantize == "static" else None,
            "provider": CPU,
            "image_max_abs_diff": max_abs_diff(images.int8, images.torch),
            "text_max_abs_diff": max_abs_diff(texts.int8, texts.torch),
            "recall": recall["int8"],
        }
    return report


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of a parity report, flat (``metrics.json``, MLflow)."""
    metrics = {
        "parity_max_abs_diff_image": report["parity"]["image"]["max_abs_diff"],
        "parity_max_abs_diff_text": report["parity"]["text"]["max_abs_diff"],
        "parity_max_abs_diff_scorer": report["parity"]["scorer"]["max_abs_diff"],
        "preprocess_max_abs_diff_image": report["client"]["image_preprocess_max_abs_diff"],
        "token_mismatches": float(report["client"]["token_mismatches"]),
    }
    recall = report["recall"]
    for name, values in (
        ("torch", recall["torch"]),
        ("onnx", recall["onnx"]),
        ("client", report["client"]["recall"]),
    ):
        if values is not None:
            metrics[f"{name}_rsum"] = values["rsum"]
    if recall["rsum_abs_diff"] is not None:
        metrics["rsum_abs_diff"] = recall["rsum_abs_diff"]
    if report["int8"] is not None:
        metrics["int8_max_abs_diff_image"] = report["int8"]["image_max_abs_diff"]
        metrics["int8_max_abs_diff_text"] = report["int8"]["text_max_abs_diff"]
        if report["int8"]["recall"] is not None:
            metrics["int8_rsum"] = report["int8"]["recall"]["rsum"]
    return {key: float(value) for key, value in metrics.items()}


def embed_split(
    split: PreparedSplit,
    model: DualPathModel,
    encoders: OnnxEncoders,
    int8: OnnxEncoders | None,
) -> tuple[Embeddings, Embeddings, np.ndarray]:
    """Image and caption embeddings of ``split`` every way the checks compare them, and the rows
    whose runtime tokens differ from the prepared tokens (int64 (k,), empty when all agree)."""
    images = embed_modality(
        image_batches(split, encoders),
        Runners(
            torch_runner(ImageEncoder(model)),
            encoders.embed_image_array,
            int8.embed_image_array if int8 else None,
        ),
    )
    tokens = split.tokens.astype(np.int64)
    own_tokens = encoders.token_array(list(split.captions))
    texts = embed_modality(
        array_batches(tokens, own_tokens),
        Runners(
            torch_runner(TextEncoder(model)),
            encoders.embed_token_array,
            int8.embed_token_array if int8 else None,
        ),
    )
    return images, texts, np.flatnonzero((own_tokens != tokens).any(axis=1))


def verify(
    cfg: ExportConfig, model: DualPathModel, split: PreparedSplit, export_dir: Path
) -> dict[str, Any]:
    """Run every check on the encoders in ``export_dir``: the parity report, verdict first."""
    # ONNX Runtime gets PyTorch's thread count, which follows OMP_NUM_THREADS.
    threads = torch.get_num_threads()
    encoders = OnnxEncoders.load(
        export_dir, providers=select_providers(), threads=threads, verified=False
    )
    int8 = (
        OnnxEncoders.load(export_dir, int8=True, threads=threads, verified=False)
        if cfg.quantize != "none"
        else None
    )
    images, texts, mismatched = embed_split(split, model, encoders, int8)
    scorer = scorer_parity(
        torch_pair_runner(PairScorer(model)),
        encoders.score_code_pairs,
        images,
        texts,
        split.caption_image,
    )
    scoring = (
        Scoring(torch_score_matrix(model), encoders.score_code_matrix)
        if isinstance(model, SimilarityModel)
        else Scoring()
    )
    context = {
        "similarity": model_similarity(model),
        "format_version": FORMAT_VERSION,
        "exporter": f"torch.onnx.export(dynamo={cfg.exporter == 'dynamo'}), torch "
        f"{torch.__version__}",
        "onnxruntime": ort.__version__,
        "provider": encoders.providers[0],
        "torch_device": "cpu",
        "threads": threads,
        "export_config": config_to_dict(cfg),
    }
    report = parity_report(cfg, split, images, texts, mismatched, context, scorer, scoring)
    failures = check_failures(cfg, report, split.split)
    return {"passed": not failures, "failures": failures, **report}


def log_summary(report: dict[str, Any], log: MessageLog) -> None:
    parity, recall = report["parity"], report["recall"]
    log(
        f"export: max |ONNX - PyTorch| image {parity['image']['max_abs_diff']:.2g}, text "
        f"{parity['text']['max_abs_diff']:.2g}, pair scorer {parity['scorer']['max_abs_diff']:.2g} "
        f"(tolerance {parity['tolerance']:g}) on {report['provider']}"
    )
    if report.get("similarity") == NETWORK:
        log(
            "export: similarity network: the encoders output branch codes, scored in pairs by "
            f"{PAIR_SCORER}; it cannot be indexed (every candidate is scored per query)"
        )
    if recall["rsum_abs_diff"] is not None:
        log(
            f"export: {report['split']} rsum ONNX {recall['onnx']['rsum']:.2f}, PyTorch "
            f"{recall['torch']['rsum']:.2f}"
        )
    client = report["client"]
    if client["recall"] is not None:
        log(
            f"export: client path rsum {client['recall']['rsum']:.2f} (image preprocessing "
            f"max diff {client['image_preprocess_max_abs_diff']:.3g}, "
            f"{client['token_mismatches']} token mismatches)"
        )
    int8 = report["int8"]
    if int8 is not None and int8["recall"] is not None:
        log(
            f"export: INT8 ({int8['quantization']}) rsum {int8['recall']['rsum']:.2f}, "
            "max |INT8 - PyTorch| image "
            f"{int8['image_max_abs_diff']:.2g}, text {int8['text_max_abs_diff']:.2g}"
        )
    log(f"export: {'passed' if report['passed'] else 'FAILED'}")
