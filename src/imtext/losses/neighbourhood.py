"""The two-branch embedding network's losses (Wang et al., TPAMI 2019): top-K bidirectional ranking and the
neighbourhood-preserving constraint between sentences of one image.

Following the official code ([TB:retrieval_model.py], METHODS.md section 3.1), everything is a
Euclidean distance between L2-normalised embeddings, ``d(a, b) = sqrt(|a|^2 - 2 a.b + |b|^2 + eps)``
with ``eps = 1e-4`` (so ``d(a, a) = 0.01`` and the square root is differentiable everywhere), and
every term is a hinge ``[margin + d(anchor, positive) - d(anchor, negative)]_+`` of which each
anchor keeps its ``top_k`` largest (the official K is 10, margin 0.05). Total, as in the official
code: ``1.5 * image_term + 1 * sentence_term + 0.05 * neighbour_term`` (the PyTorch port: 0.1).

A batch holds N images and M sentences; ``text_image`` (M,) gives the row of each sentence's image.
Unlike the official code it may hold any number of sentences per image (the sampler gives fewer to
images that have fewer) and, with ``image_labels``, several images of one instance (CUHK-PEDES
identities), which are then never each other's negatives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from imtext.losses.ranking import _check_labels, _check_margin

#: Added under the square root of the distance, as in the official code.
DISTANCE_EPS = 1e-4


def pairwise_distance(x: Tensor, y: Tensor, eps: float = DISTANCE_EPS) -> Tensor:
    """Euclidean distances (A, C) between the rows of ``x`` (A, D) and ``y`` (C, D).

    ``sqrt(max(|x|^2 - 2 x.y + |y|^2, 0) + eps)``: the official code's form (without the clamp at
    0, which only removes rounding noise below zero). On L2-normalised rows ``|x - y|^2 = 2 - 2 x.y``,
    so ranking by this distance is ranking by cosine similarity.
    """
    squared = (x * x).sum(1)[:, None] - 2 * (x @ y.T) + (y * y).sum(1)[None, :]
    return (squared.clamp(min=0) + eps).sqrt()


def topk_hinge_mean(hinge: Tensor, negative: Tensor, top_k: int) -> Tensor:
    """Mean over anchors of the mean of each anchor's ``top_k`` largest clamped hinges.

    ``hinge`` (A, C) holds ``margin + d(pos) - d(neg)`` for every anchor and candidate; ``negative``
    (A, C) bool says which candidates are the anchor's negatives. An anchor with fewer than
    ``top_k`` negatives averages over all it has; one without negatives contributes 0 (the mean is
    still over all A anchors). When every anchor has ``top_k`` negatives or more this is the
    official code's ``reduce_mean(top_k(clip(hinge)))``.
    """
    k = min(top_k, hinge.shape[1])
    if k == 0:
        return hinge.new_zeros(())
    # -inf keeps non-negatives out of the top k; masked_fill gives them exactly zero gradient.
    values = hinge.masked_fill(~negative, float("-inf")).topk(k, dim=1).values
    kept = torch.isfinite(values)
    values = values.clamp(min=0).masked_fill(~kept, 0)
    per_anchor = values.sum(1) / kept.sum(1).clamp(min=1)
    return per_anchor.mean()


def _check_inputs(
    text_emb: Tensor, text_image: Tensor, n_images: int | None, image_labels: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Validated ``(text_image, label of each image)`` on the embeddings' device.

    ``n_images`` None: the images are ``image_labels``'s rows, or without it ``text_image.max() + 1``.
    """
    if text_emb.ndim != 2 or text_emb.shape[0] == 0:
        raise ValueError(f"text_emb must be a non-empty (M, D) tensor, got {tuple(text_emb.shape)}")
    _check_labels("text_image", text_image, text_emb.shape[0], f"text_emb {tuple(text_emb.shape)}")
    text_image = text_image.to(text_emb.device, torch.long)
    if n_images is None:
        n_images = image_labels.shape[0] if image_labels is not None else int(text_image.max()) + 1
    if bool(((text_image < 0) | (text_image >= n_images)).any()):
        raise ValueError(
            f"text_image must index the {n_images} images, got values in "
            f"[{int(text_image.min())}, {int(text_image.max())}]"
        )
    if image_labels is None:
        return text_image, torch.arange(n_images, device=text_emb.device)
    _check_labels("image_labels", image_labels, n_images, f"{n_images} images")
    return text_image, image_labels.to(text_emb.device)


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")


