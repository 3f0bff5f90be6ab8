"""Wang et al.'s two-branch networks (TPAMI 2019) on top of the dual-path encoders (``model.method``).

The official two-branch networks read precomputed features (VGG-19 fc7, HGLMM Fisher vectors;
METHODS.md section 3). Here their branches read the dual-path encoders' outputs: the image ResNet +
head and the text CNN + head, ``embed_dim`` wide, post-ReLU, not normalised. That choice keeps one
encoder code path for every method, lets a two-branch model start from a dual-path model file (the
encoder weights load as they are, the branches start fresh) and keeps the instance loss available
on the encoders' features. Trained end to end the encoders learn with the branches; with a
dual-path ``--init`` they start from its features, as the paper's start from ImageNet/HGLMM.

- :class:`TwoBranchModel`: ``encode_image`` / ``encode_text`` are the branches' L2-normalised
  outputs (``embed_dim`` wide), so everything that ranks embeddings (evaluate, export) works as for
  the dual-path model.
- :class:`SimilarityModel`: scores pairs; it has no embedding, so ``encode_image`` and
  ``encode_text`` raise :class:`NoEmbeddingError`. Retrieval scores every pair with
  :meth:`SimilarityModel.score_matrix` over :meth:`~SimilarityModel.image_features` and
  :meth:`~SimilarityModel.text_features`; the ONNX export serves the branch codes
  (:meth:`~SimilarityModel.image_codes`, :meth:`~SimilarityModel.text_codes`) and the fusion
  (:meth:`~SimilarityModel.score_codes`).
"""

from __future__ import annotations

import torch

from imtext.config import ModelConfig
from imtext.errors import ImtextError
from imtext.models.dual_path import DualPathModel, MethodOutput, Reverse
from imtext.models.two_branch import SimilarityNetwork, TwoBranchEmbedding


class NoEmbeddingError(ImtextError):
    """A similarity network was asked for an embedding (to index, export or serve)."""


class TwoBranchModel(DualPathModel):
    """The dual-path encoders with the two-branch embedding network on their outputs.

    Branches ``embed_dim -> branch_hidden -> embed_dim`` (Linear, BatchNorm, ReLU, Dropout,
    Linear), one per modality, weights not shared; outputs L2-normalised.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, n_classes: int) -> None:
        super().__init__(cfg, vocab_size, n_classes)
        self.net = TwoBranchEmbedding(
            cfg.embed_dim, cfg.embed_dim, cfg.branch_hidden, cfg.embed_dim, cfg.dropout,
            cfg.bn_momentum,
        )  # fmt: skip

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> (N, embed_dim), L2-normalised."""
        return self.net.encode_image(self.image(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word ids (M, L) int64 -> (M, embed_dim), L2-normalised."""
        return self.net.encode_text(self.text(tokens))

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, reverse: Reverse | None = None
    ) -> MethodOutput:
        """Images (N, ...) and captions (M, L), M need not equal N (neighbourhood batches)."""
        image_feat, text_feat = self.image(images), self.text(tokens)
        emb = self.net(image_feat, text_feat)
        return self.extras(
            emb.image_emb,
            emb.text_emb,
            self.classifier(self.dropout(image_feat)),
            self.classifier(self.dropout(text_feat)),
            reverse=reverse,
        )


class SimilarityModel(DualPathModel):
    """The dual-path encoders with the two-branch similarity network on their outputs.

    A pair's score is ``fusion(branch_i(image) * branch_t(text))``, a raw logit. There is no
    embedding to index: retrieval scores all pairs (:meth:`score_matrix`).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, n_classes: int) -> None:
        super().__init__(cfg, vocab_size, n_classes)
        self.net = SimilarityNetwork(
            cfg.embed_dim, cfg.embed_dim, cfg.branch_hidden, cfg.embed_dim,
            tuple(cfg.fusion_dims), cfg.dropout, cfg.bn_momentum,
        )  # fmt: skip

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NoEmbeddingError(_NO_EMBEDDING)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NoEmbeddingError(_NO_EMBEDDING)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> the image encoder's output (N, embed_dim), not normalised."""
        return self.image(images)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word ids (M, L) -> the text encoder's output (M, embed_dim), not normalised."""
        return self.text(tokens)

    def image_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> the image branch's L2-normalised output (N, embed_dim): what
        the fusion reads. Not an embedding: two codes are compared by :meth:`score_codes`, not a
        dot product (what the ONNX export serves)."""
        return self.net.encode_image(self.image(images))

    def text_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word ids (M, L) -> the text branch's L2-normalised output (M, embed_dim)."""
        return self.net.encode_text(self.text(tokens))

    def score_codes(self, image_codes: torch.Tensor, text_codes: torch.Tensor) -> torch.Tensor:
        """Scores (...) of code pairs of the same shape (..., embed_dim): the fusion network."""
        return self.net.fuse(image_codes, text_codes)

    def score_code_matrix(
        self, image_codes: torch.Tensor, text_codes: torch.Tensor
    ) -> torch.Tensor:
        """Scores (N, M) of every image code (N, embed_dim) with every text code (M, embed_dim),
        fused in blocks; call it in eval mode."""
        return self.net.fuse_matrix(image_codes, text_codes)

    def score_matrix(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Scores (N, M) of every image feature row (N, embed_dim) with every text row (M,
        embed_dim), in blocks; call it in eval mode."""
        return self.net.score_matrix(image_feats, text_feats)

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        reverse: Reverse | None = None,
        pairs: torch.Tensor | None = None,
    ) -> MethodOutput:
        """Images (N, ...), captions (M, L) and ``pairs`` (P, 2) int64 of (image row, caption
        row): each modality is encoded once, and only the pairs are fused, into ``pair_scores``
        (P,). ``image_emb`` / ``text_emb`` are the branches' normalised outputs."""
        image_feat, text_feat = self.image(images), self.text(tokens)
        image_emb, text_emb = self.net.encode_image(image_feat), self.net.encode_text(text_feat)
        scores = None
        if pairs is not None:
            scores = self.net.fuse(image_emb[pairs[:, 0]], text_emb[pairs[:, 1]])
        return self.extras(
            image_emb,
            text_emb,
            self.classifier(self.dropout(image_feat)),
            self.classifier(self.dropout(text_feat)),
            reverse=reverse,
            pair_scores=scores,
        )


_NO_EMBEDDING = (
    "model.method 'similarity' scores image-sentence pairs and has no embedding: a dot product of "
    "its outputs is not its score. Score pairs with image_codes / text_codes and score_codes (what "
    "`imtext export` writes, with pair_scorer.onnx), or every pair with score_matrix (what "
    "`imtext evaluate` does)"
)
