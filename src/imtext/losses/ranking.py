"""Bidirectional ranking (triplet) losses on L2-normalised embeddings, and hard negative mining.

Scores are dot products ``s(x, y) = x·y``, which are cosine similarities because callers pass
L2-normalised embeddings (not re-checked here). A hinge ``[margin - s(pos) + s(neg)]_+`` is zero
once the positive beats the negative by at least ``margin``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_embeddings(**embeddings: Tensor) -> None:
    """All tensors are (N, D), non-empty, of one shape and dtype."""
    (first_name, first), *rest = embeddings.items()
    if first.ndim != 2 or first.shape[0] == 0:
        raise ValueError(
            f"{first_name} must be a non-empty (N, D) tensor, got shape {tuple(first.shape)}"
        )
    for name, emb in rest:
        if emb.shape != first.shape:
            raise ValueError(
                f"{name} must have the shape of {first_name}: got {name} {tuple(emb.shape)} and "
                f"{first_name} {tuple(first.shape)}"
            )
        if emb.dtype != first.dtype:
            raise ValueError(
                f"{name} dtype {emb.dtype} differs from {first_name} dtype {first.dtype}"
            )


def _check_margin(margin: float) -> None:
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite non-negative number, got {margin!r}")


def _check_labels(name: str, labels: Tensor, n: int, against: str) -> None:
    if labels.shape != (n,):
        raise ValueError(
            f"{name} must be (N,) = ({n},) to match {against}, got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {labels.dtype}")


def ranking_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    margin: float,
    hardest: bool = False,
    labels: Tensor | None = None,
) -> Tensor:
    """Bidirectional ranking loss over a batch of matching pairs (VSE sum / VSE++ hardest form).

    ``image_emb`` and ``text_emb`` are (B, D), L2-normalised; row ``i`` of each is a matching pair.
    With ``S = image_emb @ text_emb.T`` (``S[i, j] = s(image i, text j)``):

    - each image anchor ``i`` has hinges ``[margin - S[i, i] + S[i, j]]_+`` over negative texts ``j``;
    - each text anchor ``i`` has hinges ``[margin - S[i, i] + S[j, i]]_+`` over negative images ``j``.

    Negatives are all ``j != i``; when ``labels`` (B,) is given, only the ``j`` with
    ``labels[j] != labels[i]``, so rows of the same instance (or identity) never push each other
    apart. ``hardest=False`` sums an anchor's hinges over its negatives (Kiros et al. / VSE);
    ``hardest=True`` keeps only its largest hinge (VSE++). An anchor without negatives contributes 0.

    Reduction: the sum over all 2B anchors (B image and B text anchors) divided by B, i.e. the mean
    per matching pair of its two directions' losses, so the learning rate does not depend on B.

    Worked example (B = 3, margin = 0.3)::

        images x = (1, 0), (0.6, 0.8), (0, 1);  texts y = (0.8, 0.6), (0.6, 0.8), (0, 1)
        S = [[0.80, 0.60, 0.00],
             [0.96, 1.00, 0.80],
             [0.60, 0.80, 1.00]]          diagonal (positives) 0.8, 1.0, 1.0
        image anchors, margin - S[i,i] + S[i,j] for j != i:
            i=0: 0.1, -0.5   i=1: 0.26, 0.1   i=2: -0.1, 0.1
        text anchors, margin - S[i,i] + S[j,i] for j != i:
            i=0: 0.46, 0.1   i=1: -0.1, 0.1   i=2: -0.7, 0.1
        hardest=False: (0.1 + 0.36 + 0.1  +  0.56 + 0.1 + 0.1) / 3 = 1.32 / 3 = 0.44
        hardest=True:  (0.1 + 0.26 + 0.1  +  0.46 + 0.1 + 0.1) / 3 = 1.12 / 3 = 0.373333
        labels = [0, 0, 1]: rows 0 and 1 are no longer negatives of each other, leaving
            image anchors: i=0: [-0.5]+ = 0   i=1: 0.1   i=2: max/sum of [-0.1]+, 0.1 = 0.1
            text anchors:  i=0: 0.1           i=1: 0.1   i=2: max/sum of [-0.7]+, 0.1 = 0.1
            either mode: 0.5 / 3 = 0.166667
    """
    _check_embeddings(image_emb=image_emb, text_emb=text_emb)
    _check_margin(margin)
    batch = image_emb.shape[0]
    if labels is None:
        negative = ~torch.eye(batch, dtype=torch.bool, device=image_emb.device)
    else:
        _check_labels("labels", labels, batch, f"image_emb {tuple(image_emb.shape)}")
        labels = labels.to(image_emb.device)
        # Same label implies not a negative; this also drops the diagonal (the positives).
        negative = labels[:, None] != labels[None, :]

    scores = image_emb @ text_emb.T
    positive = scores.diagonal()
    # masked_fill (not torch.where on a clamp) so masked pairs get exactly zero gradient.
    image_anchor = (margin - positive[:, None] + scores).clamp(min=0).masked_fill(~negative, 0)
    text_anchor = (margin - positive[None, :] + scores).clamp(min=0).masked_fill(~negative, 0)
    if hardest:
        # Hinges are >= 0 and masked entries are 0, so an anchor without negatives yields 0.
        total = image_anchor.amax(dim=1).sum() + text_anchor.amax(dim=0).sum()
    else:
        total = image_anchor.sum() + text_anchor.sum()
    return total / batch


def paired_ranking_loss(
    anchor_image: Tensor,
    positive_text: Tensor,
    negative_text: Tensor,
    negative_image: Tensor,
    margin: float,
) -> Tensor:
    """The paper's Stage II ranking loss: a bidirectional triplet with ONE negative per anchor.

    All inputs are (P, D), L2-normalised, and ``s`` is the row-wise dot product. Row ``i`` holds
    anchor image ``x_i``, its caption ``y_i``, a negative text ``y'_i`` (in the paper hard-mined from
    a candidate pool with :func:`hardest_negative_indices`) and a negative image ``x'_i`` (another
    batch image). Returns the mean over ``i`` of::

        [margin - s(x_i, y_i) + s(x_i, y'_i)]_+  +  [margin - s(x_i, y_i) + s(x'_i, y_i)]_+

    Reduction: mean over the P anchors (the official code sums over them; the sum is P times this).

    Worked example (P = 2, margin = 0.5)::

        x  = (1, 0), (0, 1)        y  = (0.8, 0.6), (0.6, 0.8)
        y' = (0.6, 0.8), (1, 0)    x' = (0.6, 0.8), (1, 0)
        i=0: s(x,y) = 0.8, s(x,y') = 0.6, s(x',y) = 0.96
             [0.5 - 0.8 + 0.6]_+ + [0.5 - 0.8 + 0.96]_+ = 0.3 + 0.66 = 0.96
        i=1: s(x,y) = 0.8, s(x,y') = 0.0, s(x',y) = 0.6
             [0.5 - 0.8 + 0.0]_+ + [0.5 - 0.8 + 0.6]_+  = 0   + 0.3  = 0.3
        loss = (0.96 + 0.3) / 2 = 0.63
    """
    _check_embeddings(
        anchor_image=anchor_image,
        positive_text=positive_text,
        negative_text=negative_text,
        negative_image=negative_image,
    )
    _check_margin(margin)
    positive = (anchor_image * positive_text).sum(dim=1)
    text_hinge = (margin - positive + (anchor_image * negative_text).sum(dim=1)).clamp(min=0)
    image_hinge = (margin - positive + (negative_image * positive_text).sum(dim=1)).clamp(min=0)
    return (text_hinge + image_hinge).mean()


def hardest_negative_indices(
    anchor_emb: Tensor,
    candidate_emb: Tensor,
    anchor_labels: Tensor,
    candidate_labels: Tensor,
) -> Tensor:
    """Index of the highest-scoring candidate of a different label for each anchor (hard mining).

    ``anchor_emb`` (P, D) are anchor images and ``candidate_emb`` (C, D) candidate texts, both
    L2-normalised; ``anchor_labels`` (P,) and ``candidate_labels`` (C,) are their integer instance
    labels. Candidates with the anchor's label are positives, never negatives, however high they
    score. Returns (P,) int64 indices into the candidates, computed without gradient; ties go to the
    lowest index. Raises ValueError if some anchor has no candidate of another label.

    Worked example::

        anchors    x = (1, 0) label 0, (0, 1) label 1
        candidates y = (1, 0) label 0, (0.8, 0.6) label 2, (0, 1) label 1, (0.6, 0.8) label 3
        anchor 0 scores 1.0, 0.8, 0.0, 0.6; candidate 0 shares label 0, so the best is 1 (0.8)
        anchor 1 scores 0.0, 0.6, 1.0, 0.8; candidate 2 shares label 1, so the best is 3 (0.8)
        result [1, 3]
    """
    if anchor_emb.ndim != 2 or anchor_emb.shape[0] == 0:
        raise ValueError(
            f"anchor_emb must be a non-empty (P, D) tensor, got shape {tuple(anchor_emb.shape)}"
        )
    if candidate_emb.ndim != 2 or candidate_emb.shape[0] == 0:
        raise ValueError(
            f"candidate_emb must be a non-empty (C, D) tensor, got shape {tuple(candidate_emb.shape)}"
        )
    if candidate_emb.shape[1] != anchor_emb.shape[1]:
        raise ValueError(
            f"candidate_emb {tuple(candidate_emb.shape)} and anchor_emb {tuple(anchor_emb.shape)} "
            "must have the same embedding size D"
        )
    if candidate_emb.dtype != anchor_emb.dtype:
        raise ValueError(
            f"candidate_emb dtype {candidate_emb.dtype} differs from anchor_emb dtype {anchor_emb.dtype}"
        )
    _check_labels(
        "anchor_labels", anchor_labels, anchor_emb.shape[0], f"anchor_emb {tuple(anchor_emb.shape)}"
    )
    _check_labels(
        "candidate_labels",
        candidate_labels,
        candidate_emb.shape[0],
        f"candidate_emb {tuple(candidate_emb.shape)}",
    )
    with torch.no_grad():
        device = anchor_emb.device
        valid = anchor_labels.to(device)[:, None] != candidate_labels.to(device)[None, :]
        has_negative = valid.any(dim=1)
        if not bool(has_negative.all()):
            missing = torch.nonzero(~has_negative).flatten().tolist()
            raise ValueError(
                f"anchors {missing} have no candidate with a different label; every candidate shares "
                "their label, so no negative can be mined (draw candidates from other instances)"
            )
        scores = (anchor_emb @ candidate_emb.T).masked_fill(~valid, float("-inf"))
        return scores.argmax(dim=1)
