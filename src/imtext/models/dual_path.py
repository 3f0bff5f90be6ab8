"""The dual-path model: both branches, L2-normalised embeddings and one shared instance classifier.

The embedding of either modality is its head's post-ReLU output, L2-normalised: what the paper's
ranking loss compares. The shared classifier sees the same features after dropout, so its weights
pull an image and its captions towards one class vector.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from imtext.config import ModelConfig
from imtext.models.image import ImageBranch
from imtext.models.text import TextCNN


class DualPathOutput(NamedTuple):
    image_emb: torch.Tensor  # (N, D), L2-normalised
    text_emb: torch.Tensor  # (M, D), L2-normalised
    image_logits: torch.Tensor  # (N, C)
    text_logits: torch.Tensor  # (M, C)


class DualPathModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, n_classes: int) -> None:
        super().__init__()
        self.image = ImageBranch(cfg.image_backbone, cfg.embed_dim, cfg.image_weights)
        self.text = TextCNN(
            vocab_size, cfg.word_dim, cfg.text_width, cfg.text_blocks, cfg.embed_dim
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.embed_dim, n_classes, bias=cfg.classifier_bias)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W), normalised as in preprocessing -> (N, D), L2-normalised."""
        return F.normalize(self.image(images), dim=1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word ids (M, L) int64 -> (M, D), L2-normalised."""
        return F.normalize(self.text(tokens), dim=1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> DualPathOutput:
        """One training step's forward pass (DDP only synchronises what ``forward`` computes)."""
        image_feat, text_feat = self.image(images), self.text(tokens)
        return DualPathOutput(
            F.normalize(image_feat, dim=1),
            F.normalize(text_feat, dim=1),
            self.classifier(self.dropout(image_feat)),
            self.classifier(self.dropout(text_feat)),
        )


def build_model(cfg: ModelConfig, vocab_size: int, n_classes: int) -> DualPathModel:
    return DualPathModel(cfg, vocab_size, n_classes)
