"""Two-branch networks over image and text *features* (Wang et al., TPAMI 2019).

Both networks read precomputed feature vectors (an image CNN's pooled output, a sentence vector),
not pixels or words: which encoders produce them is the caller's choice.

- :class:`TwoBranchEmbedding`, the embedding network ([TB:retrieval_model.py]): per modality
  ``Linear -> BatchNorm -> ReLU -> Dropout -> Linear -> L2 normalise``, weights not shared;
  retrieval compares the embeddings (``imtext.losses.neighbourhood`` trains them).
- :class:`SimilarityNetwork`: the same two branches, fused by an element-wise product, then fully
  connected layers to one score per pair (``imtext.losses.similarity`` trains it). It has no
  embedding to index: retrieval scores every image-sentence pair (:meth:`~SimilarityNetwork.score_matrix`).

Deviation from the official code: BatchNorm keeps PyTorch's running-statistics momentum 0.1. The
official TF code passes ``momentum=0.1`` to ``tf.layers.batch_normalization``, where it is the decay
of the old statistics (PyTorch momentum 0.9: the running statistics are nearly the last batch's),
which reads as a slip; ``bn_momentum=0.9`` reproduces it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def branch(
    in_dim: int, hidden_dim: int, out_dim: int, dropout: float, bn_momentum: float = 0.1
) -> nn.Sequential:
    """One branch: ``Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear`` (not normalised).

    The official sizes are ``hidden_dim`` 2048 and ``out_dim`` 512, dropout 0.5 (TF's default).
    """
    for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim, eps=1e-5, momentum=bn_momentum),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, out_dim),
    )


def score_head(in_dim: int, hidden_dims: tuple[int, ...], dropout: float = 0.0) -> nn.Sequential:
    """``hidden_dims`` x (Linear -> ReLU [-> Dropout when ``dropout > 0``]), then Linear to 1."""
    if in_dim < 1 or any(dim < 1 for dim in hidden_dims):
        raise ValueError(f"layer widths must be positive, got {in_dim} and {hidden_dims}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    width = in_dim
    for dim in hidden_dims:
        layers += [nn.Linear(width, dim), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = dim
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class TwoBranchOutput(NamedTuple):
    image_emb: torch.Tensor  # (N, E), L2-normalised
    text_emb: torch.Tensor  # (M, E), L2-normalised


class _TwoBranches(nn.Module):
    """An image and a text :func:`branch` (weights not shared), each output L2-normalised."""

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        hidden_dim: int,
        embed_dim: int,
        dropout: float,
        bn_momentum: float,
    ) -> None:
        super().__init__()
        self.image = branch(image_dim, hidden_dim, embed_dim, dropout, bn_momentum)
        self.text = branch(text_dim, hidden_dim, embed_dim, dropout, bn_momentum)

    def encode_image(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, image_dim) -> (N, embed_dim), L2-normalised."""
        return F.normalize(self.image(feats), dim=1)

    def encode_text(self, feats: torch.Tensor) -> torch.Tensor:
        """(M, text_dim) -> (M, embed_dim), L2-normalised."""
        return F.normalize(self.text(feats), dim=1)


class TwoBranchEmbedding(_TwoBranches):
    """The embedding network: image features (N, image_dim) and sentence features
    (M, text_dim) -> embeddings (N, embed_dim) and (M, embed_dim), each row L2-normalised."""

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        hidden_dim: int = 2048,
        embed_dim: int = 512,
        dropout: float = 0.5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__(image_dim, text_dim, hidden_dim, embed_dim, dropout, bn_momentum)

    def forward(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> TwoBranchOutput:
        """N images and M sentences need not pair up (neighbourhood batches have M = k * N)."""
        return TwoBranchOutput(self.encode_image(image_feats), self.encode_text(text_feats))


class SimilarityNetwork(_TwoBranches):
    """The similarity network: one score per (image, sentence) pair.

    Each modality goes through its own :func:`branch` and is L2-normalised; the pair's fused vector
    is the element-wise product (E,), so its sum is the pair's cosine similarity and the network
    can start from, and improve on, what an embedding network would score. ``fusion_dims`` hidden
    layers (``Linear -> ReLU`` each, :func:`score_head`) then map it to one logit, trained with a
    logistic loss. The paper's fusion widths are UNVERIFIED (METHODS.md section 3.2); one 512-wide
    layer is our default.
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        hidden_dim: int = 2048,
        embed_dim: int = 512,
        fusion_dims: tuple[int, ...] = (512,),
        dropout: float = 0.5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__(image_dim, text_dim, hidden_dim, embed_dim, dropout, bn_momentum)
        self.fusion = score_head(embed_dim, tuple(fusion_dims))

    def fuse(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Branch outputs of the same shape (..., E) -> scores (...): product, then the MLP."""
        return self.fusion(image_emb * text_emb).squeeze(-1)

    def forward(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Pairs (image_feats[i], text_feats[i]): (P, image_dim), (P, text_dim) -> scores (P,).

        Raw logits (a pair matches with probability ``sigmoid(score)``). Positive and negative pairs
        are just rows: a negative pair repeats an image row next to another image's sentence.
        """
        if image_feats.shape[0] != text_feats.shape[0]:
            raise ValueError(
                "the similarity network scores pairs: image_feats and text_feats need the same "
                f"number of rows, got {image_feats.shape[0]} and {text_feats.shape[0]}"
            )
        return self.fuse(self.encode_image(image_feats), self.encode_text(text_feats))

    def score_matrix(
        self, image_feats: torch.Tensor, text_feats: torch.Tensor, chunk_pairs: int = 1 << 16
    ) -> torch.Tensor:
        """Scores (N, M) of every image (N, image_dim) with every sentence (M, text_dim).

        Each branch runs once over its rows; the fusion runs on blocks of about ``chunk_pairs``
        pairs (a block holds ``chunk_pairs * embed_dim`` products: 128 MiB at the defaults, 512-d
        float32). Call it in eval mode: in train mode BatchNorm would use this call's statistics
        and dropout would draw.
        """
        images, texts = self.encode_image(image_feats), self.encode_text(text_feats)
        return self.fuse_matrix(images, texts, chunk_pairs)

    def fuse_matrix(
        self, images: torch.Tensor, texts: torch.Tensor, chunk_pairs: int = 1 << 16
    ) -> torch.Tensor:
        """Scores (N, M) of every branch output row (N, E) with every row (M, E), fused in blocks
        of about ``chunk_pairs`` pairs (:meth:`score_matrix`)."""
        if chunk_pairs < 1:
            raise ValueError(f"chunk_pairs must be at least 1, got {chunk_pairs}")
        rows = max(1, chunk_pairs // max(1, texts.shape[0]))
        blocks = [
            self.fuse(images[start : start + rows, None, :], texts[None, :, :])
            for start in range(0, images.shape[0], rows)
        ]
        if not blocks:
            return images.new_zeros((0, texts.shape[0]))
        return torch.cat(blocks)
