"""The ``evaluate`` stage: a trained model and a prepared split -> retrieval metrics and a report.

The model embeds every image and caption of the split (optionally with the paper's test-time flip
and shift averaging), the metrics follow the configured protocol, and the output directory
receives:

| file | content |
|---|---|
| ``metrics.json`` | numbers only (DVC metrics): every key of ``retrieval_metrics``, ``n_images``, ``n_captions`` |
| ``evaluation.json`` | context: split, protocol, model file and its config, settings, seconds taken |
| ``recall_curve.json`` | DVC-plots rows ``{"k", "i2t", "t2i"}``, Recall@K in percent, K = 1 .. min(100, gallery) |
| ``recall_curve.png`` | the same curve drawn |
| ``report.html`` | self-contained page: metrics, curve, sample queries with their top results |
| ``report.png`` | the sample queries as one image grid |

Galleries follow the protocol: ``coco_1k`` ranks each query among the 1,000 images (or their
captions) of its fold, so its recall curve is the mean of the five fold curves, as its metrics are
the mean of the fold metrics; ``full`` and ``cuhk`` rank within the whole split. The report scores
only its sample queries (``report_queries`` x gallery), never the whole score matrix.

The output directory is written into a temporary sibling and swapped in at the end: a failure
leaves the previous output as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imtext import __version__
from imtext._fs import atomic_directory, check_output_dir
from imtext.config import EvaluateConfig, config_to_dict
from imtext.data.store import PreparedSplit, arrays_file, read_meta, read_vocabulary
from imtext.device import resolve_device
from imtext.errors import ConfigError, DataError, ImtextError
from imtext.eval.embed import retrieval_inputs
from imtext.eval.metrics import per_query_ranks, recall_curve
from imtext.eval.protocols import COCO_1K_FOLD_IMAGES, COCO_1K_FOLDS, evaluate_protocol
from imtext.eval.report import (
    Example,
    Item,
    format_recall_table,
    recall_curve_rows,
    render_recall_curve_png,
    render_report_html,
    render_report_png,
    select_queries,
    thumbnail_png,
    top_k_matches,
)
from imtext.logs import MessageLog
from imtext.models.dual_path import DualPathModel
from imtext.models.files import load_model

__all__ = [
    "build_examples",
    "evaluate",
    "format_recall_table",  # from .report: the CLI prints it next to the stage's result
    "load_checked_model",
    "load_split",
    "match_ids",
    "protocol_folds",
    "ranks_and_curve",
    "write_outputs",
]

METRICS_FILE = "metrics.json"
EVALUATION_FILE = "evaluation.json"
CURVE_FILE = "recall_curve.json"
CURVE_PNG = "recall_curve.png"
REPORT_HTML = "report.html"
REPORT_PNG = "report.png"
CURVE_MAX_K = 100
#: Steps reported to ``progress``; embedding dominates the time on real data.
PHASES = ("load model", "embed images", "embed captions", "rank", "write report")

Progress = Callable[[Iterable, int, str], Iterable]


def _no_log(message: str) -> None:
    pass


def _no_progress(items: Iterable, total: int, desc: str) -> Iterable:
    return items


def evaluate(
    cfg: EvaluateConfig,
    model_path: Path,
    prepared: Path,
    out_dir: Path,
    *,
    device: str = "auto",
    log: MessageLog = _no_log,
    progress: Progress | None = None,
    force: bool = False,
) -> dict[str, float]:
    """Evaluate the model file ``model_path`` on split ``cfg.split`` of ``prepared`` data.

    Writes the files of the module docstring into ``out_dir`` (replaced as a whole) and returns
    what ``metrics.json`` holds; ``out_dir`` must be new, empty or an earlier output unless
    ``force`` (see :func:`imtext._fs.output_problem`). ``progress`` (as in ``prepare``: ``(items, total, desc)`` ->
    iterable) wraps :data:`PHASES`. Raises :class:`ImtextError` for a missing model file, a missing
    or empty split, a model trained on another vocabulary, or a protocol the data cannot follow.
    """
    started = time.perf_counter()
    model_path, prepared, out_dir = Path(model_path), Path(prepared), Path(out_dir)
    inputs = (model_path, prepared)
    check_output_dir(out_dir, inputs, force)
    phases = iter((progress or _no_progress)(PHASES, len(PHASES), "evaluate"))
    next(phases)
    split, data_format = load_split(prepared, cfg.split)
    text_ids, image_ids = match_ids(split, cfg.protocol, data_format, prepared)
    torch_device = resolve_device(device)
    model, record = load_checked_model(model_path, prepared, torch_device)

    next(phases)
    image_size = int(record["model_config"]["image_size"])
    # Embeddings, or for the similarity network the scores of every pair as (S, I): the ranking
    # and the report below only ever multiply the two (imtext.eval.embed).
    images, texts = retrieval_inputs(
        model, split, image_size, torch_device, cfg.batch_size, 4 * cfg.batch_size,
        cfg.flip_average, cfg.shift_average,
    )  # fmt: skip
    next(phases)

    next(phases)
    # Ranking is a few large matrix products: on a GPU it takes a fraction of the CPU's time.
    images, texts = images.to(torch_device), texts.to(torch_device)
    try:
        metrics = evaluate_protocol(
            images, texts, text_ids, cfg.protocol, image_ids if cfg.protocol == "cuhk" else None
        )
    except ValueError as exc:  # e.g. NaN embeddings of a diverged model
        raise ImtextError(
            f"{model_path} on the {cfg.split} split of {prepared}: cannot rank ({exc})"
        ) from None
    metrics = {**metrics, "n_images": split.n_images, "n_captions": split.n_captions}
    image_fold, caption_fold = protocol_folds(cfg.protocol, split.n_images, split.caption_image)
    i2t_ranks, t2i_ranks, curve = ranks_and_curve(
        images, texts, text_ids, image_ids, image_fold, caption_fold
    )

    next(phases)
    examples = build_examples(
        split, images, texts, cfg, text_ids=text_ids, image_ids=image_ids,
        image_fold=image_fold, caption_fold=caption_fold, i2t_ranks=i2t_ranks, t2i_ranks=t2i_ranks,
    )  # fmt: skip
    context = _context(cfg, model_path, prepared, data_format, record, torch_device, examples)
    with atomic_directory(out_dir, inputs=inputs, force=force) as tmp:
        context["seconds"] = round(time.perf_counter() - started, 3)
        write_outputs(tmp, metrics, curve, examples, context)
    next(phases, None)  # lets a progress bar finish
    log(_summary(cfg, metrics, out_dir))
    return metrics


def _context(
    cfg: EvaluateConfig,
    model_path: Path,
    prepared: Path,
    data_format: str,
    record: dict[str, Any],
    device: torch.device,
    examples: Sequence[Example],
) -> dict[str, Any]:
    """What ``evaluation.json`` holds besides the time taken."""
    return {
        "split": cfg.split,
        "protocol": cfg.protocol,
        "model": str(model_path),
        "prepared": str(prepared),
        "data_format": data_format,
        "model_stage": record.get("stage"),
        "model_epoch": record.get("epoch"),
        "model_config": record["model_config"],
        "vocab_size": record["vocab_size"],
        "n_classes": record["n_classes"],
        "config": config_to_dict(cfg),
        "device": str(device),
        "recall_curve": "mean of the fold curves" if cfg.protocol == "coco_1k" else "whole split",
        "report_queries": {
            direction: [e.query.row for e in examples if e.direction == direction]
            for direction in ("t2i", "i2t")
        },
        "imtext_version": __version__,
    }


def load_split(prepared: Path, split_name: str) -> tuple[PreparedSplit, str]:
    """The split and the data format (``karpathy`` or ``cuhk-pedes``) of ``prepared``."""
    if not prepared.is_dir():
        raise DataError(f"{prepared}: prepared data not found; run `imtext prepare` first")
    split = PreparedSplit.load(prepared, split_name)
    if split.n_images == 0:
        raise DataError(
            f"{prepared / arrays_file(split_name)}: the {split_name} split is empty; "
            "set evaluate.split to a split with images"
        )
    try:
        data_format = str(read_meta(prepared).get("format", "karpathy"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{prepared}: meta.json is missing or unreadable ({exc}); run `imtext prepare` again"
        ) from None
    return split, data_format


def match_ids(
    split: PreparedSplit, protocol: str, data_format: str, prepared: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Ids deciding what matches: captions (N_txt,) and images (N_img,), int64; raises
    :class:`ConfigError` before any embedding when the data cannot follow ``protocol``.

    ``cuhk`` matches a caption with every image of its person (the instance labels); the other
    protocols with its own image (the image rows).
    """
    if protocol == "coco_1k" and split.n_images != COCO_1K_FOLDS * COCO_1K_FOLD_IMAGES:
        raise ConfigError(
            f"evaluate.protocol 'coco_1k' needs the {COCO_1K_FOLDS * COCO_1K_FOLD_IMAGES:,}-image "
            f"COCO 5K test split, but the {split.split} split of {prepared} has "
            f"{split.n_images:,} images; use protocol 'full'"
        )
    if protocol == "cuhk":
        if data_format != "cuhk-pedes":
            raise ConfigError(
                f"evaluate.protocol 'cuhk' needs person identities, but {prepared} holds "
                f"{data_format} data; use protocol 'full'"
            )
        return split.caption_labels.astype(np.int64), split.image_labels.astype(np.int64)
    return split.caption_image.astype(np.int64), np.arange(split.n_images, dtype=np.int64)


