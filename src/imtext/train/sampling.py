"""Candidate captions for the paper's hard negative mining.

Before each Stage II step the paper scores 256 random captions of *other* training images against
the anchor images and takes the best-scoring one per anchor as its negative text. Captions of any
image in the batch are excluded, so a "negative" is never a caption of a batch image (nor, with
identity labels, of the same person).
"""

from __future__ import annotations

import numpy as np

from imtext.errors import DataError


def sample_candidates(
    rng: np.random.Generator, caption_labels: np.ndarray, batch_labels: np.ndarray, pool: int
) -> np.ndarray:
    """``pool`` caption indices drawn uniformly (with replacement) among the captions whose label
    is not in ``batch_labels``. Raises :class:`DataError` when no caption qualifies."""
    if len(caption_labels) == 0:
        raise DataError("the training split has no captions to sample negatives from")
    excluded = set(batch_labels.tolist())
    picked: list[np.ndarray] = []
    have = 0
    # Rejection sampling: the batch covers a tiny share of the labels, so a round or two suffices
    # and no pass over all captions is needed (COCO has 566k).
    for _ in range(8):
        draw = rng.integers(0, len(caption_labels), size=2 * pool)
        keep = draw[[label not in excluded for label in caption_labels[draw].tolist()]]
        picked.append(keep)
        have += len(keep)
        if have >= pool:
            return np.concatenate(picked)[:pool]
    valid = np.flatnonzero(~np.isin(caption_labels, batch_labels))
    if len(valid) == 0:
        raise DataError(
            "the training split has no caption outside the batch to use as a negative; "
            "lower batch_size or use more training images"
        )
    return np.concatenate([*picked, rng.choice(valid, size=pool - have)])
