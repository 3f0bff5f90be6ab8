"""The ``export`` stage: a trained model -> ONNX encoders, checked against PyTorch before use.

Output directory (written into a temporary sibling, swapped in at the end):

| file | content |
|---|---|
| ``image_encoder.onnx`` | input ``images`` float32 (N, 3, S, S) -> ``embeddings`` (N, D), L2-normalised |
| ``text_encoder.onnx`` | input ``tokens`` int64 (N, L) -> ``embeddings`` (N, D), L2-normalised |
| ``int8/*.int8.onnx`` | with ``export.quantize`` ``static`` or ``dynamic``: both encoders in INT8 (CPU); ``int8/`` is empty with ``none`` |
| ``pair_scorer.onnx`` | ``image_codes``, ``text_codes`` (N, D) -> ``scores`` (N,): a dot product, or the similarity network's fusion |
| ``preprocess.json``, ``vocab.json`` | what a client needs to build the inputs (``imtext.export.runtime``) |
| ``parity.json`` | every check below, its tolerance and the provider it ran on |
| ``metrics.json`` | the returned numbers (DVC metrics) |

Only the batch axis is dynamic: S is the training crop and L the training ``max_len`` (the text CNN
max-pools over every position, padding included, so another L would change the embedding). Each
file embeds its weights (protobuf's 2 GB limit is far above the largest ResNet-152 model).

The similarity network (``model.method: similarity``) has no embedding: its encoders export the two
branches' codes, ``pair_scorer.onnx`` its fusion layers, and ``preprocess.json`` says
``similarity: network`` (``imtext.export.runtime``: nothing can be indexed, a query is scored
against every candidate). Every other method exports embeddings (``similarity: dot``).

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

INT8 (``export.quantize``): ``static`` writes QDQ models (``onnxruntime.quantization.quantize_static``
after ``quant_pre_process``): weights int8 per output channel, activations uint8 with ranges
calibrated on ``export.calibration_images`` training images and as many training captions, each
preprocessed exactly as ``preprocess.json`` says (the runtime's own functions). ONNX Runtime fuses
the QDQ pairs into QLinearConv / QGemm, which use VNNI where the CPU has it. ``dynamic`` quantizes
only the weights ahead of time and each activation at every call (ConvInteger): smaller, but slower
than float32 on the CPU (``bench/README.md``).

A failed check 1-3 replaces the output directory with one holding only ``parity.json`` (so no
unverified encoder can be served or registered) and raises :class:`~imtext.errors.ImtextError`.

Exporter (``export.exporter``): ``torchscript`` (``torch.onnx.export(dynamo=False)``) by default:
on the default model it writes the three files 12-19x faster than ``dynamo`` (torch.export,
which traces and optimises the whole program), and both pass every check above with the same
differences (``bench/README.md``). PyTorch deprecates the TorchScript exporter, so ``dynamo`` stays
one setting away and is tested too. Both write opset 18 and newer here; a lower ``export.opset``
cannot be converted for this model by the dynamo exporter (``Pad``), which would silently keep 18,
so that is an error. PyTorch runs on the CPU in float32: the reference.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)
from torch import nn

from imtext import __version__
from imtext._fs import atomic_directory, check_output_dir
from imtext.config import ExportConfig, ModelConfig, config_from_dict, config_to_dict
from imtext.data.datasets import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from imtext.data.store import VOCAB_FILE as PREPARED_VOCAB_FILE
from imtext.data.store import PreparedSplit, read_vocabulary
from imtext.data.text import PAD_ID, UNK_ID
from imtext.errors import ConfigError, DataError, ImtextError
from imtext.eval.metrics import retrieval_metrics
from imtext.export.runtime import (
    CPU,
    CUDA,
    DOT,
    FORMAT_VERSION,
    IMAGE_ENCODER,
    IMAGE_ENCODER_INT8,
    IMAGE_INPUT,
    INT8_DIR,
    NETWORK,
    NETWORK_OUTPUT_NOTE,
    NOTES,
    OUTPUT,
    PAIR_INPUTS,
    PAIR_OUTPUT,
    PAIR_SCORER,
    PARITY_FILE,
    PREPROCESS_FILE,
    TEXT_ENCODER,
    TEXT_ENCODER_INT8,
    TEXT_INPUT,
    VOCAB_FILE,
    ExportSpec,
    ImageSpec,
    OnnxEncoders,
    TextSpec,
    encode_text,
    preprocess_image,
)
from imtext.export.runtime import read_vocabulary as read_export_vocabulary
from imtext.models.dual_path import DualPathModel
from imtext.models.methods import SimilarityModel
from imtext.train.checkpoint import load_model

__all__ = [
    "export", "export_onnx", "quantize_dynamic_encoder", "quantize_static_encoder", "export_spec",
    "calibration_inputs", "ImageEncoder", "TextEncoder", "PairScorer",
]  # fmt: skip

METRICS_FILE = "metrics.json"
#: Largest batch of the parity and recall passes; the last one of a split is smaller.
PARITY_BATCH = 32
#: Items also run one at a time (batch 1) and compared with PyTorch.
SINGLE_ITEMS = 4
#: Pairs per PyTorch call of the pair scorer in the checks.
PAIR_BLOCK = 32768
#: torch.onnx's dynamo exporter implements opset 18 and newer; converting this model lower fails
#: (no ``Pad`` adapter) and the exporter then silently keeps 18.
MIN_OPSET = 18
#: Inputs per calibration run of the static quantizer (the same batch as the parity check's).
CALIBRATION_BATCH = 32
#: The split whose images and captions calibrate static INT8: never the split recall is checked on.
CALIBRATION_SPLIT = "train"

Log = Callable[[str], None]
Runner = Callable[[np.ndarray], np.ndarray]
#: Image codes (N_img, D) and text codes (N_txt, D) -> scores (N_img, N_txt).
MatrixScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
#: Pairs of rows, (N, D) each -> scores (N,).
PairRunner = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _no_log(message: str) -> None:
    pass


def similarity_of(model: DualPathModel) -> str:
    """``preprocess.json``'s ``similarity``: ``network`` for the similarity network, else ``dot``."""
    return NETWORK if isinstance(model, SimilarityModel) else DOT


