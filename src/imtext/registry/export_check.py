"""``register``'s own check of an export directory: never trust ``parity.json`` on its word.

``parity.json`` is a file anyone can write; ``{"passed": true}`` next to junk ONNX files used to be
registered as a version that failed only when served. Before a version is created, this module

1. reads ``parity.json`` as the report ``imtext export`` writes: passed, no failures, a finite
   tolerance, and each encoder's recorded max |ONNX Runtime - PyTorch| within it, for the scoring
   (``similarity``) that ``preprocess.json`` states;
2. loads every ONNX file with onnxruntime (CPU) and checks its inputs and output
   (:meth:`imtext.export.runtime.OnnxEncoders.load`);
3. embeds a few fixed probe images and sentences, in one batch and one at a time, and checks what
   the export's report implies about them: shape ``(N, embed_dim)``, finite, L2-normalised rows,
   distinct inputs giving distinct rows, batch and single outputs within twice the recorded
   tolerance (each was within it of PyTorch), and pair scores equal to dot products for a ``dot``
   export.

The export keeps no PyTorch reference embeddings, so these are checks of consistency with the
report, not a re-run of its parity check; they refuse junk, truncated, swapped or constant models.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imtext.errors import ImtextError
from imtext.export.runtime import (
    CPU,
    DOT,
    PARITY_FILE,
    PREPROCESS_FILE,
    ExportSpec,
    InputError,
    OnnxEncoders,
    make_session,
)
from imtext.registry.provenance import read_json

#: Probe inputs per modality: enough for distinct rows, few enough to take milliseconds.
PROBES = 4
#: |norm - 1| allowed for a row that the encoders L2-normalise in float32.
NORM_TOLERANCE = 1e-3
#: Rows closer than this on every coordinate count as the same output.
DISTINCT = 1e-6
#: Base colours of the probe images (noise is added): distinct means, distinct embeddings.
PROBE_COLOURS = ((220, 40, 40), (40, 190, 70), (30, 60, 220), (128, 128, 128))

RERUN = "run `imtext export` again and register its output directory unchanged"


def verify_export(export_dir: Path) -> None:
    """Raise :class:`ImtextError`, naming the file, unless ``export_dir`` holds working encoders
    consistent with its ``parity.json`` (see the module docstring)."""
    export_dir = Path(export_dir)
    spec = read_spec(export_dir)
    tolerance = recorded_tolerance(export_dir / PARITY_FILE, spec)
    check_loadable(export_dir, spec)
    try:
        encoders = OnnxEncoders.load(export_dir, providers=[CPU], threads=1)
    except InputError as exc:
        raise ImtextError(f"{exc}; {RERUN}") from None
    images, texts = probe_images(spec), probe_texts(encoders)
    image_rows = checked_embeddings(
        export_dir / spec.image.encoder,
        spec.embed_dim,
        tolerance,
        encoders.embed_images(images),
        np.concatenate([encoders.embed_images([image]) for image in images]),
    )
    text_rows = checked_embeddings(
        export_dir / spec.text.encoder,
        spec.embed_dim,
        tolerance,
        encoders.embed_texts(texts),
        np.concatenate([encoders.embed_texts([text]) for text in texts]),
    )
    check_scores(export_dir, spec, tolerance, encoders, image_rows, text_rows)


def read_spec(export_dir: Path) -> ExportSpec:
    try:
        return ExportSpec.read(export_dir / PREPROCESS_FILE)
    except InputError as exc:
        raise ImtextError(f"{exc}; {RERUN}") from None


def recorded_tolerance(path: Path, spec: ExportSpec) -> float:
    """``parity.tolerance`` of the export report at ``path``, after checking that the report is
    one ``imtext export`` wrote for this export and that it records passed parity checks."""
    report = read_json(path, "export checks")
    parity = report.get("parity") if isinstance(report, dict) else None
    if not isinstance(parity, dict) or report.get("failures") != []:
        raise ImtextError(
            f"{path}: not the report `imtext export` writes (it needs 'passed', an empty "
            f"'failures' list and the 'parity' section of every check); {RERUN}"
        )
    if report.get("similarity", DOT) != spec.similarity:
        raise ImtextError(
            f"{path}: records similarity {report.get('similarity')!r} but "
            f"{path.parent / PREPROCESS_FILE} says {spec.similarity!r}: the files come from "
            f"different exports; {RERUN}"
        )
    tolerance = parity.get("tolerance")
    if not _is_number(tolerance) or not 0 < tolerance < math.inf:
        raise ImtextError(
            f"{path}: parity.tolerance {tolerance!r} is not a positive number; {RERUN}"
        )
    sections = ("image", "text") + (("scorer",) if spec.pair_scorer else ())
    for name in sections:
        section = parity.get(name)
        diff = section.get("max_abs_diff") if isinstance(section, dict) else None
        # `not <=` so that NaN fails too.
        if not _is_number(diff) or not diff <= tolerance:
            raise ImtextError(
                f"{path}: parity.{name}.max_abs_diff {diff!r} is not a number within the "
                f"recorded tolerance {tolerance:g}; the report contradicts 'passed'; {RERUN}"
            )
    return float(tolerance)


def check_loadable(export_dir: Path, spec: ExportSpec) -> None:
    """Open each ONNX file on its own, so that a file onnxruntime cannot parse is named."""
    names = [spec.image.encoder, spec.text.encoder] + (
        [spec.pair_scorer] if spec.pair_scorer else []
    )
    for name in names:
        path = export_dir / name
        if not path.is_file():
            raise ImtextError(f"{path}: ONNX file not found; {RERUN}")
        try:
            make_session(path, [CPU], threads=1)
        except Exception as exc:  # onnxruntime's errors share no base class worth naming
            raise ImtextError(
                f"{path}: onnxruntime cannot load it ({_one_line(exc)}); it is not an ONNX model "
                f"that export wrote; {RERUN}"
            ) from None


def probe_images(spec: ExportSpec) -> list[Image.Image]:
    """:data:`PROBES` fixed RGB images, a little larger than the encoder's input (so the resize
    and crop run), each a base colour with noise."""
    rng = np.random.default_rng(0)
    size = spec.image.size
    images = []
    for colour in PROBE_COLOURS[:PROBES]:
        noise = rng.integers(-25, 26, (size + 5, size + 2, 3))
        pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


def probe_texts(encoders: OnnxEncoders) -> list[str]:
    """:data:`PROBES` distinct sentences of the export's own vocabulary (unknown words when it has
    none but ``<pad>`` and ``<unk>``)."""
    words = sorted(encoders.vocab, key=encoders.vocab.get)
    words = [w for w in words if w not in ("<pad>", "<unk>")] or ["unknownword"]
    length = max(1, min(encoders.spec.text.max_len, 3))
    return [
        " ".join(words[(i + j * PROBES) % len(words)] for j in range(length))
        + f" probe{i}" * (i % 2)
        for i in range(PROBES)
    ]


def checked_embeddings(
    path: Path, dim: int, tolerance: float, batched: np.ndarray, single: np.ndarray
) -> np.ndarray:
    """``batched`` after checking it against what the export report implies; errors name ``path``."""
    problem = embedding_problem(dim, tolerance, batched, single)
    if problem:
        raise ImtextError(
            f"{path}: {problem} on {len(batched)} probe inputs, unlike the encoder that "
            f"{path.parent / PARITY_FILE} describes; {RERUN}"
        )
    return batched


def embedding_problem(dim: int, tolerance: float, batched: Any, single: Any) -> str | None:
    """What is wrong with probe outputs (``(N, dim)`` each), or ``None``."""
    batched, single = np.asarray(batched), np.asarray(single)
    if batched.shape != (PROBES, dim) or single.shape != batched.shape:
        return f"outputs of shape {batched.shape} (one at a time: {single.shape}), not ({PROBES}, {dim})"
    if not (np.isfinite(batched).all() and np.isfinite(single).all()):
        return "outputs that are not finite"
    norms = np.linalg.norm(batched.astype(np.float64), axis=1)
    if np.abs(norms - 1).max() > NORM_TOLERANCE:
        return f"rows that are not L2-normalised (norms {np.round(norms, 4).tolist()})"
    if np.ptp(batched, axis=0).max() <= DISTINCT:
        return "the same output for different inputs"
    diff = float(np.abs(batched.astype(np.float64) - single).max())
    if diff > 2 * tolerance:
        return (
            f"outputs in one batch and one at a time that differ by {diff:.3g} (more than twice "
            f"the recorded tolerance {tolerance:g})"
        )
    return None


def check_scores(
    export_dir: Path,
    spec: ExportSpec,
    tolerance: float,
    encoders: OnnxEncoders,
    image_rows: np.ndarray,
    text_rows: np.ndarray,
) -> None:
    """The pair scorer answers each probe pair with a finite score; a dot export's score is the
    dot product of the two rows."""
    if not spec.pair_scorer:
        return
    path = export_dir / spec.pair_scorer
    scores = np.asarray(encoders.score_code_pairs(image_rows, text_rows))
    if scores.shape != (PROBES,) or not np.isfinite(scores).all():
        raise ImtextError(
            f"{path}: scores of shape {scores.shape} (finite: {bool(np.isfinite(scores).all())}) "
            f"for {PROBES} probe pairs, not {PROBES} finite numbers; {RERUN}"
        )
    if spec.similarity == DOT:
        dots = np.einsum("nd,nd->n", image_rows.astype(np.float64), text_rows)
        diff = float(np.abs(scores - dots).max())
        if diff > 2 * tolerance + 1e-6:
            raise ImtextError(
                f"{path}: scores differ from the dot products of the probe embeddings by "
                f"{diff:.3g}, but {export_dir / PREPROCESS_FILE} says similarity 'dot'; {RERUN}"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
