"""One typed configuration per stage, read strictly from ``params.yaml``.

Each stage owns a frozen dataclass; ``params.yaml`` has one section per stage whose keys are exactly
that dataclass's fields. Unknown keys, missing keys and values of the wrong type are errors that name
the section and key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from imtext.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of the ``prepare`` stage (annotations + images -> prepared splits)."""

    #: Encoded caption length in tokens; ``null`` picks the format's default
    #: (32 for Karpathy JSON, 56 for CUHK-PEDES, as in the Dual-Path paper).
    max_len: int | None
    #: A word enters the vocabulary when it occurs at least this often in the *training* split.
    min_count: int
    #: Keep at most this many captions per image (COCO protocol: 5); ``null`` keeps all.
    captions_per_image: int | None
    #: Treat Karpathy ``restval`` images as training images (the usual 113,287-image COCO train set).
    use_restval: bool
    #: Images whose shorter side is longer are downscaled to it (the paper stores short side 256).
    image_short_side: int
    #: Encoding of the stored images: ``png`` (lossless) or ``jpeg`` (quality 95, for photographs).
    image_format: Literal["png", "jpeg"]
    #: Threads decoding and re-encoding images (Pillow releases the GIL while it does so).
    workers: int

    def __post_init__(self) -> None:
        for name in ("max_len", "min_count", "captions_per_image", "image_short_side", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be at least 1, got {value}")


Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the dual-path model, shared by ``pretrain`` and ``finetune``.

    The paper's model is ``resnet50`` at 224 px, a 2048-d head, 300-d word2vec words, text width 256
    and text blocks ``[3, 4, 6, 1]``; the defaults in ``params.yaml`` are a narrow variant that
    trains on two CPU cores in minutes.
    """

    #: torchvision ResNet of the image branch.
    image_backbone: Backbone
    #: Local file with torchvision ImageNet weights for the backbone (never downloaded); ``null``
    #: starts from random weights.
    image_weights: str | None
    #: Side of the square image crop fed to the network (paper: 224).
    image_size: int
    #: Width of both heads and of the shared embedding (paper: 2048).
    embed_dim: int
    #: Dropout before the shared instance classifier (paper: 0.5 COCO, 0.75 Flickr30k, 0.8 CUHK).
    dropout: float
    #: Word-vector width (paper: 300, word2vec).
    word_dim: int
    #: Local word2vec file (text or binary format) to initialise the word embedding; ``null``
    #: starts from random vectors.
    word2vec: str | None
    #: Channels of the first residual stage of the text CNN; later stages have 2x, 4x, 8x (paper 256).
    text_width: int
    #: Residual blocks in each of the four text-CNN stages (paper: [3, 4, 6, 1]).
    text_blocks: list[int]
    #: Whether the shared instance classifier has a bias (paper: yes, except COCO).
    classifier_bias: bool

    def __post_init__(self) -> None:
        for name in ("image_size", "embed_dim", "word_dim", "text_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if len(self.text_blocks) != 4 or min(self.text_blocks) < 1:
            raise ConfigError(
                f"text_blocks: need 4 stages of at least 1 block, got {self.text_blocks}"
            )


Ranking = Literal["paired_hard", "paired_random", "batch_sum", "batch_hardest"]
Optimizer = Literal["sgd", "adam"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training stage: ``pretrain`` (Stage I) or ``finetune`` (Stage II).

    Both stages run the same loop; Stage I is the loss weights ``[0, 1, 1]`` (instance loss only),
    Stage II adds the ranking loss and starts from Stage I's weights.
    """

    epochs: int
    #: Images per step, each with one random caption (paper: 32).
    batch_size: int
    optimizer: Optimizer
    #: Learning rate of the new layers (heads, text CNN, shared classifier).
    lr: float
    #: SGD momentum (Nesterov) or Adam's beta1.
    momentum: float
    weight_decay: float
    #: Epochs after which the learning rate is multiplied by ``lr_gamma``.
    lr_milestones: list[int]
    lr_gamma: float
    #: Learning-rate multiplier of the image CNN; 0 freezes it (the paper's Stage I).
    backbone_lr_mult: float
    #: Learning-rate multiplier of the word embedding (paper: 1e-3 over word2vec).
    word_lr_mult: float
    #: Weights of (ranking, image instance, text instance) losses (paper Stage II: 2, 1, 0.1).
    loss_weights: list[float]
    #: ``paired_hard``: the paper's one negative per anchor, the text mined from a candidate pool;
    #: ``paired_random``: the same with a random candidate (the paper's CUHK-PEDES setting);
    #: ``batch_sum`` / ``batch_hardest``: all in-batch negatives, summed (VSE) or hardest (VSE++).
    ranking: Ranking
    margin: float
    #: Random captions of other images scored to mine each hard negative (paper: 256).
    candidate_pool: int
    #: Horizontal flips (off when captions say left and right, as in the shapes dataset).
    hflip: bool
    #: Smallest fraction of the image side kept by the random crop (paper: 0.8).
    crop_scale: float
    #: Move each caption to a random position in its window (the paper's position shift).
    text_shift: bool
    #: Validate every this many epochs (recall on the val split; the best epoch is kept).
    eval_every: int
    #: Test-time features of the paper for validation: image + its horizontal flip, summed.
    val_flip_average: bool
    #: ... and each caption averaged over every position of its words in the window.
    val_shift_average: bool
    #: Stop after this many validations without a better val rsum; ``null`` never stops early.
    patience: int | None
    #: DataLoader worker processes.
    workers: int
    seed: int
    #: Mixed precision on CUDA (``bf16``/``fp16``); the CPU always runs fp32.
    precision: Precision

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "candidate_pool", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.ranking.startswith("paired") and self.batch_size % 2:
            raise ConfigError(
                f"batch_size: paired ranking splits the batch in halves; got {self.batch_size}, "
                "use an even number"
            )
        if len(self.loss_weights) != 3 or min(self.loss_weights) < 0:
            raise ConfigError(
                "loss_weights: need three non-negative weights (ranking, image instance, "
                f"text instance), got {self.loss_weights}"
            )
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"crop_scale: must be in (0, 1], got {self.crop_scale}")
        for name in ("lr", "backbone_lr_mult", "word_lr_mult", "weight_decay", "workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.lr_gamma <= 0 or self.margin < 0:
            raise ConfigError(
                f"lr_gamma must be positive and margin not negative, got {self.lr_gamma}, "
                f"{self.margin}"
            )
        if any(m < 1 for m in self.lr_milestones):
            raise ConfigError(f"lr_milestones: epochs count from 1, got {self.lr_milestones}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience: must be at least 1 or null, got {self.patience}")


Protocol = Literal["full", "coco_1k", "cuhk"]


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of the ``evaluate`` stage (a trained model -> retrieval metrics and a report)."""

    #: Prepared split to evaluate on.
    split: Literal["val", "test"]
    #: ``full`` (the whole split is the gallery: Flickr30k 1K, COCO 5K, built-in), ``coco_1k``
    #: (mean of 5 folds of 1,000 images) or ``cuhk`` (a caption hits every image of its person).
    protocol: Protocol
    #: Images per forward pass (captions use 4x as many).
    batch_size: int
    #: The paper's test-time features: image + its horizontal flip (wrong for left/right captions).
    flip_average: bool
    #: The paper's test-time features: a caption at every position of its window.
    shift_average: bool
    #: Sample text queries and sample image queries shown in the report (each).
    report_queries: int
    #: Results shown per query in the report.
    report_top_k: int
    #: Seed of the choice of report queries (the same model gives the same report).
    seed: int

    def __post_init__(self) -> None:
        for name in ("batch_size", "report_top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.report_queries < 0:
            raise ConfigError(f"report_queries: must not be negative, got {self.report_queries}")


@dataclass(frozen=True)
class ExportConfig:
    """Settings of the ``export`` stage (a trained model -> ONNX encoders, verified)."""

    #: ONNX opset of both encoders.
    opset: int
    #: Largest allowed |ONNX Runtime - PyTorch| over every embedding value of the parity batch.
    parity_tolerance: float
    #: Split whose recall is computed from ONNX and from PyTorch embeddings and compared.
    recall_split: Literal["val", "test"]
    #: Largest allowed difference in rsum (recall points) between ONNX and PyTorch embeddings.
    recall_tolerance: float
    #: Also write INT8 dynamically quantized encoders and measure their recall.
    quantize: bool

    def __post_init__(self) -> None:
        if self.opset < 7:
            raise ConfigError(f"opset: must be at least 7, got {self.opset}")
        for name in ("parity_tolerance", "recall_tolerance"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")


@dataclass(frozen=True)
class RegisterConfig:
    """Settings of ``register`` and ``promote`` (MLflow tracking, registry and the serving alias)."""

    #: MLflow tracking URI; ``null`` uses $MLFLOW_TRACKING_URI, else the embedded default
    #: ``sqlite:///mlflow.db`` with artifacts in ``./mlartifacts``.
    tracking_uri: str | None
    #: MLflow experiment of the runs.
    experiment: str
    #: Registered model name.
    model_name: str
    #: Alias that serving loads (``models:/<model_name>@<alias>``).
    alias: str
    #: Metric of ``evaluate``'s metrics.json that decides promotion (higher is better).
    gate_metric: str
    #: A candidate must beat the current champion by more than this to be promoted.
    gate_min_delta: float
    #: Attempts at each call to the tracking server or object store before giving up.
    retries: int
    #: Seconds before the first retry; doubled after each.
    retry_backoff_s: float

    def __post_init__(self) -> None:
        if self.retries < 1:
            raise ConfigError(f"retries: must be at least 1, got {self.retries}")
        if self.gate_min_delta < 0 or self.retry_backoff_s < 0:
            raise ConfigError(
                "gate_min_delta and retry_backoff_s must not be negative, got "
                f"{self.gate_min_delta}, {self.retry_backoff_s}"
            )
        for name in ("experiment", "model_name", "alias", "gate_metric"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name}: must not be empty")


STAGE_CONFIGS: dict[str, type] = {
    "prepare": PrepareConfig,
    "model": ModelConfig,
    "pretrain": TrainConfig,
    "finetune": TrainConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "register": RegisterConfig,
}


def read_params(path: str | Path) -> dict[str, Any]:
    """Read ``params.yaml`` into a dict of sections, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: parameter file not found; pass --params with the path to params.yaml"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        params = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections at the top level")
    return params


