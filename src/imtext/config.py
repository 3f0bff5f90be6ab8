"""One typed configuration per stage, read strictly from ``params.yaml``.

Each stage owns a frozen dataclass; ``params.yaml`` has one section per stage whose keys are exactly
that dataclass's fields. Unknown keys, missing keys and values of the wrong type are errors that name
the section and key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
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


Method = Literal["dual_path", "two_branch", "similarity"]

Stem = Literal["standard", "no_maxpool", "cifar"]

Embedding = Literal["pre_relu", "post_relu"]

TextEncoder = Literal["cnn", "gru"]

Classifier = Literal["linear", "cosine"]

Schedule = Literal["step", "cosine"]

Augment = Literal["resized_crop", "shift"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the model, shared by ``pretrain`` and ``finetune``.

    The paper's model is ``resnet50`` at 224 px, a 2048-d head, 300-d word2vec words, text width 256
    and text blocks ``[3, 4, 6, 1]``; the defaults in ``params.yaml`` are a narrow variant that
    trains on two CPU cores in minutes.

    ``method`` picks what sits on the dual-path encoders (the image ResNet + head and the text CNN
    + head, whose outputs are ``embed_dim`` wide): nothing (``dual_path``, the embeddings are the
    heads' outputs), the two-branch embedding network (``two_branch``, Wang et al.) or the two-branch
    similarity network (``similarity``, Wang et al., which scores pairs and has no embedding).
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
    #: ``dual_path`` (the paper's model), ``two_branch`` (Wang et al.'s embedding network on the
    #: heads' outputs) or ``similarity`` (its similarity network: pair scores, no embedding).
    method: Method = "dual_path"
    #: Hidden width of each two-branch branch, ``embed_dim -> branch_hidden -> embed_dim``
    #: (official: 2048 hidden, 512 out); unused by ``dual_path``.
    branch_hidden: int = 512
    #: Hidden layers of the similarity network between the element-wise product and the score.
    fusion_dims: list[int] = dataclasses.field(default_factory=lambda: [256])
    #: Hidden layers of the modality discriminator on the shared embedding (the modality-invariant
    #: embedding);
    #: ``[]`` builds none.
    discriminator_dims: list[int] = dataclasses.field(default_factory=list)
    #: BatchNorm momentum of the two-branch branches (PyTorch's convention; 0.9 reproduces the
    #: official TF code, METHODS.md section 3.1).
    bn_momentum: float = 0.1
    # The fields below came with the recipe that learns the built-in task (docs/training.md); their
    # defaults rebuild the models written before them.
    #: The image ResNet's stem: torchvision's (``standard``), without its max-pool
    #: (``no_maxpool``), or a 3x3 stride-1 first conv without max-pool (``cifar``).
    image_stem: Stem = "standard"
    #: The embedding is each head's last BatchNorm output before its ReLU (``pre_relu``, the
    #: paper's test feature) or after it (``post_relu``).
    embedding: Embedding = "post_relu"
    #: The text branch: the paper's deep text CNN (``cnn``) or VSE++'s GRU (``gru``; one
    #: bidirectional layer of ``4 * text_width`` units each way, ``text_blocks`` unused).
    text_encoder: TextEncoder = "cnn"
    #: Stride of the first block of each text-CNN stage (paper: [1, 2, 2, 1]); [1, 1, 1, 1]
    #: keeps every word position to the max-pool.
    text_strides: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 2, 1])
    #: The shared instance classifier: the paper's linear layer (``linear``) or ``cosine``
    #: (``classifier_scale * cos``, no bias; METHODS.md section 4.2).
    classifier: Classifier = "linear"
    #: ``cosine``: the scale of the cosines (the softmax's inverse temperature).
    classifier_scale: float = 32.0

    def __post_init__(self) -> None:
        for name in ("image_size", "embed_dim", "word_dim", "text_width", "branch_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.classifier == "cosine" and self.classifier_bias:
            raise ConfigError(
                "classifier_bias: the cosine classifier has no bias; set classifier_bias false "
                "or classifier linear"
            )
        if self.classifier_scale <= 0:
            raise ConfigError(f"classifier_scale: must be positive, got {self.classifier_scale}")
        if len(self.text_strides) != 4 or not set(self.text_strides) <= {1, 2}:
            raise ConfigError(f"text_strides: need 4 strides of 1 or 2, got {self.text_strides}")
        if len(self.text_blocks) != 4 or min(self.text_blocks) < 1:
            raise ConfigError(
                f"text_blocks: need 4 stages of at least 1 block, got {self.text_blocks}"
            )
        for name in ("fusion_dims", "discriminator_dims"):
            if any(width < 1 for width in getattr(self, name)):
                raise ConfigError(
                    f"{name}: layer widths must be at least 1, got {getattr(self, name)}"
                )
        if not 0 <= self.bn_momentum <= 1:
            raise ConfigError(f"bn_momentum: must be in [0, 1], got {self.bn_momentum}")
        if self.discriminator_dims and self.method == "similarity":
            raise ConfigError(
                "discriminator_dims: the similarity network has no shared embedding for a modality "
                "discriminator to read; use [] or method two_branch / dual_path"
            )


Ranking = Literal[
    "paired_hard", "paired_random", "batch_sum", "batch_hardest", "infonce", "topk", "logistic"
]
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
    #: ``batch_sum`` / ``batch_hardest``: all in-batch negatives, summed (VSE) or hardest (VSE++,
    #: with ``loss_weights [1, 0, 0]``); ``infonce``: in-batch InfoNCE with a learned temperature;
    #: ``topk``: the two-branch network's top-K bidirectional ranking (+ neighbourhood term);
    #: ``logistic``: the similarity network's logistic loss on positive and sampled negative pairs.
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
    #: DataLoader worker processes. Training on the CPU with the split's resized images cached
    #: (``shift`` augmentation), items load in the training process instead, drawing exactly
    #: what one worker would (``imtext.train.batches.epoch_loader``).
    workers: int
    seed: int
    #: Mixed precision of the forward pass: ``bf16``/``fp16`` on CUDA, ``bf16`` also on a CPU
    #: with native bf16 (AVX512-BF16 or AMX; others run fp32), ``fp32`` everywhere.
    precision: Precision
    # The fields below serve the methods beside the dual-path one; their defaults leave the dual-path
    # training exactly as it was, and files written before they existed read as those defaults.
    #: ``topk``: violations kept per anchor (official: 10).
    top_k: int = 10
    #: ``topk``: weights of the (sentence -> image, image -> sentence) terms (official: 1.5, 1).
    direction_weights: list[float] = dataclasses.field(default_factory=lambda: [1.5, 1.0])
    #: ``topk``: weight of the neighbourhood constraint between sentences of one image (official
    #: 0.05; the PyTorch port 0.1); it needs ``sentences_per_image`` > 1 to have positives.
    neighbour_weight: float = 0.05
    #: Captions of each image in a batch: 1 is one random caption per image; more is the two-branch
    #: network's neighbourhood sampling (``batch_size`` images, up to this many captions each).
    sentences_per_image: int = 1
    #: ``logistic``: negative pairs sampled in the batch for each positive pair.
    negatives_per_positive: int = 3
    #: Weight of the modality-adversarial loss (the modality-invariant embedding; needs ``model.discriminator_dims``);
    #: 0 switches it off.
    adversarial_weight: float = 0.0
    #: Largest gradient-reversal coefficient; it ramps up from 0 after the warm-up epochs.
    adversarial_lambda: float = 1.0
    #: Epochs at the start of the stage with a reversal coefficient of 0: the discriminator learns
    #: while the encoders get none of its gradient (the multi-stage procedure's D warm-up).
    adversarial_warmup_epochs: int = 0
    #: ``infonce``: the learned temperature's starting value (CLIP: 0.07).
    init_temperature: float = 0.07
    # The fields below came with the recipe that learns the built-in task; their defaults are the
    # schedule every earlier run used.
    #: ``step``: ``lr`` times ``lr_gamma`` at each of ``lr_milestones``, set per epoch; ``cosine``:
    #: per step, a linear warm-up to ``lr`` over ``warmup_epochs``, then a cosine to 0 at the end.
    lr_schedule: Schedule = "step"
    #: Epochs (may be fractional) of linear warm-up from 0 at the start of the stage.
    warmup_epochs: float = 0.0
    #: Image augmentation: ``resized_crop`` (the paper's random resized crop, ``crop_scale``) or
    #: ``shift`` (the whole image moved by up to 1/16 of its side; sizes and positions kept).
    image_augment: Augment = "resized_crop"

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(
                f"epochs: must be at least 0 (0 trains nothing and passes the initial model on), "
                f"got {self.epochs}"
            )
        for name in ("batch_size", "candidate_pool", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.ranking.startswith("paired") and self.batch_size % 2:
            raise ConfigError(
                f"batch_size: paired ranking splits the batch in halves; got {self.batch_size}, "
                "use an even number"
            )
        self._check_method_fields()
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
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(
                f"warmup_epochs: must be in [0, epochs] = [0, {self.epochs}], got "
                f"{self.warmup_epochs}"
            )
        if self.lr_schedule == "cosine" and self.lr_milestones:
            raise ConfigError(
                f"lr_milestones: the cosine schedule has no milestones, got {self.lr_milestones}; "
                "set lr_milestones: [] or lr_schedule: step"
            )

    def _check_method_fields(self) -> None:
        for name in ("top_k", "sentences_per_image", "negatives_per_positive"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if len(self.direction_weights) != 2 or min(self.direction_weights) < 0:
            raise ConfigError(
                "direction_weights: need two non-negative weights (sentence -> image, image -> "
                f"sentence), got {self.direction_weights}"
            )
        for name in ("neighbour_weight", "adversarial_weight", "adversarial_lambda"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")
        warmup = self.adversarial_warmup_epochs
        if warmup < 0 or (warmup and (warmup >= self.epochs or not self.adversarial_weight)):
            raise ConfigError(
                f"adversarial_warmup_epochs: must be in [0, epochs) = [0, {self.epochs}) and needs "
                f"adversarial_weight > 0, got {self.adversarial_warmup_epochs}"
            )
        if not 0 < self.init_temperature <= 1:
            raise ConfigError(f"init_temperature: must be in (0, 1], got {self.init_temperature}")
        if self.sentences_per_image > 1 and self.ranking.startswith("paired"):
            raise ConfigError(
                f"sentences_per_image: {self.ranking!r} ranking pairs one caption with each image; "
                "use 1, or a batch ranking (batch_sum, batch_hardest, infonce, topk, logistic)"
            )
        if self.ranking == "logistic" and self.negatives_per_positive >= self.batch_size:
            raise ConfigError(
                f"negatives_per_positive: the logistic loss samples negatives among the other "
                f"{self.batch_size - 1} images of a batch; got {self.negatives_per_positive}"
            )


def check_method(model: ModelConfig, train: TrainConfig, where: str = "params") -> None:
    """Raise :class:`ConfigError`, naming the key, when the stage's losses cannot train ``model``.

    The two sections are valid on their own; this checks them together (``train_stage`` calls it):
    the similarity network's pair scores are trained by the logistic loss and nothing else (with a
    first weight of 0, as in Stage I, only its encoders learn, from the instance loss), the
    two-branch and dual-path models have embeddings for every other ranking loss, and the
    adversarial loss needs a discriminator.
    """
    ranks = train.loss_weights[0] > 0
    if model.method == "similarity" and ranks and train.ranking != "logistic":
        raise ConfigError(
            f"{where}: ranking: model.method 'similarity' scores pairs and has no embedding to "
            f"rank; use ranking 'logistic' (got {train.ranking!r})"
        )
    if train.ranking == "logistic" and model.method != "similarity":
        raise ConfigError(
            f"{where}: ranking: 'logistic' trains the pair scores of model.method 'similarity', "
            f"but the model is {model.method!r}"
        )
    if train.adversarial_weight > 0 and not model.discriminator_dims:
        raise ConfigError(
            f"{where}: adversarial_weight: {train.adversarial_weight} needs a modality "
            "discriminator; set model.discriminator_dims (e.g. [512])"
        )


#: Values of the fields added for the other methods that reproduce the files written before them.
MODEL_METHOD_DEFAULTS = {
    f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
    for f in dataclasses.fields(ModelConfig)
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
}
TRAIN_METHOD_DEFAULTS = {
    f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
    for f in dataclasses.fields(TrainConfig)
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
}


def with_method_defaults(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A stored config (a model file's ``model_config`` or ``train_config``) completed with the
    method fields it predates; used for files only, never for ``params.yaml`` (which must name
    every key)."""
    return {**values, **{k: v for k, v in defaults.items() if k not in values}}


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


