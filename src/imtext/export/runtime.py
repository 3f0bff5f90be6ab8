"""Embed raw images and sentences with the exported ONNX encoders: numpy, PIL and onnxruntime only.

This module is the serving half of ``imtext.export`` (the MLflow pyfunc model wraps it), so it never
imports torch or the rest of imtext: everything it needs is in an export directory.

| file | content |
|---|---|
| ``image_encoder.onnx`` | input ``images`` float32 (N, 3, S, S) -> output ``embeddings`` (N, D), L2-normalised |
| ``text_encoder.onnx`` | input ``tokens`` int64 (N, L) -> output ``embeddings`` (N, D), L2-normalised |
| ``int8/image_encoder.int8.onnx``, ``int8/text_encoder.int8.onnx`` | the same in INT8, statically (calibrated QDQ) or dynamically quantized (optional; ``int8/`` is empty without) |
| ``pair_scorer.onnx`` | inputs ``image_codes``, ``text_codes`` float32 (N, D) -> ``scores`` (N,): the score of each row pair |
| ``preprocess.json`` | how raw inputs become those tensors (:class:`ExportSpec`) |
| ``vocab.json`` | ``{"words": [...]}``, the word of each id |
| ``parity.json`` | the export's checks against PyTorch; :meth:`OnnxEncoders.load` refuses a failed one |

Preprocessing reproduces the training code's evaluation path (``imtext.data.datasets.
eval_transform`` and ``imtext.data.text.encode``):

* images: RGB; the shorter side resized to S (the longer to ``int(S * long / short)``) with
  antialiased bicubic, first along the width and then along the height, each pass rounded to
  uint8 as torchvision does (Pillow alone may pick the other order, which differs by several
  levels on noisy images); the centre S x S crop at offsets ``round((side - S) / 2)``; x / 255;
  (x - mean) / std per channel; HWC -> CHW.
* sentences: lower-cased; every maximal run of letters and digits is a word (``[^\\W_]+``, Python
  ``re`` with Unicode classes, so punctuation and underscores separate words); ids of the first
  L words (unknown words -> ``unk_id``), left-aligned in a row of ``pad_id``.

Scoring (``preprocess.json`` field ``similarity``):

* ``dot`` (``model.method`` dual_path and two_branch): the encoders' outputs are embeddings and a
  pair's score is their dot product, so the image side can go into a vector index
  (:attr:`OnnxEncoders.indexable`); ``pair_scorer.onnx`` computes the same dot product.
* ``network`` (the two-branch similarity network): the encoders' outputs are the two branches'
  codes, which only ``pair_scorer.onnx`` (element-wise product, then the fusion layers) turns into
  a score. A dot product of codes is not the model's score, so nothing can be indexed: a query is
  scored against every candidate's code (:meth:`OnnxEncoders.score_code_matrix`).
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

FORMAT_VERSION = 1
IMAGE_ENCODER = "image_encoder.onnx"
TEXT_ENCODER = "text_encoder.onnx"
#: Always written, empty without quantization: one output for DVC whatever export.quantize says.
INT8_DIR = "int8"
IMAGE_ENCODER_INT8 = f"{INT8_DIR}/image_encoder.int8.onnx"
TEXT_ENCODER_INT8 = f"{INT8_DIR}/text_encoder.int8.onnx"
PREPROCESS_FILE = "preprocess.json"
PARITY_FILE = "parity.json"
VOCAB_FILE = "vocab.json"
PAIR_SCORER = "pair_scorer.onnx"
IMAGE_INPUT, TEXT_INPUT, OUTPUT = "images", "tokens", "embeddings"
PAIR_INPUTS, PAIR_OUTPUT = ("image_codes", "text_codes"), "scores"
#: ``ExportSpec.similarity``: dot products of embeddings, or the similarity network's fusion layers.
DOT, NETWORK = "dot", "network"
#: The training tokenizer's word pattern (``imtext.data.text.tokenize``; a test holds them equal).
TOKEN_PATTERN = r"[^\W_]+"
#: Inputs per ONNX Runtime call: bounds the memory of one call, whatever the request size.
IMAGE_BATCH, TEXT_BATCH = 64, 256
#: Pairs per pair-scorer call (holds 2 x PAIR_BATCH x D float32 inputs: 64 MiB at D = 256).
PAIR_BATCH = 32768
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
#: Largest image (width x height, read from the file's header before any pixel is decoded) that
#: :func:`open_image` decodes. A 1-bit PNG of 12000 x 12000 is 91 KB on the wire but 432 MB as RGB;
#: this limit (a 7700 x 5200 photo) bounds one decoded image to 120 MB of RGB.
MAX_IMAGE_PIXELS = 40_000_000
#: The formats :func:`open_image` decodes: what clients are told to send, and no other decoder
#: meets hostile bytes.
IMAGE_FORMATS = ("PNG", "JPEG")
#: A large image is decoded at reduced size, but its shorter side stays at least this many times
#: the encoder's input side, so the exact antialiased resize still does the last step (an image
#: smaller than that is decoded exactly as before).
DECODE_MARGIN = 2
#: Fields that name a rule rather than a value: this runtime implements one of each.
RULE_FIELDS = (
    "resize", "interpolation", "resize_passes", "crop", "channel_order", "layout", "dtype",
    "token_regex_flavour", "padding", "truncation",
)  # fmt: skip
#: The rules of preprocess.json in words, for clients written without this module.
NOTES = {
    "image": (
        "Convert to RGB. Resize the shorter side to `size` and the longer to "
        "int(size * long / short), antialiased bicubic (a = -0.5, as Pillow), first along the "
        "width, then along the height, rounding to uint8 after each pass. Crop the centre "
        "size x size square at offsets round((side - size) / 2). Multiply by `scale`, subtract "
        "`mean` and divide by `std` per channel, and lay out as NCHW float32."
    ),
    "text": (
        "Lower-case the sentence; its words are the matches of `token_pattern` (Python re, "
        "Unicode classes: maximal runs of letters and digits). The id of a word is its index in "
        "the `words` list of `vocabulary`, `unk_id` when absent. Keep the first `max_len` ids, "
        "left-aligned in a row of `pad_id`, int64. A sentence without words is an error."
    ),
    "output": "`embeddings` (N, embed_dim) float32, L2-normalised: similarity is a dot product.",
    "pair_scorer": (
        "pair_scorer.onnx takes `image_codes` and `text_codes` (N, embed_dim) float32, the two "
        "encoders' outputs for N (image, sentence) pairs, and returns `scores` (N,): the model's "
        "score of each pair, higher is better."
    ),
}
#: The output note of a similarity-network export.
NETWORK_OUTPUT_NOTE = (
    "`embeddings` (N, embed_dim) float32 are the similarity network's branch codes, L2-normalised: "
    "NOT embeddings to compare by dot product. Score an (image, sentence) pair with pair_scorer.onnx; "
    "retrieval scores the query against every candidate (nothing can be indexed)."
)


class InputError(ValueError):
    """An input that cannot be embedded, or an export directory that cannot be used; the message
    names the input index or the file."""


@dataclass(frozen=True)
class ImageSpec:
    """Raw image -> float32 (3, size, size); see the module docstring for the exact rule."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1 / 255
    resize: str = "shorter_side"
    interpolation: str = "bicubic_antialias"
    resize_passes: str = "width_then_height_uint8"
    crop: str = "center"
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"
    input: str = IMAGE_INPUT
    encoder: str = IMAGE_ENCODER


