"""The modality classifier of the modality-invariant embedding (Liu et al., ACM TOMM 2019).

It reads an embedding of the shared space and outputs one logit: image (1) against sentence (0).
It is trained adversarially against the encoders through a gradient-reversal layer
(``imtext.losses.adversarial``, which documents why reversal and not alternating updates); it is
used only during training and never exported. The paper's layer sizes are UNVERIFIED (METHODS.md
section 2.2); the default is the proposed ``D -> 512 -> ReLU -> 1``.
"""

from __future__ import annotations

import torch
from torch import nn

from imtext.models.two_branch import score_head


class ModalityDiscriminator(nn.Module):
    """Embeddings (N, embed_dim), L2-normalised -> modality logits (N,), positive meaning image.

    ``hidden_dims`` gives the hidden layers, each ``Linear -> ReLU`` (``-> Dropout`` when
    ``dropout > 0``); ``()`` makes it a linear classifier. No BatchNorm: image and text batches
    pass through it separately, and per-batch statistics would tell it the whole batch's modality.
    """

    def __init__(
        self, embed_dim: int, hidden_dims: tuple[int, ...] = (512,), dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.net = score_head(embed_dim, tuple(hidden_dims), dropout)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb).squeeze(-1)