Quantize = Literal["static", "dynamic", "none"]
Exporter = Literal["torchscript", "dynamo"]


@dataclass(frozen=True)
class ExportConfig:
    """Settings of the ``export`` stage (a trained model -> ONNX encoders, verified)."""

    #: ``torch.onnx.export``'s exporter: ``torchscript`` (``dynamo=False``: 12-19x faster to
    #: export, the same checks passed; deprecated by PyTorch) or ``dynamo`` (torch.export). bench_export.py
    #: compares them.
    exporter: Exporter
    #: ONNX opset of both encoders.
    opset: int
    #: Largest allowed |ONNX Runtime - PyTorch| over every embedding value of the parity batch.
    parity_tolerance: float
    #: Split whose recall is computed from ONNX and from PyTorch embeddings and compared.
    recall_split: Literal["val", "test"]
    #: Largest allowed difference in rsum (recall points) between ONNX and PyTorch embeddings.
    recall_tolerance: float
    #: INT8 encoders next to the float32 ones, their recall measured: ``static`` (QDQ, weights
    #: per channel, activation ranges calibrated on ``calibration_images`` training images and
    #: captions), ``dynamic`` (activation ranges computed at every call: slower than float32 on
    #: the CPU, bench/README.md) or ``none``.
    quantize: Quantize
    #: Training images (and as many captions), spread over the split, whose activations set the
    #: ranges of ``static`` (every one when the split holds fewer).
    calibration_images: int

    def __post_init__(self) -> None:
        if self.calibration_images < 1:
            raise ConfigError(
                f"calibration_images: must be at least 1, got {self.calibration_images}"
            )
        if self.opset < 18:
            raise ConfigError(
                f"opset: must be at least 18 (the oldest torch.onnx's exporter writes), got "
                f"{self.opset}"
            )
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