def config_from_dict(cls: type[T], values: Any, where: str) -> T:
    """Build the frozen dataclass ``cls`` from ``values``, rejecting unknown, missing or mistyped keys.

    ``where`` names the source in messages, e.g. ``"params.yaml: prepare"``.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; valid keys are {', '.join(sorted(fields))}"
        )
    missing = [name for name in fields if name not in values]
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}; add it to the section")
    hints = typing.get_type_hints(cls)
    checked = {name: _check_type(values[name], hints[name], f"{where}.{name}") for name in fields}
    try:
        return cls(**checked)
    except ConfigError as exc:  # a value of the right type but out of range
        raise ConfigError(f"{where}.{exc}") from None


def load_stage_config(stage: str, params_path: str | Path) -> Any:
    """Load the typed config of ``stage`` from its section of ``params_path``."""
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_CONFIGS)}")
    return stage_config_from_params(stage, read_params(params_path), str(params_path))


def apply_overrides(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``params`` with ``section.key=value`` overrides applied (values parsed as YAML).

    The result is a new dict; unknown sections and keys are errors, so a typo never passes silently.
    """
    result = {section: dict(values) for section, values in params.items()}
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(
                f"override {item!r}: expected section.key=value, e.g. finetune.epochs=2"
            )
        if section not in result:
            raise ConfigError(f"override {item!r}: no section {section!r} in the parameters")
        if key not in result[section]:
            raise ConfigError(
                f"override {item!r}: no key {key!r} in section {section!r}; valid keys are "
                f"{', '.join(sorted(result[section]))}"
            )
        try:
            result[section][key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
    return result


def stage_config_from_params(stage: str, params: dict[str, Any], where: str = "params") -> Any:
    """The typed config of ``stage`` from an already-read parameter dict (e.g. after overrides)."""
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_CONFIGS)}")
    if stage not in params:
        raise ConfigError(f"{where}: missing section {stage!r}")
    return config_from_dict(STAGE_CONFIGS[stage], params[stage], f"{where}: {stage}")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-JSON form of a stage config (for checkpoints, metadata and MLflow params)."""
    return dataclasses.asdict(cfg)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not valid")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return origin(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a bug in a dataclass
