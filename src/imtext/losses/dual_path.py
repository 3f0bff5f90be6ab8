"""The Stage II objective: a weighted sum of the ranking loss and the two instance-loss terms."""

from __future__ import annotations

import math
from numbers import Real

from torch import Tensor


def dual_path_loss(
    rank: Tensor,
    image_instance: Tensor,
    text_instance: Tensor,
    weights: tuple[float, float, float],
) -> Tensor:
    """``L = λ_r·rank + λ_i·image_instance + λ_t·text_instance`` for 0-d loss tensors.

    ``weights`` is ``(λ_r, λ_i, λ_t)``, three finite non-negative numbers; the official code uses
    (2, 1, 0.1) for MSCOCO and Flickr30k and (2, 1, 0.5) for CUHK-PEDES. A zero weight still
    multiplies its term, so a NaN term makes the sum NaN (pass a zero tensor to switch a term off).

    Worked example: rank = 0.5, image_instance = 2.0, text_instance = 3.0, weights = (2, 1, 0.1)::

        L = 2·0.5 + 1·2.0 + 0.1·3.0 = 1.0 + 2.0 + 0.3 = 3.3
    """
    terms = {"rank": rank, "image_instance": image_instance, "text_instance": text_instance}
    for name, term in terms.items():
        if term.ndim != 0:
            raise ValueError(
                f"{name} must be a 0-d (scalar) loss tensor, got shape {tuple(term.shape)}"
            )
    if (
        not isinstance(weights, tuple | list)
        or len(weights) != 3
        or not all(isinstance(w, Real) and not isinstance(w, bool) for w in weights)
        or not all(math.isfinite(w) and w >= 0 for w in weights)
    ):
        raise ValueError(
            f"weights must be three finite non-negative numbers (λ_r, λ_i, λ_t), got {weights!r}"
        )
    w_rank, w_image, w_text = (float(w) for w in weights)
    return w_rank * rank + w_image * image_instance + w_text * text_instance