def topk_ranking_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    text_image: Tensor,
    margin: float,
    top_k: int,
    image_labels: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Bidirectional ranking with the ``top_k`` largest violations per anchor, as two terms.

    ``image_emb`` (N, D) and ``text_emb`` (M, D) are L2-normalised; sentence ``i`` belongs to image
    ``text_image[i]`` (M,). Each sentence ``s`` with its image ``I`` gives one anchor per term:

    - ``image_term`` (sentence to image): ``[margin + d(s, I) - d(s, I')]_+`` over images ``I'`` of
      other instances;
    - ``sentence_term`` (image to sentence): ``[margin + d(s, I) - d(s', I)]_+`` over sentences
      ``s'`` of images of other instances.

    An image's instance is its row, or ``image_labels[row]`` (N,) when given. Each term is reduced
    by :func:`topk_hinge_mean` over its M anchors. Returns ``(image_term, sentence_term)``; the
    official weights are 1.5 and 1 (``image_term`` weight 0 trains one direction only).

    Worked example (N = 2, M = 3, margin = 0.5, top_k = 2, eps = 1e-4; 6 decimals, each computed
    from unrounded distances)::

        images x0 = (1, 0), x1 = (0, 1)
        sentences s0 = (1, 0), s1 = (0.8, 0.6) of x0;  s2 = (0.6, 0.8) of x1
        d = sqrt(2 - 2 cos + 1e-4):  cos 1 -> 0.01,  0.8 -> 0.632535,  0.6 -> 0.894483,  0 -> 1.414249
        image_term: one negative image each
            s0: [0.5 + 0.01 - 1.414249]_+ = 0
            s1: 0.5 + 0.632535 - 0.894483 = 0.238051
            s2: 0.5 + 0.632535 - 0.894483 = 0.238051
            mean (0 + 0.238051 + 0.238051) / 3 = 0.158701
        sentence_term: negatives are the sentences of the other image
            s0 (x0; neg s2 at 0.894483): 0
            s1 (x0; neg s2 at 0.894483): 0.238051
            s2 (x1; negs s0 at 1.414249 -> 0, s1 at 0.894483 -> 0.238051): (0 + 0.238051) / 2
            mean (0 + 0.238051 + 0.119026) / 3 = 0.119026
    """
    if image_emb.ndim != 2 or image_emb.shape[0] == 0:
        raise ValueError(
            f"image_emb must be a non-empty (N, D) tensor, got {tuple(image_emb.shape)}"
        )
    if text_emb.ndim != 2 or text_emb.shape[1] != image_emb.shape[1]:
        raise ValueError(
            f"text_emb must be (M, D) with the D of image_emb {tuple(image_emb.shape)}, got "
            f"{tuple(text_emb.shape)}"
        )
    if text_emb.dtype != image_emb.dtype:
        raise ValueError(f"text_emb dtype {text_emb.dtype} differs from {image_emb.dtype}")
    _check_margin(margin)
    _check_top_k(top_k)
    text_image, labels = _check_inputs(text_emb, text_image, image_emb.shape[0], image_labels)
    text_labels = labels[text_image]

    dist = pairwise_distance(text_emb, image_emb)  # (M, N)
    positive = dist.gather(1, text_image[:, None])  # (M, 1): d(s_i, image of s_i)
    image_negative = text_labels[:, None] != labels[None, :]  # (M, N)
    image_term = topk_hinge_mean(margin + positive - dist, image_negative, top_k)

    # Row i: the distances of every sentence to sentence i's image, d(s_j, I_i).
    to_own_image = dist[:, text_image].T  # (M, M)
    sentence_negative = text_labels[:, None] != text_labels[None, :]
    sentence_term = topk_hinge_mean(margin + positive - to_own_image, sentence_negative, top_k)
    return image_term, sentence_term


def neighbourhood_loss(
    text_emb: Tensor,
    text_image: Tensor,
    margin: float,
    top_k: int,
    image_labels: Tensor | None = None,
) -> Tensor:
    """The neighbourhood-preserving constraint: sentences of one image closer than any other's.

    ``text_emb`` (M, D) is L2-normalised; sentence ``i`` belongs to image ``text_image[i]`` (M,),
    of instance ``image_labels[text_image[i]]`` when ``image_labels`` (N,) is given (else the image
    row). For each anchor sentence ``s``, the positive distance is the largest ``d(s, s+)`` over the
    sentences of its own image, ``s`` itself included (``d(s, s) = 0.01``, so a sentence alone in
    the batch still has a positive); the negatives are the sentences of other instances::

        [margin + max_{s+} d(s, s+) - d(s, s-)]_+

    reduced by :func:`topk_hinge_mean` over the M anchors. (Same instance but another image, e.g.
    one person's two photos, is neither positive nor negative.)

    Worked example (the sentences of :func:`topk_ranking_loss`; margin = 0.5, top_k = 2)::

        s0, s1 of image 0; s2 of image 1
        d(s0, s1) = 0.632535 (cos 0.8),  d(s0, s2) = 0.894483 (cos 0.6),
        d(s1, s2) = sqrt(0.0801) = 0.283019 (cos 0.96),  d(s, s) = 0.01
        s0: positive max(0.01, 0.632535);  0.5 + 0.632535 - 0.894483 = 0.238051
        s1: positive max(0.632535, 0.01);  0.5 + 0.632535 - 0.283019 = 0.849515
        s2: positive 0.01;  [0.5 + 0.01 - 0.894483]_+ = 0,  0.5 + 0.01 - 0.283019 = 0.226981
            top 2 mean (0.226981 + 0) / 2 = 0.113490
        loss = (0.238051 + 0.849515 + 0.113490) / 3 = 0.400352
    """
    _check_margin(margin)
    _check_top_k(top_k)
    text_image, labels = _check_inputs(text_emb, text_image, None, image_labels)
    text_labels = labels[text_image]

    dist = pairwise_distance(text_emb, text_emb)  # (M, M)
    same_image = text_image[:, None] == text_image[None, :]  # includes the diagonal
    # masked_fill, not a product: the other images' distances get exactly zero gradient.
    positive = dist.masked_fill(~same_image, float("-inf")).amax(dim=1, keepdim=True)
    negative = text_labels[:, None] != text_labels[None, :]
    return topk_hinge_mean(margin + positive - dist, negative, top_k)