IndexKind = Literal["exact", "ivf", "hnsw"]


@dataclass(frozen=True)
class ServeConfig:
    """Settings of ``imtext serve`` (the search service over a gallery); its flags override a few."""

    #: Address the service listens on; 127.0.0.1 keeps it off the network.
    host: str
    port: int
    #: ``exact`` (FAISS flat inner product), ``ivf`` (inverted lists, flat within a list) or
    #: ``hnsw`` (graph); the approximate two are for galleries of 100K and more (bench/README.md).
    index: IndexKind
    #: Inverted lists of ``ivf``; ``null``: sqrt(gallery size), at most gallery size / 39
    #: (FAISS wants 39 training points per list).
    ivf_lists: int | None
    #: Lists scanned per query by ``ivf``: the recall / latency trade-off.
    ivf_probe: int
    #: Neighbours per node of ``hnsw`` (its M).
    hnsw_neighbours: int
    #: Candidate list while building / searching ``hnsw``.
    hnsw_ef_construction: int
    hnsw_ef_search: int
    #: Seconds between checks of the alias for a new version (0: never check).
    poll_seconds: float
    #: Results per query when the request gives no ``k``, and the largest ``k`` accepted.
    default_k: int
    max_k: int
    #: Longest query ``q`` accepted, in characters.
    max_query_chars: int
    #: Largest request body (an image, a v2 tensor), in bytes; checked while reading.
    max_body_bytes: int
    #: Largest image (width x height, read from its header before decoding) accepted.
    max_image_pixels: int
    #: Largest batch (rows) of one v2 infer request.
    max_batch: int
    #: ONNX Runtime intra-op and FAISS threads; ``null``: their defaults (one per core).
    threads: int | None
    #: Where downloaded models and built indexes are kept, relative to the working directory.
    cache_dir: str

    def __post_init__(self) -> None:
        for name in (
            "port", "ivf_probe", "hnsw_neighbours", "hnsw_ef_construction", "hnsw_ef_search",
            "default_k", "max_k", "max_query_chars", "max_body_bytes", "max_image_pixels",
            "max_batch",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("ivf_lists", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1 or null, got {getattr(self, name)}")
        if self.port > 65535:
            raise ConfigError(f"port: must be at most 65535, got {self.port}")
        if self.poll_seconds < 0:
            raise ConfigError(f"poll_seconds: must not be negative, got {self.poll_seconds}")
        if self.default_k > self.max_k:
            raise ConfigError(
                f"default_k: must be at most max_k ({self.max_k}), got {self.default_k}"
            )
        if not self.cache_dir.strip():
            raise ConfigError("cache_dir: must not be empty")


STAGE_CONFIGS: dict[str, type] = {
    "prepare": PrepareConfig,
    "model": ModelConfig,
    "pretrain": TrainConfig,
    "finetune": TrainConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "register": RegisterConfig,
    "serve": ServeConfig,
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
        # YAML reads .nan and .inf as floats; no setting means either, and a NaN would slip
        # through every range check (all comparisons with it are false).
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a bug in a dataclass
