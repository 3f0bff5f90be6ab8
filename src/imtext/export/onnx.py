"""Writing the export: a trained model's encoders and pair scorer traced to ONNX, their INT8
variants, and the ``preprocess.json`` and ``vocab.json`` a client needs (``imtext.export.stage``
runs it; ``imtext.export.verify`` checks what it wrote).

Only the batch axis is dynamic: S is the training crop and L the training ``max_len`` (the text CNN
max-pools over every position, padding included, so another L would change the embedding). Each
file embeds its weights (protobuf's 2 GB limit is far above the largest ResNet-152 model).

The similarity network (``model.method: similarity``) has no embedding: its encoders export the two
branches' codes, ``pair_scorer.onnx`` its fusion layers, and ``preprocess.json`` says
``similarity: network`` (``imtext.export.runtime``: nothing can be indexed, a query is scored
against every candidate). Every other method exports embeddings (``similarity: dot``).

INT8 (``export.quantize``): ``static`` writes QDQ models (``onnxruntime.quantization.quantize_static``
after ``quant_pre_process``): weights int8 per output channel, activations uint8 with ranges
calibrated on ``export.calibration_images`` training images and as many training captions, each
preprocessed exactly as ``preprocess.json`` says (the runtime's own functions). ONNX Runtime fuses
the QDQ pairs into QLinearConv / QGemm, which use VNNI where the CPU has it. ``dynamic`` quantizes
only the weights ahead of time and each activation at every call (ConvInteger): smaller, but slower
than float32 on the CPU (``bench/README.md``).

Exporter (``export.exporter``): ``torchscript`` (``torch.onnx.export(dynamo=False)``) by default:
on the default model it writes the three files 12-19x faster than ``dynamo`` (torch.export,
which traces and optimises the whole program), and both pass every check with the same
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
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
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
from imtext.config import ExportConfig, ModelConfig
from imtext.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from imtext.data.store import VOCAB_FILE as PREPARED_VOCAB_FILE
from imtext.data.store import PreparedSplit
from imtext.data.text import PAD_ID, UNK_ID
from imtext.errors import ConfigError, DataError, ImtextError
from imtext.export.runtime import (
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
    PREPROCESS_FILE,
    TEXT_ENCODER,
    TEXT_ENCODER_INT8,
    TEXT_INPUT,
    VOCAB_FILE,
    ExportSpec,
    ImageSpec,
    TextSpec,
    encode_text,
    preprocess_image,
)
from imtext.export.runtime import read_vocabulary as read_export_vocabulary
from imtext.models.dual_path import DualPathModel
from imtext.models.methods import SimilarityModel

__all__ = [
    "write_export", "write_encoders", "write_int8_encoders", "export_onnx",
    "quantize_dynamic_encoder", "quantize_static_encoder", "export_spec", "calibration_inputs",
    "ImageEncoder", "TextEncoder", "PairScorer",
]  # fmt: skip

#: torch.onnx's dynamo exporter implements opset 18 and newer; converting this model lower fails
#: (no ``Pad`` adapter) and the exporter then silently keeps 18.
MIN_OPSET = 18
#: Inputs per calibration run of the static quantizer (the same batch as the parity check's).
CALIBRATION_BATCH = 32
#: The split whose images and captions calibrate static INT8: never the split recall is checked on.
CALIBRATION_SPLIT = "train"


def model_similarity(model: DualPathModel) -> str:
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
    similarity = model_similarity(model)
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


def write_export(
    cfg: ExportConfig,
    model: DualPathModel,
    model_cfg: ModelConfig,
    max_len: int,
    prepared: Path,
    out: Path,
) -> dict[str, float]:
    """Every file a client needs, into ``out``: the float32 encoders and pair scorer,
    ``preprocess.json``, ``vocab.json`` and the INT8 encoders of ``cfg.quantize``; returns the size
    in MB of each ONNX file, by name."""
    names = write_encoders(model, model_cfg, max_len, cfg, out)
    shutil.copyfile(prepared / PREPARED_VOCAB_FILE, out / VOCAB_FILE)
    if cfg.quantize != "none":
        names += write_int8_encoders(cfg, out, prepared)
    return {name: (out / name).stat().st_size / 2**20 for name in names}