class ImageEncoder(nn.Module):
    """``model.image_codes`` as a module of its own: images (N, 3, S, S) -> (N, D), L2-normalised
    (the embeddings, or the similarity network's image branch codes)."""

    input_names, output_name = (IMAGE_INPUT,), OUTPUT

    def __init__(self, model: DualPathModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.image_codes(images)


class TextEncoder(nn.Module):
    """``model.text_codes`` as a module of its own: int64 (N, L) -> (N, D), L2-normalised."""

    input_names, output_name = (TEXT_INPUT,), OUTPUT

    def __init__(self, model: DualPathModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.text_codes(tokens)


class PairScorer(nn.Module):
    """``model.score_codes`` as a module of its own: N row pairs (N, D) each -> scores (N,) (a dot
    product, or the similarity network's fusion layers)."""

    input_names, output_name = PAIR_INPUTS, PAIR_OUTPUT

    def __init__(self, model: DualPathModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_codes: torch.Tensor, text_codes: torch.Tensor) -> torch.Tensor:
        return self.model.score_codes(image_codes, text_codes)


def export_onnx(
    encoder: ImageEncoder | TextEncoder | PairScorer,
    sample: torch.Tensor | tuple[torch.Tensor, ...],
    opset: int,
    path: Path,
    metadata: dict[str, str] | None = None,
    *,
    dynamo: bool = True,
) -> None:
    """Write ``encoder`` (in eval mode) as one self-contained ONNX file with a dynamic batch axis,
    shared by all its inputs.

    ``sample`` (one tensor per input) fixes every other dimension; its batch must be at least 2
    (torch.export specialises a size of 1). ``metadata`` goes to the model's ``metadata_props``.
    ``dynamo``: torch.export's exporter (the default), else the deprecated TorchScript one
    (``bench/bench_export.py`` compares them).
    """
    samples = sample if isinstance(sample, tuple) else (sample,)
    if opset < MIN_OPSET:
        raise ConfigError(
            f"export.opset: {opset} is below {MIN_OPSET}, the lowest opset the exporter writes "
            f"(it cannot convert this model lower); set export.opset to {MIN_OPSET} or higher"
        )
    proto = (dynamo_proto if dynamo else torchscript_proto)(encoder.eval(), samples, opset)
    written = {entry.domain: entry.version for entry in proto.opset_import}.get("", None)
    if written != opset:
        raise ConfigError(
            f"export.opset: {opset} requested but the exporter wrote opset {written}; set "
            f"export.opset to one that torch {torch.__version__} writes ({MIN_OPSET} or higher)"
        )
    _strip_node_metadata(proto.graph)
    onnx.helper.set_model_props(proto, metadata or {})
    onnx.save_model(proto, str(path))


def dynamo_proto(
    encoder: ImageEncoder | TextEncoder | PairScorer, samples: tuple[torch.Tensor, ...], opset: int
) -> onnx.ModelProto:
    """``encoder`` through ``torch.onnx.export(dynamo=True)``, every input's axis 0 dynamic."""
    names = list(encoder.input_names)
    batch = torch.export.Dim("batch")
    with _quiet_logs("onnxscript", "onnx_ir", "torch.onnx"), warnings.catch_warnings():
        # The pair scorer's two inputs share the batch axis on purpose; the exporter says so.
        warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
        program = torch.onnx.export(
            encoder,
            samples,
            None,
            input_names=names,
            output_names=[encoder.output_name],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=tuple({0: batch} for _ in names),
            external_data=False,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def torchscript_proto(
    encoder: ImageEncoder | TextEncoder | PairScorer, samples: tuple[torch.Tensor, ...], opset: int
) -> onnx.ModelProto:
    """``encoder`` through the TorchScript exporter (``dynamo=False``), axis 0 of every input and
    of the output named ``batch``."""
    names = list(encoder.input_names)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Its deprecation notice, and notes on constant folding it skipped, say nothing to a user.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", module=r"torch\.onnx")
        torch.onnx.export(
            encoder,
            samples,
            buffer,
            input_names=names,
            output_names=[encoder.output_name],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={name: {0: "batch"} for name in [*names, encoder.output_name]},
            do_constant_folding=True,
        )
    return onnx.load_model_from_string(buffer.getvalue())


def _strip_node_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node metadata (stack traces, FX node names): it holds this
    checkout's source paths, so the same model exported from two checkouts would differ."""
    for node in graph.node:
        del node.metadata_props[:]


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextmanager
def _quiet_logs(*names: str) -> Iterator[None]:
    """Only ERROR and above from the named loggers and their children for the duration, and from
    the root logger's own records: the exporter's optimiser logs each pass and onnxruntime's
    quantizer each tensor, at INFO, which says nothing to a user of this stage."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    root, quiet = logging.getLogger(), _BelowError()
    root.addFilter(quiet)  # a level on the root would silence every other logger too
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.ERROR))
    try:
        yield
    finally:
        root.removeFilter(quiet)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _untyped(src: Path) -> onnx.ModelProto:
    """The model at ``src`` without its intermediate value types: the exporter types every value,
    initialisers included; the quantizers transpose some weights and their shape inference then
    rejects the stale shapes. They are inferred again."""
    model = onnx.load(str(src))
    del model.graph.value_info[:]
    return model


def quantize_dynamic_encoder(src: Path, dst: Path) -> None:
    """INT8 dynamic quantization of an encoder: int8 weights (per output channel), activations
    quantized at run time; ConvInteger and MatMulInteger run on onnxruntime's CPU provider."""
    with _quiet_logs():
        quantize_dynamic(_untyped(src), dst, weight_type=QuantType.QInt8, per_channel=True)


class _Batches(CalibrationDataReader):
    """The calibration inputs, ``CALIBRATION_BATCH`` rows per run, fed to one named input."""

    def __init__(self, input_name: str, inputs: np.ndarray) -> None:
        self._feeds = iter(
            [
                {input_name: inputs[start : start + CALIBRATION_BATCH]}
                for start in range(0, len(inputs), CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_static_encoder(src: Path, dst: Path, input_name: str, inputs: np.ndarray) -> None:
    """INT8 static QDQ quantization of an encoder: int8 weights per output channel, uint8
    activations whose ranges (min/max) are calibrated on ``inputs`` (N, ...), the encoder's input
    ``input_name``. ``quant_pre_process`` first folds and fuses the float graph, as ONNX Runtime
    advises; its symbolic shape inference is skipped (it cannot follow the Expand of the L2
    normalisation), ONNX's own runs."""
    # Files, not protos: quant_pre_process given a proto loses its weights (external data in a
    # directory it has already removed). Next to the output: inside the export's own directory.
    untyped, pre = dst.with_name(dst.name + ".in"), dst.with_name(dst.name + ".pre")
    try:
        onnx.save_model(_untyped(src), str(untyped))
        with _quiet_logs():
            quant_pre_process(untyped, pre, skip_symbolic_shape=True)
            quantize_static(
                pre,
                dst,
                _Batches(input_name, inputs),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    finally:
        untyped.unlink(missing_ok=True)
        pre.unlink(missing_ok=True)


def evenly_spaced(count: int, total: int) -> np.ndarray:
    """``min(count, total)`` distinct row indices spread over ``range(total)``, first row
    included: deterministic, and they cover the whole split (which is ordered by source)."""
    return np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(np.int64))


def calibration_inputs(
    prepared: Path, export_dir: Path, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images float32 (n, 3, S, S) and tokens int64 (m, L) from ``count`` images and ``count``
    captions of the prepared training split, preprocessed by the runtime's own functions from the
    ``preprocess.json`` and ``vocab.json`` in ``export_dir``: what a client would send."""
    split = PreparedSplit.load(prepared, CALIBRATION_SPLIT)
    if split.n_images == 0 or split.n_captions == 0:
        raise DataError(
            f"{prepared}: the {CALIBRATION_SPLIT!r} split has no images or captions to calibrate "
            "static INT8 with; set export.quantize to dynamic or none"
        )
    spec = ExportSpec.read(export_dir / PREPROCESS_FILE)
    vocab = read_export_vocabulary(export_dir / spec.text.vocabulary, spec.text)
    images = np.stack(
        [
            preprocess_image(split.image(int(row)), spec.image)
            for row in evenly_spaced(count, split.n_images)
        ]
    )
    tokens = np.stack(
        [
            encode_text(str(split.captions[row]), vocab, spec.text)
            for row in evenly_spaced(count, split.n_captions)
        ]
    )
    return images, tokens


def write_int8_encoders(cfg: ExportConfig, out: Path, prepared: Path) -> list[str]:
    """The INT8 encoders of ``cfg.quantize`` next to the float32 ones in ``out`` (which already
    holds ``preprocess.json`` and ``vocab.json``); returns their file names."""
    pairs = ((IMAGE_ENCODER, IMAGE_ENCODER_INT8), (TEXT_ENCODER, TEXT_ENCODER_INT8))
    if cfg.quantize == "dynamic":
        for src, dst in pairs:
            quantize_dynamic_encoder(out / src, out / dst)
    else:
        images, tokens = calibration_inputs(prepared, out, cfg.calibration_images)
        for (src, dst), name, inputs in zip(
            pairs, (IMAGE_INPUT, TEXT_INPUT), (images, tokens), strict=True
        ):
            quantize_static_encoder(out / src, out / dst, name, inputs)
    return [dst for _, dst in pairs]


def export_spec(
    image_size: int, max_len: int, embed_dim: int, int8: str | None, similarity: str = DOT
) -> ExportSpec:
    """``preprocess.json`` of a model: the training code's evaluation preprocessing, and how its
    outputs are compared (``similarity``: ``dot`` or ``network``). ``int8``: the quantization of
    the INT8 encoders (``static`` or ``dynamic``), None without them."""
    notes = dict(NOTES)
    if similarity == NETWORK:
        notes["output"] = NETWORK_OUTPUT_NOTE
    return ExportSpec(
        image=ImageSpec(size=image_size, mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD)),
        text=TextSpec(max_len=max_len, pad_id=PAD_ID, unk_id=UNK_ID),
        embed_dim=embed_dim,
        similarity=similarity,
        pair_scorer=PAIR_SCORER,
        notes=notes,
        int8={
            "image_encoder": IMAGE_ENCODER_INT8,
            "text_encoder": TEXT_ENCODER_INT8,
            "quantization": int8,
        }
        if int8
        else None,
    )


def embedding_dim(
    model: DualPathModel, image_sample: torch.Tensor, text_sample: torch.Tensor
) -> int:
    """D of both encoders' outputs, run once eagerly, so that a mismatch is a clear error here
    rather than one from inside the exporter's tracing."""
    with torch.inference_mode():
        dims = {
            ImageEncoder(model)(image_sample).shape[1],
            TextEncoder(model)(text_sample).shape[1],
        }
    if len(dims) != 1:
        raise ImtextError(f"the image and text embeddings differ in width ({sorted(dims)})")
    return dims.pop()


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


def write_encoders(
    model: DualPathModel,
    model_cfg: ModelConfig,
    max_len: int,
    cfg: ExportConfig,
    out: Path,
) -> list[str]:
    """Write both float32 encoders, the pair scorer and preprocess.json (which names the INT8
    encoders of ``cfg.quantize``, written by :func:`write_int8_encoders`); returns the ONNX file
    names."""
    size = model_cfg.image_size
    dynamo = cfg.exporter == "dynamo"
    # A batch of 2: torch.export specialises a sample size of 1 and the batch axis would not be
    # dynamic. Zeros suffice since neither encoder branches on values.
    image_sample = torch.zeros(2, 3, size, size)
    text_sample = torch.zeros(2, max_len, dtype=torch.int64)
    embed_dim = embedding_dim(model, image_sample, text_sample)
    similarity = similarity_of(model)
    common = {
        "imtext.version": __version__,
        "imtext.format_version": str(FORMAT_VERSION),
        "imtext.embed_dim": str(embed_dim),
    }
    image_props = {**common, "imtext.encoder": "image", "imtext.image_size": str(size)}
    export_onnx(
        ImageEncoder(model),
        image_sample,
        cfg.opset,
        out / IMAGE_ENCODER,
        image_props,
        dynamo=dynamo,
    )
    text_props = {**common, "imtext.encoder": "text", "imtext.max_len": str(max_len)}
    export_onnx(
        TextEncoder(model), text_sample, cfg.opset, out / TEXT_ENCODER, text_props, dynamo=dynamo
    )
    # Two tensors, not one twice: torch.export would take one object passed twice for one input.
    code_samples = (torch.zeros(2, embed_dim), torch.zeros(2, embed_dim))
    scorer_props = {**common, "imtext.scorer": similarity}
    export_onnx(
        PairScorer(model), code_samples, cfg.opset, out / PAIR_SCORER, scorer_props, dynamo=dynamo
    )
    (out / INT8_DIR).mkdir(exist_ok=True)  # one DVC output, empty without INT8
    int8 = None if cfg.quantize == "none" else cfg.quantize
    spec = export_spec(size, max_len, embed_dim, int8, similarity)
    (out / PREPROCESS_FILE).write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
    return [IMAGE_ENCODER, TEXT_ENCODER, PAIR_SCORER]


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
        "similarity": similarity_of(model),
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


def export(
    cfg: ExportConfig,
    model_path: Path,
    prepared: Path,
    out_dir: Path,
    *,
    log: Log = _no_log,
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
        names = write_encoders(model, model_cfg, int(split.tokens.shape[1]), cfg, tmp)
        shutil.copyfile(prepared / PREPARED_VOCAB_FILE, tmp / VOCAB_FILE)
        if cfg.quantize != "none":
            names += write_int8_encoders(cfg, tmp, prepared)
        sizes = {name: (tmp / name).stat().st_size / 2**20 for name in names}
        log("export: wrote " + ", ".join(f"{n} ({mb:.1f} MB)" for n, mb in sizes.items()))
        report = verify(cfg, model, split, tmp)
        report["model"] = str(model_path)
        report["model_config"] = config_to_dict(model_cfg)
        metrics = flat_metrics(report)
        metrics.update({Path(n).stem.replace(".", "_") + "_mb": mb for n, mb in sizes.items()})
        metrics["seconds"] = time.perf_counter() - start
        if report["failures"]:
            # Only the evidence survives: no unverified encoder can be served or registered.
            for path in tmp.iterdir():
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        else:
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
        (tmp / PARITY_FILE).write_text(json.dumps(report, indent=1) + "\n")
    log_summary(report, log)
    if report["failures"]:
        raise ImtextError(
            f"export checks failed: {'; '.join(report['failures'])}. Details: {out_dir / PARITY_FILE}"
        )
    return metrics


def log_summary(report: dict[str, Any], log: Log) -> None:
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