@dataclass(frozen=True)
class TextSpec:
    """Sentence -> int64 (max_len,) word ids; see the module docstring for the exact rule."""

    max_len: int
    vocabulary: str = VOCAB_FILE
    pad_id: int = 0
    unk_id: int = 1
    lowercase: bool = True
    token_pattern: str = TOKEN_PATTERN
    token_regex_flavour: str = "python-re-unicode"
    padding: str = "left_aligned"
    truncation: str = "keep_first"
    dtype: str = "int64"
    input: str = TEXT_INPUT
    encoder: str = TEXT_ENCODER


@dataclass(frozen=True)
class ExportSpec:
    """Everything ``preprocess.json`` holds: how to build each encoder's input, and its output."""

    image: ImageSpec
    text: TextSpec
    embed_dim: int
    output: str = OUTPUT
    normalised: str = "l2"
    similarity: str = DOT
    #: ``pair_scorer.onnx``; absent (None) only in exports written before it existed.
    pair_scorer: str | None = None
    int8: dict[str, str] | None = None
    notes: dict[str, str] = field(default_factory=lambda: dict(NOTES))
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> ExportSpec:
        try:
            version = values.get("format_version")
            if version != FORMAT_VERSION:
                raise InputError(
                    f"{where}: format_version {version!r}; this runtime reads version "
                    f"{FORMAT_VERSION}, export the model again with this imtext"
                )
            image = dict(values["image"])
            image["mean"], image["std"] = tuple(image["mean"]), tuple(image["std"])
            spec = cls(
                **{
                    **values,
                    "image": ImageSpec(**image),
                    "text": TextSpec(**values["text"]),
                }
            )
        except (KeyError, TypeError) as exc:
            raise InputError(f"{where}: not an imtext preprocess file ({exc!r})") from None
        check_supported(spec, where)
        if spec.similarity not in (DOT, NETWORK):
            raise InputError(
                f"{where}: similarity {spec.similarity!r} is not supported; this runtime "
                f"implements {DOT!r} and {NETWORK!r}"
            )
        if spec.similarity == NETWORK and not spec.pair_scorer:
            raise InputError(f"{where}: similarity 'network' needs a pair_scorer file")
        return spec

    @classmethod
    def read(cls, path: Path) -> ExportSpec:
        return cls.from_dict(_read_json(path), str(path))


