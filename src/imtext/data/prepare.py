"""The ``prepare`` stage: annotations + images -> vocabulary and prepared splits.

Order matters for honesty and for losing nothing: everything is written into a temporary directory
that replaces the output only at the end, so a failure leaves the previous output as it was; images
are streamed to disk as they are re-encoded (memory does not grow with the dataset); and the
vocabulary is built from the training split only.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from imtext._fs import atomic_directory, check_output_dir
from imtext.config import PrepareConfig, config_to_dict
from imtext.data.images import open_rgb, path_inside
from imtext.data.readers import (
    SKIP_HINT,
    SPLITS,
    Format,
    ImageRecord,
    read_annotations,
    refuse_or_skip,
)
from imtext.data.store import META_FILE, VOCAB_FILE, ImageBlobWriter, write_split_arrays
from imtext.data.text import UNK_ID, Vocabulary, build_vocabulary, encode_all, tokenize
from imtext.errors import DataError, printable
from imtext.logs import MessageLog

#: Caption length used when ``prepare.max_len`` is null, as in the Dual-Path paper.
DEFAULT_MAX_LEN = {"karpathy": 32, "cuhk-pedes": 56}

Progress = Callable[[Iterable, int, str], Iterable]


def _no_progress(items: Iterable, total: int, desc: str) -> Iterable:
    return items


def encode_image(path: Path | BinaryIO, short_side: int, image_format: str) -> bytes:
    """Decode the image at ``path`` (safely: see :func:`imtext.data.images.open_rgb`), downscale
    its shorter side to ``short_side`` if longer, and re-encode it; raise :class:`DataError` naming
    the file if it is missing, unreadable or too large."""
    rgb = open_rgb(path, short_side=short_side)
    width, height = rgb.size
    if min(width, height) > short_side:
        scale = short_side / min(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if image_format == "png":
        rgb.save(buffer, format="PNG")
    else:
        rgb.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def locate_images(
    records: Sequence[ImageRecord], images_dir: Path, skip_bad: bool, report: MessageLog
) -> dict[ImageRecord, Path]:
    """The file of each usable record, below ``images_dir``; a record whose image path leads out
    of it or names no file stops the run, or with ``skip_bad`` is left out and reported."""
    located, missing = {}, []
    for record in records:
        path = path_inside(images_dir, record.relpath)
        if path is None:
            refuse_or_skip(
                f"{record.where}: image path '{printable(record.relpath)}' leads outside "
                f"--images {images_dir} ('..', an absolute path or a symbolic link)",
                "image files must be inside --images; move the file there",
                skip_bad,
                report,
            )
        elif not path.is_file():
            missing.append(record)
        else:
            located[record] = path
    if missing and not skip_bad:
        first = missing[0]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(
            f"{printable(str(images_dir / first.relpath))}: image file not found ({first.where})"
            f"{more}; check --images {SKIP_HINT}"
        )
    for record in missing:
        report(
            f"{printable(str(images_dir / record.relpath))}: image file not found ({record.where})"
        )
    return located


def instance_labels(records: Sequence[ImageRecord]) -> np.ndarray:
    """Instance label per image: its row, or its identity renumbered 0..k-1 in sorted order."""
    if all(r.identity is None for r in records):
        return np.arange(len(records), dtype=np.int64)
    ids = sorted({r.identity for r in records})
    index = {identity: k for k, identity in enumerate(ids)}
    return np.array([index[r.identity] for r in records], dtype=np.int64)


def split_arrays(
    records: Sequence[ImageRecord],
    caption_tokens: Sequence[Sequence[str]],
    vocab: Vocabulary,
    max_len: int,
) -> dict[str, np.ndarray]:
    """The per-image and per-caption arrays of one split (see :class:`PreparedSplit`).

    ``caption_tokens`` holds the tokens of every caption of ``records``, in order.
    """
    captions = [c for r in records for c in r.captions]
    tokens, lengths = encode_all(caption_tokens, vocab, max_len)
    caption_image = np.repeat(np.arange(len(records)), [len(r.captions) for r in records])
    return {
        "tokens": tokens,
        "lengths": lengths,
        "caption_image": caption_image.astype(np.int64),
        "image_labels": instance_labels(records),
        "filenames": np.array([r.relpath for r in records], dtype=str),
        "captions": np.array(captions, dtype=str),
    }


def _write_images(
    located: dict[ImageRecord, Path],
    cfg: PrepareConfig,
    writer: ImageBlobWriter,
    skip_bad: bool,
    report: MessageLog,
    progress: Progress,
) -> list[ImageRecord]:
    """Check, re-encode and append every image to its split's blob; return the records kept."""

    def load(path: Path) -> bytes | DataError:
        try:
            return encode_image(path, cfg.image_short_side, cfg.image_format)
        except DataError as exc:
            return exc

    kept = []
    records = list(located)
    # A huge image is refused by open_rgb with its own message; Pillow's warning about it would
    # only repeat that, in a form (a Python warning) the user cannot act on.
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = progress(pool.map(load, located.values()), len(records), "images")
        for record, result in zip(records, results, strict=True):
            if isinstance(result, DataError):
                problem = f"{result} ({record.where})"
                refuse_or_skip(problem, "replace the file", skip_bad, report)
                continue
            writer.append(record.split, result)
            kept.append(record)
    return kept