def load_checked_model(
    model_path: Path, prepared: Path, device: torch.device
) -> tuple[DualPathModel, dict[str, Any]]:
    """The model of ``model_path`` in eval mode on ``device`` and its record, checked against
    the vocabulary of ``prepared`` (word ids are only meaningful with the vocabulary trained on)."""
    if not model_path.is_file():
        raise ImtextError(
            f"{model_path}: model file not found; pass the model.pt written by `imtext finetune` "
            "(or `imtext pretrain`)"
        )
    vocab_size = len(read_vocabulary(prepared))
    model, record = load_model(model_path, device)
    if record["vocab_size"] != vocab_size:
        raise ImtextError(
            f"{model_path}: the model was trained with a vocabulary of {record['vocab_size']} "
            f"words but {prepared / 'vocab.json'} has {vocab_size}; evaluate on the prepared "
            "data the model was trained on, or train a model on this data"
        )
    return model, record


def protocol_folds(
    protocol: str, n_images: int, caption_image: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The gallery fold of every image (N_img,) and caption (N_txt,), int64.

    A query is ranked only among the candidates of its own fold: one fold for ``full`` and
    ``cuhk``; for ``coco_1k`` the folds of 1,000 consecutive images, each with their captions.
    """
    image_fold = np.zeros(n_images, dtype=np.int64)
    if protocol == "coco_1k":
        image_fold = np.arange(n_images, dtype=np.int64) // COCO_1K_FOLD_IMAGES
    return image_fold, image_fold[np.asarray(caption_image, dtype=np.int64)]


def ranks_and_curve(
    images: torch.Tensor,
    texts: torch.Tensor,
    text_ids: np.ndarray,
    image_ids: np.ndarray,
    image_fold: np.ndarray,
    caption_fold: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """Per-query ranks within each query's fold and the mean recall curve of the folds.

    Args:
        images: (N_img, D) and texts: (N_txt, D) embeddings, L2-normalised.
        text_ids: (N_txt,) and image_ids: (N_img,) match ids (see :func:`match_ids`).
        image_fold: (N_img,) and caption_fold: (N_txt,) from :func:`protocol_folds`.

    Returns:
        ``(i2t, t2i, rows)``: int64 ranks (N_img,) and (N_txt,) in split order, and the
        :func:`~imtext.eval.report.recall_curve_rows` of K = 1 .. min(100, smallest gallery).
    """
    folds = [
        (np.flatnonzero(image_fold == f), np.flatnonzero(caption_fold == f))
        for f in np.unique(image_fold)
    ]
    max_k = min(CURVE_MAX_K, *(min(len(i), len(c)) for i, c in folds))
    i2t = np.zeros(len(images), dtype=np.int64)
    t2i = np.zeros(len(texts), dtype=np.int64)
    curves = []
    for image_rows, caption_rows in folds:
        fold_i2t, fold_t2i = per_query_ranks(
            images[image_rows], texts[caption_rows], text_ids[caption_rows], image_ids[image_rows]
        )
        i2t[image_rows], t2i[caption_rows] = fold_i2t, fold_t2i
        curves.append((recall_curve(fold_i2t, max_k), recall_curve(fold_t2i, max_k)))
    mean_i2t, mean_t2i = np.mean(curves, axis=0)
    return i2t, t2i, recall_curve_rows(mean_i2t, mean_t2i)


def build_examples(
    split: PreparedSplit,
    images: torch.Tensor,
    texts: torch.Tensor,
    cfg: EvaluateConfig,
    *,
    text_ids: np.ndarray,
    image_ids: np.ndarray,
    image_fold: np.ndarray,
    caption_fold: np.ndarray,
    i2t_ranks: np.ndarray,
    t2i_ranks: np.ndarray,
) -> list[Example]:
    """``cfg.report_queries`` sample text queries, then as many image queries, each with its top
    ``cfg.report_top_k`` results.

    ``images`` (N_img, D) and ``texts`` (N_txt, D) are L2-normalised; the other arrays are
    (N_img,) for images and (N_txt,) for captions: match ids (:func:`match_ids`), folds
    (:func:`protocol_folds`) and ranks (:func:`ranks_and_curve`). Queries come from one
    ``numpy.random.default_rng(cfg.seed)``: captions first.
    """
    rng = np.random.default_rng(cfg.seed)
    text_queries = select_queries(split.n_captions, cfg.report_queries, rng)
    image_queries = select_queries(split.n_images, cfg.report_queries, rng)
    thumbnails: dict[int, bytes] = {}

    def image_item(row: int, score: float | None = None, is_match: bool = False) -> Item:
        if row not in thumbnails:
            thumbnails[row] = thumbnail_png(split.image(row))
        return Item(row, png=thumbnails[row], score=score, is_match=is_match)

    def caption_item(row: int, score: float | None = None, is_match: bool = False) -> Item:
        return Item(row, caption=str(split.captions[row]), score=score, is_match=is_match)

    examples = []
    for q in text_queries.tolist():
        gallery = np.flatnonzero(image_fold == caption_fold[q])
        results, expected = _retrieve(
            texts[q], images[gallery], gallery, image_ids[gallery] == text_ids[q], cfg.report_top_k
        )
        examples.append(
            Example(
                "t2i",
                caption_item(q),
                tuple(image_item(*r) for r in results),
                int(t2i_ranks[q]),
                tuple(image_item(*r) for r in expected),
            )
        )
    for q in image_queries.tolist():
        gallery = np.flatnonzero(caption_fold == image_fold[q])
        results, expected = _retrieve(
            images[q], texts[gallery], gallery, text_ids[gallery] == image_ids[q], cfg.report_top_k
        )
        examples.append(
            Example(
                "i2t",
                image_item(q),
                tuple(caption_item(*r) for r in results),
                int(i2t_ranks[q]),
                tuple(caption_item(*r) for r in expected),
            )
        )
    return examples


def _retrieve(
    query: torch.Tensor, gallery: torch.Tensor, rows: np.ndarray, is_match: np.ndarray, k: int
) -> tuple[list[tuple[int, float, bool]], list[tuple[int, float, bool]]]:
    """The top ``k`` of a (D,) query among (G,D) candidates as ``(row, score, is_match)``, and
    the ground truth missing from them (at most ``k``, best first)."""
    # The dtype and device of the metrics, so near-ties order as they ranked there.
    scores = (gallery @ query).cpu().numpy()
    order, hits = top_k_matches(scores, is_match, k)
    results = [(int(rows[j]), float(scores[j]), bool(h)) for j, h in zip(order, hits, strict=True)]
    shown = set(order.tolist())
    missed = [j for j in np.flatnonzero(is_match) if j not in shown]
    missed = sorted(missed, key=lambda j: -scores[j])[:k]
    return results, [(int(rows[j]), float(scores[j]), True) for j in missed]


def write_outputs(
    out_dir: Path,
    metrics: dict[str, float],
    curve: Sequence[dict[str, float]],
    examples: Sequence[Example],
    context: dict[str, Any],
) -> None:
    """Write every file of the stage into ``out_dir`` (an existing, empty directory)."""
    title = f"{context['split']} split, protocol {context['protocol']}"
    curve_png = render_recall_curve_png(curve, f"Recall@K, {title}")
    _write_json(out_dir / METRICS_FILE, metrics)
    _write_json(out_dir / EVALUATION_FILE, context)
    _write_json(out_dir / CURVE_FILE, list(curve))
    (out_dir / CURVE_PNG).write_bytes(curve_png)
    page_context = {
        key: context[key] for key in ("model", "prepared", "split", "protocol", "imtext_version")
    }
    page_context["images / captions"] = f"{metrics['n_images']} / {metrics['n_captions']}"
    page_context["test-time averaging"] = (
        f"flip {context['config']['flip_average']}, shift {context['config']['shift_average']}"
    )
    page = render_report_html(examples, metrics, curve_png, page_context)
    (out_dir / REPORT_HTML).write_text(page, encoding="utf-8")
    (out_dir / REPORT_PNG).write_bytes(render_report_png(examples, f"imtext evaluation, {title}"))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


def _summary(cfg: EvaluateConfig, metrics: dict[str, float], out_dir: Path) -> str:
    def recalls(direction: str) -> str:
        return "/".join(f"{metrics[f'{direction}_r{k}']:.1f}" for k in (1, 5, 10))

    return (
        f"evaluate {cfg.split} ({cfg.protocol}): R@1/5/10 i2t {recalls('i2t')}, "
        f"t2i {recalls('t2i')}, rsum {metrics['rsum']:.1f} -> {out_dir}"
    )