def check_supported(spec: ExportSpec, where: str) -> None:
    """Raise :class:`InputError` when a rule of ``spec`` is not the one this runtime implements
    (every rule is fixed in format version 1; a field states it for other clients)."""
    for section, implemented in (
        (spec.image, ImageSpec(1, (0,) * 3, (1,) * 3)),
        (spec.text, TextSpec(1)),
    ):
        for name in RULE_FIELDS:
            if hasattr(section, name) and getattr(section, name) != getattr(implemented, name):
                raise InputError(
                    f"{where}: {name} {getattr(section, name)!r} is not supported; this runtime "
                    f"implements {getattr(implemented, name)!r}"
                )


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size``, as torchvision computes it:
    the longer side becomes ``int(size * long / short)`` (truncated, not rounded)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def centre_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL box (left, top, right, bottom) of the centre ``size`` square, torchvision's offsets."""
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def preprocess_image(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """One PIL image (any size and mode) -> float32 (3, size, size), normalised."""
    image = image.convert("RGB")
    width, height = image.size
    new_width, new_height = resized_size(width, height, spec.size)
    # Two single-axis passes in torchvision's order; each rounds to uint8 in between.
    if new_width != width:
        image = image.resize((new_width, height), Image.Resampling.BICUBIC)
    if new_height != height:
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    image = image.crop(centre_crop_box(new_width, new_height, spec.size))
    pixels = np.asarray(image, dtype=np.float32) * np.float32(spec.scale)  # (S, S, 3)
    pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def open_image(data: bytes, size: int, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from the bytes of a PNG or JPEG file, for an encoder whose input is
    ``size`` x ``size``; :class:`InputError` with a one-line reason for anything else.

    The pixel count is read from the header and checked against ``max_pixels`` before decoding.
    A large image is decoded at reduced size (a JPEG by DCT scaling, :meth:`PIL.Image.Image.draft`;
    a PNG by :meth:`~PIL.Image.Image.reduce` before its colour conversion), keeping the shorter
    side at least :data:`DECODE_MARGIN` x ``size``.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own (larger) limit; the check below refuses those anyway.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise InputError(
            f"more than {max_pixels:,} pixels; send the image scaled down (the model sees "
            f"{size} x {size})"
        ) from None
    except Image.UnidentifiedImageError:
        # Pillow's message names its in-memory buffer object, which tells a client nothing.
        raise InputError("not a PNG or JPEG file; send the bytes of a PNG or JPEG image") from None
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"not a PNG or JPEG file ({_first_line(exc)})") from None
    width, height = image.size
    if width * height > max_pixels or width < 1 or height < 1:
        raise InputError(
            f"{width} x {height} pixels is more than the {max_pixels:,} this model decodes; send "
            f"the image scaled down (the model sees {size} x {size})"
        )
    try:
        return reduced_rgb(image, size)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt pixel data
        raise InputError(
            f"a {image.format} file that cannot be decoded ({_first_line(exc)})"
        ) from None


def reduced_rgb(image: Image.Image, size: int) -> Image.Image:
    """``image`` (opened, not yet decoded) decoded and converted to RGB, at reduced size when its
    shorter side exceeds ``2 x DECODE_MARGIN x size``."""
    width, height = image.size
    keep = DECODE_MARGIN * size
    if min(width, height) > keep:
        scale = keep / min(width, height)
        # JPEG only (other formats ignore it): decode at 1/2, 1/4 or 1/8 scale, never below this.
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    image.load()
    factor = min(image.size) // keep
    if factor < 2:
        return image.convert("RGB")
    # reduce() averages raw values: palette indices must become colours first; 1-bit to 8-bit
    # grey is the same size in memory.
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode not in ("L", "RGB", "RGBA", "LA"):
        image = image.convert("RGB")
    return image.reduce(factor).convert("RGB")


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def tokenize(text: str, spec: TextSpec) -> list[str]:
    """The words of ``text`` under ``spec``'s rule (lower-case, runs of letters and digits)."""
    return re.findall(spec.token_pattern, text.lower() if spec.lowercase else text)


def encode_text(text: str, vocab: dict[str, int], spec: TextSpec) -> np.ndarray:
    """One sentence -> int64 (max_len,): ids of its first ``max_len`` words, then ``pad_id``.

    Raises :class:`ValueError` when the sentence has no word (an all-padding row would embed to
    the same vector for every such input, which no caller wants silently).
    """
    words = tokenize(text, spec)[: spec.max_len]
    if not words:
        raise ValueError(f"no words in {text!r}; a sentence needs at least one letter or digit")
    row = np.full(spec.max_len, spec.pad_id, dtype=np.int64)
    row[: len(words)] = [vocab.get(word, spec.unk_id) for word in words]
    return row


def read_vocabulary(path: Path, spec: TextSpec) -> dict[str, int]:
    """word -> id from ``vocab.json`` (``{"words": [...]}``), checking the pad and unk ids."""
    words = _read_json(path).get("words")
    if not isinstance(words, list) or len(words) <= max(spec.pad_id, spec.unk_id):
        raise InputError(f"{path}: expected {{'words': [...]}} with the <pad> and <unk> entries")
    index = {word: i for i, word in enumerate(words)}
    if words[spec.pad_id] != "<pad>" or words[spec.unk_id] != "<unk>":
        raise InputError(f"{path}: ids {spec.pad_id} and {spec.unk_id} must be <pad> and <unk>")
    return index


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (it falls back to the CPU without a GPU)."""
    available = ort.get_available_providers()
    return [CUDA, CPU] if CUDA in available else [CPU]


def make_session(
    path: Path, providers: Sequence[Any] | None = None, threads: int | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime session; ``threads`` sets intra-op threads (``None``: onnxruntime's choice,
    one per physical core)."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Errors only: ORT warns about unused initialisers and provider fallbacks; the providers in
    # use are on the session (and in parity.json).
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), sess_options=options, providers=list(providers or default_providers())
    )


def run_encoder(session: ort.InferenceSession, name: str, batch: np.ndarray) -> np.ndarray:
    """One call of an encoder: (N, ...) input -> (N, D) float32 embeddings."""
    return session.run([OUTPUT], {name: batch})[0]


class OnnxEncoders:
    """Both exported encoders and their preprocessing; build it with :meth:`load`."""

    def __init__(
        self,
        spec: ExportSpec,
        vocab: dict[str, int],
        image_session: ort.InferenceSession,
        text_session: ort.InferenceSession,
        scorer_session: ort.InferenceSession | None = None,
    ) -> None:
        self.spec, self.vocab = spec, vocab
        self.image_session, self.text_session = image_session, text_session
        self.scorer_session = scorer_session

    @classmethod
    def load(
        cls,
        export_dir: Path,
        *,
        int8: bool = False,
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
        verified: bool = True,
    ) -> OnnxEncoders:
        """Open an export directory.

        Args:
            export_dir: the output directory of ``imtext export``.
            int8: use the INT8 encoders (CPU only; ``export.quantize``).
            providers: ONNX Runtime providers; ``None``: CUDA when available, else the CPU.
            threads: intra-op threads per session; ``None``: onnxruntime's default.
            verified: refuse a directory whose ``parity.json`` does not record passed checks
                (``export`` itself passes ``False`` while it is checking).
        """
        export_dir = Path(export_dir)
        if verified:  # first: a failed export holds nothing else, and this says why
            check_verified(export_dir / PARITY_FILE)
        spec = ExportSpec.read(export_dir / PREPROCESS_FILE)
        vocab = read_vocabulary(export_dir / spec.text.vocabulary, spec.text)
        if int8:
            if not spec.int8:
                raise InputError(
                    f"{export_dir}: no INT8 encoders; export with export.quantize: static"
                )
            names = spec.int8["image_encoder"], spec.int8["text_encoder"]
            # Verified on the CPU provider only (ConvInteger, of dynamic INT8, runs nowhere else).
            providers = [CPU]
        else:
            names = spec.image.encoder, spec.text.encoder
        sessions = []
        for name, (input_name, dtype) in zip(
            names,
            ((spec.image.input, "tensor(float)"), (spec.text.input, "tensor(int64)")),
            strict=True,
        ):
            path = export_dir / name
            if not path.is_file():
                raise InputError(f"{path}: encoder not found; is {export_dir} an export directory?")
            session = make_session(path, providers, threads)
            check_signature(session, [(input_name, dtype)], OUTPUT, path)
            sessions.append(session)
        scorer = None
        if spec.pair_scorer:
            path = export_dir / spec.pair_scorer
            if not path.is_file():
                raise InputError(f"{path}: pair scorer not found; export the model again")
            scorer = make_session(path, providers, threads)
            check_signature(
                scorer, [(name, "tensor(float)") for name in PAIR_INPUTS], PAIR_OUTPUT, path
            )
        return cls(spec, vocab, *sessions, scorer)

    @property
    def indexable(self) -> bool:
        """Whether a pair's score is the dot product of the two outputs (so candidates can be
        embedded once and indexed); False for the similarity network (module docstring)."""
        return self.spec.similarity == DOT

    @property
    def providers(self) -> list[str]:
        """The providers the image session actually runs on, preferred first."""
        return self.image_session.get_providers()

    def image_array(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> float32 (N, 3, S, S), preprocessed; :class:`InputError` names a bad one."""
        rows = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise InputError(f"image {i}: expected a PIL image, got {type(image).__name__}")
            rows.append(preprocess_image(image, self.spec.image))
        size = self.spec.image.size
        return np.stack(rows) if rows else np.zeros((0, 3, size, size), np.float32)

    def token_array(self, texts: Sequence[str]) -> np.ndarray:
        """Sentences -> int64 (N, L) word ids; :class:`InputError` names the first bad one."""
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"text {i}: expected a string, got {type(text).__name__}")
            try:
                rows.append(encode_text(text, self.vocab, self.spec.text))
            except ValueError as exc:
                raise InputError(f"text {i}: {exc}") from None
        return np.stack(rows) if rows else np.zeros((0, self.spec.text.max_len), np.int64)

    def embed_image_array(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, 3, S, S), preprocessed -> (N, D) float32, L2-normalised."""
        return self._run(self.image_session, self.spec.image.input, images, IMAGE_BATCH)

    def embed_token_array(self, tokens: np.ndarray) -> np.ndarray:
        """int64 (N, L) word ids -> (N, D) float32, L2-normalised."""
        return self._run(self.text_session, self.spec.text.input, tokens, TEXT_BATCH)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> (N, D) float32 embeddings, L2-normalised (score = dot product)."""
        embeddings = []
        for start in range(0, len(images), IMAGE_BATCH):
            batch = self.image_array(images[start : start + IMAGE_BATCH])
            embeddings.append(self.embed_image_array(batch))
        return _concat(embeddings, self.spec.embed_dim)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Sentences -> (N, D) float32 embeddings, L2-normalised; a sentence without any word
        raises :class:`InputError` (a ``ValueError``) naming its index."""
        if isinstance(texts, str):
            raise InputError("texts: expected a list of sentences, got one string")
        return self.embed_token_array(self.token_array(texts))

    def score_code_pairs(self, image_codes: np.ndarray, text_codes: np.ndarray) -> np.ndarray:
        """Scores (N,) float32 of row pairs of the encoders' outputs, (N, D) each."""
        image_codes = np.asarray(image_codes, dtype=np.float32)
        text_codes = np.asarray(text_codes, dtype=np.float32)
        if image_codes.shape != text_codes.shape or image_codes.ndim != 2:
            raise InputError(
                "pair scores need image and text codes of the same shape (N, D), got "
                f"{image_codes.shape} and {text_codes.shape}"
            )
        if self.scorer_session is None:  # an export without pair_scorer.onnx is a dot export
            return np.einsum("nd,nd->n", image_codes, text_codes)
        chunks = [
            self.scorer_session.run(
                [PAIR_OUTPUT],
                dict(
                    zip(
                        PAIR_INPUTS,
                        (image_codes[s : s + PAIR_BATCH], text_codes[s : s + PAIR_BATCH]),
                        strict=True,
                    )
                ),
            )[0]
            for s in range(0, len(image_codes), PAIR_BATCH)
        ]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def score_code_matrix(self, image_codes: np.ndarray, text_codes: np.ndarray) -> np.ndarray:
        """Scores (N_img, N_txt) float32 of every image code (N_img, D) with every text code
        (N_txt, D): a matrix product for a dot export, else every pair through the scorer."""
        image_codes = np.asarray(image_codes, dtype=np.float32)
        text_codes = np.asarray(text_codes, dtype=np.float32)
        if self.indexable:
            return image_codes @ text_codes.T
        n_img, n_txt = len(image_codes), len(text_codes)
        rows = max(1, PAIR_BATCH // max(1, n_txt))
        blocks = []
        for start in range(0, n_img, rows):
            block = image_codes[start : start + rows]
            pairs = self.score_code_pairs(
                np.repeat(block, n_txt, axis=0), np.tile(text_codes, (len(block), 1))
            )
            blocks.append(pairs.reshape(len(block), n_txt))
        return np.concatenate(blocks) if blocks else np.zeros((0, n_txt), np.float32)

    def score_pairs(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """The model's score (N,) of each (image, sentence) pair; errors name the bad input."""
        if len(images) != len(texts):
            raise InputError(f"pairs: {len(images)} images but {len(texts)} sentences")
        return self.score_code_pairs(self.embed_images(images), self.embed_texts(texts))

    def _run(
        self, session: ort.InferenceSession, name: str, inputs: np.ndarray, batch_size: int
    ) -> np.ndarray:
        chunks = [
            run_encoder(session, name, inputs[start : start + batch_size])
            for start in range(0, len(inputs), batch_size)
        ]
        return _concat(chunks, self.spec.embed_dim)


def check_verified(path: Path) -> None:
    """Raise :class:`InputError` unless ``parity.json`` records that every export check passed."""
    if not path.is_file():
        raise InputError(f"{path}: not found; only a verified export (imtext export) can be loaded")
    report = _read_json(path)
    if report.get("passed") is not True:
        failures = "; ".join(report.get("failures", [])) or "no result recorded"
        raise InputError(f"{path}: the export failed its checks ({failures}); do not serve it")


def check_signature(
    session: ort.InferenceSession, inputs: list[tuple[str, str]], output: str, path: Path
) -> None:
    """The session's inputs are exactly ``inputs`` (name, ONNX type) and its output ``output``."""
    found = [(i.name, i.type) for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if found != inputs or outputs != [output]:
        raise InputError(
            f"{path}: expected inputs {inputs} and output {output!r}, got inputs {found} and "
            f"outputs {outputs}"
        )


def _concat(chunks: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a JSON object")
    return values
