"""In-batch contrastive loss (CLIP-style InfoNCE) with a learned temperature: a baseline.

The instance loss classifies every sample against a learned proxy per training instance; InfoNCE
classifies each image against the batch's texts and each text against the batch's images
(METHODS.md section 4.2). The learned inverse temperature is a part of the model
(``imtext.models.logit_scale.LogitScale``); the loss takes its logarithm as a 0-d tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from imtext.losses.ranking import _check_embeddings, _check_labels

#: CLIP's cap on the logit scale: the default of ``imtext.models.logit_scale.LogitScale``, which
#: keeps its parameter inside it (a test checks that the two agree).
MAX_SCALE = 100.0


def infonce_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    log_scale: Tensor,
    max_scale: float = MAX_SCALE,
    labels: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE over a batch of matching pairs, logits scaled by a learned ``exp(log_scale)``.

    ``image_emb`` and ``text_emb`` are (B, D), L2-normalised; row ``i`` of each is a matching pair.
    ``log_scale`` is a 0-d tensor (``LogitScale``), clamped here to ``[0, log max_scale]``, so
    the scale ``t = exp(log_scale)`` lies in ``[1, max_scale]`` (CLIP: 100). With logits
    ``Z = t * image_emb @ text_emb.T``::

        loss = (mean_i CE(Z[i, :], i) + mean_i CE(Z[:, i], i)) / 2

    the mean of the image-to-text and the text-to-image cross-entropies with diagonal targets.
    When ``labels`` (B,) is given, an off-diagonal pair of the same label (two captions of one
    image, two images of one person) is dropped from the softmax denominators: it is neither the
    target nor pushed apart, as in :func:`~imtext.losses.ranking.ranking_loss`.

    Worked example (B = 2, log_scale = log 2, so t = 2)::

        images x = (1, 0), (0, 1);  texts y = (1, 0), (0.6, 0.8)
        S = x @ y.T = [[1.0, 0.6], [0.0, 0.8]];  Z = 2 S = [[2.0, 1.2], [0.0, 1.6]]
        image to text, rows:  CE([2.0, 1.2], 0) = log(1 + e^-0.8) = 0.371101
                              CE([0.0, 1.6], 1) = log(1 + e^-1.6) = 0.183901
        text to image, cols:  CE([2.0, 0.0], 0) = log(1 + e^-2.0) = 0.126928
                              CE([1.2, 1.6], 1) = log(1 + e^-0.4) = 0.513015
        loss = ((0.371101 + 0.183901) / 2 + (0.126928 + 0.513015) / 2) / 2 = 0.298736
        labels = [0, 0]: each row and column keeps only its target, so loss = 0
    """
    _check_embeddings(image_emb=image_emb, text_emb=text_emb)
    if log_scale.ndim != 0:
        raise ValueError(f"log_scale must be a 0-d tensor, got shape {tuple(log_scale.shape)}")
    if not math.isfinite(max_scale) or max_scale < 1:
        raise ValueError(f"max_scale must be a finite number >= 1, got {max_scale!r}")
    batch = image_emb.shape[0]
    scale = log_scale.clamp(0.0, math.log(max_scale)).exp()
    logits = scale * (image_emb @ text_emb.T)
    if labels is not None:
        _check_labels("labels", labels, batch, f"image_emb {tuple(image_emb.shape)}")
        labels = labels.to(image_emb.device)
        eye = torch.eye(batch, dtype=torch.bool, device=image_emb.device)
        # -inf removes a same-instance pair from both softmaxes; the diagonal always stays finite.
        logits = logits.masked_fill((labels[:, None] == labels[None, :]) & ~eye, float("-inf"))
    targets = torch.arange(batch, device=image_emb.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
