"""In-batch contrastive loss (CLIP-style InfoNCE) with a learned temperature: a baseline.

The instance loss classifies every sample against a learned proxy per training instance; InfoNCE
classifies each image against the batch's texts and each text against the batch's images
(METHODS.md section 4.2). The inverse temperature is learned as its logarithm, as in CLIP: a
positive scale for any parameter value, and multiplicative steps under a fixed learning rate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imtext.losses.ranking import _check_embeddings, _check_labels

#: CLIP's initial temperature (0.07, from Wu et al. 2018) and its cap on the logit scale (100).
INIT_TEMPERATURE = 0.07
MAX_SCALE = 100.0


class LogitScale(nn.Module):
    """The learned ``log(1 / temperature)`` of :func:`infonce_loss`, a 0-d parameter.

    Register it on the model (``model.logit_scale = LogitScale()``) so that the optimiser, the
    checkpoint and DDP see it like any weight, and call :meth:`clamp_` after every optimiser step,
    as open_clip does: the parameter then never leaves ``[0, log max_scale]``, where the loss's own
    clamp is the identity and the gradient always flows. (Clamping only inside the loss would leave a
    parameter that crossed the cap with zero gradient, stuck there for good.)
    """

    def __init__(self, init_temperature: float = INIT_TEMPERATURE, max_scale: float = MAX_SCALE):
        super().__init__()
        if not 0 < init_temperature <= 1 or not math.isfinite(max_scale) or max_scale < 1:
            raise ValueError(
                "init_temperature must be in (0, 1] and max_scale a finite number >= 1, got "
                f"{init_temperature!r}, {max_scale!r}"
            )
        self.max_scale = float(max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    def forward(self) -> Tensor:
        """The 0-d log-scale parameter, to pass to :func:`infonce_loss`."""
        return self.log_scale

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(0.0, math.log(self.max_scale))

    def extra_repr(self) -> str:
        return f"max_scale={self.max_scale}"


def infonce_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    log_scale: Tensor,
    max_scale: float = MAX_SCALE,
    labels: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE over a batch of matching pairs, logits scaled by a learned ``exp(log_scale)``.

    ``image_emb`` and ``text_emb`` are (B, D), L2-normalised; row ``i`` of each is a matching pair.
    ``log_scale`` is a 0-d tensor (:class:`LogitScale`), clamped here to ``[0, log max_scale]``, so
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