def records_by_split(
    records: Sequence[ImageRecord], annotations: Path, log: MessageLog
) -> dict[str, list[ImageRecord]]:
    """The records of each split, in order; :class:`DataError` when no training image is left,
    a warning for an empty validation or test split."""
    by_split = {s: [r for r in records if r.split == s] for s in SPLITS}
    if not by_split["train"]:
        raise DataError(f"{annotations}: no usable training images; the train split is empty")
    for split in ("val", "test"):
        if not by_split[split]:
            log(f"warning: the {split} split of {annotations} is empty; no {split} metrics")
    return by_split


def split_metrics(
    split: str, arrays: dict[str, np.ndarray], caption_tokens: Sequence[Sequence[str]], max_len: int
) -> dict[str, Any]:
    """Sizes, unknown-word rate and truncated captions of one split's arrays (:func:`split_arrays`
    of ``caption_tokens``)."""
    return {
        f"{split}_images": len(arrays["filenames"]),
        f"{split}_captions": len(arrays["tokens"]),
        f"{split}_unk_rate": _unk_rate(arrays["tokens"], arrays["lengths"]),
        f"{split}_truncated": sum(len(t) > max_len for t in caption_tokens),
    }


def prepare(
    cfg: PrepareConfig,
    annotations: Path,
    images_dir: Path,
    out_dir: Path,
    fmt: Format = "karpathy",
    skip_bad: bool = False,
    log: MessageLog = print,
    progress: Progress = _no_progress,
    force: bool = False,
) -> dict[str, Any]:
    """Run the prepare stage; write ``out_dir`` and return its metrics.

    ``out_dir`` receives ``vocab.json``, ``meta.json`` and per split ``{split}.npz`` and
    ``{split}-images.bin``. With ``skip_bad``, unusable captions and images are dropped and listed
    in ``meta.json``; otherwise the first one raises :class:`DataError`. ``out_dir`` must be new,
    empty or an earlier output unless ``force`` (see :func:`imtext._fs.output_problem`).
    """
    annotations, images_dir = Path(annotations), Path(images_dir)
    inputs = (annotations, images_dir)
    check_output_dir(out_dir, inputs, force)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image directory not found; check --images")
    skipped: list[str] = []

    def report(problem: str) -> None:
        problem = printable(problem)  # one line per problem, whatever the file names hold
        skipped.append(problem)
        log(f"skipped: {problem}")

    records = read_annotations(
        annotations,
        fmt,
        captions_per_image=cfg.captions_per_image,
        use_restval=cfg.use_restval,
        skip_bad=skip_bad,
        report=report,
    )
    log(f"read {len(records)} images from {annotations}")
    located = locate_images(records, images_dir, skip_bad, report)

    with atomic_directory(out_dir, inputs=inputs, force=force) as tmp:
        with ImageBlobWriter(tmp) as writer:
            records = _write_images(located, cfg, writer, skip_bad, report, progress)
        by_split = records_by_split(records, annotations, log)
        max_len = cfg.max_len or DEFAULT_MAX_LEN[fmt]
        tokens = {
            s: [tokenize(c) for r in rows for c in r.captions] for s, rows in by_split.items()
        }
        vocab = build_vocabulary(tokens["train"], cfg.min_count)
        metrics: dict[str, Any] = {
            "vocab_size": len(vocab),
            "max_len": max_len,
            "skipped": len(skipped),
        }
        for split, rows in by_split.items():
            arrays = split_arrays(rows, tokens[split], vocab, max_len)
            write_split_arrays(tmp, split, writer.offsets(split), arrays)
            metrics |= split_metrics(split, arrays, tokens[split], max_len)
        vocab.to_json(tmp / VOCAB_FILE, min_count=cfg.min_count, built_from="train")
        meta = {
            "format": fmt,
            "annotations": str(annotations),
            "images": str(images_dir),
            "config": config_to_dict(cfg),
            "metrics": metrics,
            "skipped": skipped,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    log(
        "prepared "
        + ", ".join(f"{s} {metrics[f'{s}_images']} images" for s in SPLITS)
        + f"; vocabulary {len(vocab)} words; skipped {len(skipped)} -> {out_dir}"
    )
    return metrics


def _unk_rate(tokens: np.ndarray, lengths: np.ndarray) -> float:
    total = int(lengths.sum())
    return float((tokens == UNK_ID).sum() / total) if total else 0.0
