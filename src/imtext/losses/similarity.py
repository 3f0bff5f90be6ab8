"""The two-branch similarity network's loss (Wang et al., TPAMI 2019): logistic regression on pair scores.

The similarity network fuses an image and a sentence into one score (``imtext.models.two_branch``);
it is trained on positive pairs (target +1) and sampled negative pairs (target -1) with the logistic
loss ``log(1 + exp(-y s))`` (METHODS.md section 3.2; the layer widths and the negative ratio are
UNVERIFIED there, and are arguments here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def similarity_loss(scores: Tensor, targets: Tensor) -> Tensor:
    """Mean logistic loss ``softplus(-y * s)`` of pair scores against +1 / -1 targets.

    ``scores`` (P,) are the network's raw scores (logits, not probabilities, not normalised) for P
    image-sentence pairs; ``targets`` (P,) are +1 for a matching pair and -1 for a negative one, in
    any numeric dtype. Any other value, 0 included (a 0/1 target mix-up), is an error. The mean is
    over all P pairs, so the ratio of sampled negatives to positives weights the two classes.

    Worked example (P = 3)::

        scores = [0, log 3, log 3], targets = [+1, +1, -1]
        softplus(0) = log 2 = 0.693147;  softplus(-log 3) = log(4/3) = 0.287682;
        softplus(log 3) = log 4 = 1.386294
        loss = (0.693147 + 0.287682 + 1.386294) / 3 = 0.789041
    """
    if scores.ndim != 1 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty (P,) tensor, got {tuple(scores.shape)}")
    if targets.shape != scores.shape:
        raise ValueError(
            f"targets must be (P,) = {tuple(scores.shape)} like scores, got {tuple(targets.shape)}"
        )
    if targets.dtype == torch.bool or targets.dtype.is_complex:
        raise ValueError(f"targets must be +1 / -1 numbers, got dtype {targets.dtype}")
    signs = targets.to(device=scores.device, dtype=scores.dtype)
    if not bool((signs.abs() == 1).all()):
        raise ValueError("targets must be +1 (matching pair) or -1 (negative pair) only")
    return F.softplus(-signs * scores).mean()
