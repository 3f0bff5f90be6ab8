"""The dual-path model: both branches, L2-normalised embeddings and one shared instance classifier.

The embedding of either modality is its head's output (the last BatchNorm's, before or after its
ReLU: ``model.embedding``), L2-normalised: what the paper's ranking loss compares. The shared classifier sees the same features after dropout, so its weights
pull an image and its captions towards one class vector.

Two optional parts serve the other methods and are absent (no parameters, no random draws, the
plain :class:`DualPathOutput`) by default: a modality discriminator on the embeddings
(``model.discriminator_dims``, the modality-invariant embedding) and a learned InfoNCE temperature (``logit_scale``, which
the training loop attaches). Wang et al.'s two-branch models extend this class
(``imtext.models.methods``), and ``imtext.models.build_model`` builds whichever ``model.method``
names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from imtext.config import ModelConfig
from imtext.models.discriminator import ModalityDiscriminator
from imtext.models.image import ImageBranch
from imtext.models.text import TextCNN, TextGRU

#: What sits between an embedding and the discriminator: the training loop passes a gradient
#: reversal (``imtext.losses.grad_reverse``, which this layer may not import).
Reverse = Callable[[torch.Tensor], torch.Tensor]


class DualPathOutput(NamedTuple):
    image_emb: torch.Tensor  # (N, D), L2-normalised
    text_emb: torch.Tensor  # (M, D), L2-normalised
    image_logits: torch.Tensor  # (N, C)
    text_logits: torch.Tensor  # (M, C)


class MethodOutput(NamedTuple):
    """A training forward pass of a model with any of the optional parts.

    ``image_emb`` (N, E) and ``text_emb`` (M, E) are L2-normalised (the two-branch models: the
    branches' outputs); the logits are the shared instance classifier's on the encoders' features;
    the rest is ``None`` unless the part is there: the discriminator's modality logits (N,) and
    (M,), the learned 0-d InfoNCE log-scale, the similarity network's pair scores (P,).
    """

    image_emb: torch.Tensor
    text_emb: torch.Tensor
    image_logits: torch.Tensor
    text_logits: torch.Tensor
    image_modality: torch.Tensor | None = None
    text_modality: torch.Tensor | None = None
    log_scale: torch.Tensor | None = None
    pair_scores: torch.Tensor | None = None


class CosineClassifier(nn.Module):
    """The shared instance classifier as ``scale * cos(feature, w_k)``: features and class
    vectors L2-normalised, no bias (``model.classifier: cosine``).

    METHODS.md section 4.2 suggests it over raw logits for many classes: every class vector moves
    on the unit sphere where the embeddings live, so the few updates each of 4,000 classes gets in
    a short schedule are not spent on its norm. ``weight`` (C, D) has the plain linear layer's
    name and shape.
    """

    def __init__(self, in_dim: int, n_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, in_dim))
        nn.init.normal_(self.weight, std=in_dim**-0.5)
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T


def build_classifier(cfg: ModelConfig, n_classes: int) -> nn.Module:
    """The shared instance classifier of ``cfg.classifier``: the paper's linear layer or cosine."""
    if cfg.classifier == "cosine":
        return CosineClassifier(cfg.embed_dim, n_classes, cfg.classifier_scale)
    return nn.Linear(cfg.embed_dim, n_classes, bias=cfg.classifier_bias)


def _detach(x: torch.Tensor) -> torch.Tensor:
    return x.detach()


class DualPathModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, n_classes: int) -> None:
        super().__init__()
        final_relu = cfg.embedding == "post_relu"
        self.image = ImageBranch(
            cfg.image_backbone, cfg.embed_dim, cfg.image_weights, cfg.image_stem, final_relu
        )
        self.text = build_text_encoder(cfg, vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = build_classifier(cfg, n_classes)
        # Built after everything else, so that the parts above draw the same initial weights
        # with or without it; None registers nothing (the state_dict stays the paper model's).
        self.discriminator: nn.Module | None = None
        if cfg.discriminator_dims:
            self.discriminator = ModalityDiscriminator(cfg.embed_dim, tuple(cfg.discriminator_dims))
        #: A ``LogitScale`` module when the loop trains with InfoNCE, else None.
        self.logit_scale: nn.Module | None = None

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W), normalised as in preprocessing -> (N, D), L2-normalised."""
        return F.normalize(self.image(images), dim=1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word ids (M, L) int64 -> (M, D), L2-normalised."""
        return F.normalize(self.text(tokens), dim=1)

    # What the export serves: each side's output ("codes") and the score of a pair of them. For
    # an embedding model the codes are the embeddings and the score is their dot product; the
    # similarity network overrides all three (imtext.models.methods.SimilarityModel).
    def image_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> (N, D): :meth:`encode_image`."""
        return self.encode_image(images)

    def text_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word ids (M, L) -> (M, D): :meth:`encode_text`."""
        return self.encode_text(tokens)

    def score_codes(self, image_codes: torch.Tensor, text_codes: torch.Tensor) -> torch.Tensor:
        """Scores (...) of code pairs of one shape (..., D) (broadcasting): the dot product."""
        return (image_codes * text_codes).sum(dim=-1)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, reverse: Reverse | None = None
    ) -> DualPathOutput | MethodOutput:
        """One training step's forward pass (DDP only synchronises what ``forward`` computes).

        Images (N, 3, H, W) and word ids (M, L). Without a discriminator or a logit scale this is
        the paper's :class:`DualPathOutput`; with either, a :class:`MethodOutput` whose modality
        logits read ``reverse(embedding)`` (default: detached, so the encoders get nothing).
        """
        image_feat, text_feat = self.image(images), self.text(tokens)
        out = DualPathOutput(
            F.normalize(image_feat, dim=1),
            F.normalize(text_feat, dim=1),
            self.classifier(self.dropout(image_feat)),
            self.classifier(self.dropout(text_feat)),
        )
        if self.discriminator is None and self.logit_scale is None:
            return out
        return self.extras(*out, reverse=reverse)

    def extras(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        image_logits: torch.Tensor,
        text_logits: torch.Tensor,
        reverse: Reverse | None = None,
        pair_scores: torch.Tensor | None = None,
    ) -> MethodOutput:
        """A :class:`MethodOutput` of the given tensors plus the optional parts' outputs."""
        image_modality = text_modality = None
        if self.discriminator is not None:
            reverse = reverse or _detach
            image_modality = self.discriminator(reverse(image_emb))
            text_modality = self.discriminator(reverse(text_emb))
        log_scale = self.logit_scale() if self.logit_scale is not None else None
        return MethodOutput(
            image_emb, text_emb, image_logits, text_logits,
            image_modality, text_modality, log_scale, pair_scores,
        )  # fmt: skip


def build_text_encoder(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """The text branch of ``cfg.text_encoder``: the paper's deep text CNN or VSE++'s GRU."""
    final_relu = cfg.embedding == "post_relu"
    if cfg.text_encoder == "gru":
        return TextGRU(vocab_size, cfg.word_dim, cfg.text_width, cfg.embed_dim, final_relu)
    return TextCNN(
        vocab_size,
        cfg.word_dim,
        cfg.text_width,
        cfg.text_blocks,
        cfg.embed_dim,
        final_relu,
        cfg.text_strides,
    )
