"""Modality-invariant embedding (Liu et al., ACM TOMM 2019): a gradient-reversal layer and the modality classifier loss.

A modality classifier ``D`` (``imtext.models.discriminator``) reads a shared-space embedding and says
whether it came from an image (target 1) or a sentence (target 0). ``D`` minimises
:func:`modality_loss`; the encoders should *maximise* it, so that image and text embeddings become
indistinguishable in distribution while the triplet loss keeps matching pairs close.

**Gradient reversal, not alternating updates.** The paper (Liu et al., ACM TOMM 2019) states an
adversarial loss and a multi-stage procedure but not the form of the min-max (METHODS.md section 2:
UNVERIFIED). We use a gradient-reversal layer (Ganin & Lempitsky 2015), as the public code of ACMR
(Wang et al., MM 2017) does in front of its modality classifier; ACMR is the kind of adversarial
cross-modal retrieval work the paper's abstract names as its inspiration::

    total = L_triplet + w_adv * modality_loss(D(grad_reverse(image_emb, λ)), D(grad_reverse(text_emb, λ)))

One backward pass then gives ``D`` the gradient of ``w_adv * L_D`` (it learns to classify) and the
encoders ``-λ * w_adv`` times theirs (they learn to confuse it). Why:

- one forward, one backward and one optimiser per step, as the training loop does today, so AMP
  scaling, DDP (which synchronises only what ``forward`` computes), checkpoints and resume need
  nothing new; alternating updates need a second optimiser and a second forward per step;
- a simultaneous GRL step is gradient descent-ascent with one ``D`` step per encoder step, the
  common k = 1 case of the alternating schedule;
- the paper's *multi-stage* procedure stays, one training stage per phase: (1) the triplet baseline
  (``w_adv = 0``); (2) ``D`` warm-up with ``λ = 0``, where the reversal passes no gradient to the
  encoders (freeze them too, with a zero learning rate, to keep them exactly fixed); (3) joint
  training with ``λ > 0``, ramped by :func:`adversarial_lambda`; (4) optionally triplet only again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``-lambd`` backwards."""

    @staticmethod
    def forward(ctx, x: Tensor, lambd: float) -> Tensor:
        ctx.lambd = lambd
        # view_as, not x itself: autograd needs a new tensor to attach this node's backward to.
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output * -ctx.lambd, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """``x`` unchanged (any shape); its gradient arrives as ``-lambd * grad``.

    ``lambd`` is a finite non-negative float: 0 cuts the gradient (the ``D`` warm-up stage), 1 is a
    plain reversal. Worked example: ``y = grad_reverse(x, 0.5)`` for ``x = [1., 2.]`` and
    ``L = (3 * y).sum()``; then ``y == [1., 2.]`` and ``x.grad == [-1.5, -1.5]``.
    """
    if isinstance(lambd, bool) or not isinstance(lambd, int | float):
        raise ValueError(f"lambd must be a number, got {type(lambd).__name__}")
    if not math.isfinite(lambd) or lambd < 0:
        raise ValueError(f"lambd must be a finite non-negative number, got {lambd!r}")
    return GradientReversal.apply(x, float(lambd))


def adversarial_lambda(progress: float, max_lambda: float = 1.0, gamma: float = 10.0) -> float:
    """The reversal coefficient ramp of Ganin & Lempitsky (2015), also used by ACMR.

    ``λ(p) = max_lambda * (2 / (1 + exp(-gamma * p)) - 1)`` for training progress ``p`` in [0, 1]
    (the fraction of the adversarial stage's steps done): 0 at the start, when ``D`` is still
    random and its gradient is noise, rising to ``max_lambda``. Worked example: ``p = 0`` gives 0;
    ``p = 0.1, gamma = 10`` gives ``2 / (1 + e^-1) - 1 = 0.462117``; ``p = 1`` gives 0.999909.
    """
    if not 0 <= progress <= 1:
        raise ValueError(f"progress must be in [0, 1], got {progress!r}")
    if not math.isfinite(max_lambda) or max_lambda < 0:
        raise ValueError(f"max_lambda must be a finite non-negative number, got {max_lambda!r}")
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a finite positive number, got {gamma!r}")
    return max_lambda * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


def modality_loss(image_logits: Tensor, text_logits: Tensor) -> Tensor:
    """Binary cross-entropy of the modality classifier: images are class 1, texts class 0.

    ``image_logits`` (N,) and ``text_logits`` (M,) are raw logits of ``D`` on image and text
    embeddings (``D`` reads L2-normalised embeddings; its logits are unbounded). Returns the mean of
    the two modalities' mean losses, ``(mean_i softplus(-a_i) + mean_j softplus(b_j)) / 2``, so a
    batch with more sentences than images (two-branch neighbourhood batches) does not tilt ``D``
    towards calling everything text. Minimised by ``D``; the encoders maximise it through
    :func:`grad_reverse`. At chance (all logits 0) it is ``log 2``.

    Worked example (N = 2, M = 1)::

        image_logits = [0, log 3]:  softplus(0) = log 2 = 0.693147,
                                    softplus(-log 3) = log(4/3) = 0.287682,  mean 0.490415
        text_logits  = [log 3]:     softplus(log 3) = log 4 = 1.386294
        loss = (0.490415 + 1.386294) / 2 = 0.938354
    """
    for name, logits in (("image_logits", image_logits), ("text_logits", text_logits)):
        if logits.ndim != 1 or logits.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (N,) tensor, got {tuple(logits.shape)}")
    if text_logits.dtype != image_logits.dtype:
        raise ValueError(
            f"text_logits dtype {text_logits.dtype} differs from image_logits dtype "
            f"{image_logits.dtype}"
        )
    # softplus(-a) = BCE(a, 1) and softplus(b) = BCE(b, 0), without building target tensors.
    return (F.softplus(-image_logits).mean() + F.softplus(text_logits).mean()) / 2
