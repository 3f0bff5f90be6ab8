"""Standard evaluation protocols over :func:`imtext.eval.metrics.retrieval_metrics`.

* ``"full"``: the whole split is one gallery (Flickr30k 1K test, COCO 5K test, the built-in
  dataset). ``image_ids`` is passed through when given.
* ``"coco_1k"``: the COCO 5K test split cut into 5 folds of 1,000 consecutive images, each with the
  captions of its images; every metric (medr and meanr included) is the mean over the folds. Exactly
  5,000 images are required, with each image its own id (no ``image_ids``): any other gallery would
  not be comparable with published COCO 1K numbers.
* ``"cuhk"``: CUHK-PEDES person search. ``image_ids`` (person identities) is required, and a caption
  hits every image of its identity. Papers report the text-to-image metrics (``t2i_r1``, ``t2i_r5``,
  ``t2i_r10``); both directions are returned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from imtext.eval.metrics import as_id_array, retrieval_metrics

PROTOCOLS = ("full", "coco_1k", "cuhk")
COCO_1K_FOLDS = 5
COCO_1K_FOLD_IMAGES = 1000


def evaluate_protocol(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    text_to_image: torch.Tensor | np.ndarray | Sequence[int],
    protocol: str,
    image_ids: torch.Tensor | np.ndarray | Sequence[int] | None = None,
) -> dict[str, float]:
    """Metrics of ``protocol`` for (N_img, D) images and (N_txt, D) captions.

    ``text_to_image`` (N_txt,) and ``image_ids`` (N_img,) are as in ``retrieval_metrics``. Returns
    its keys (``i2t_r1`` ... ``rsum``).
    """
    if protocol == "full":
        return retrieval_metrics(image_emb, text_emb, text_to_image, image_ids=image_ids)
    if protocol == "coco_1k":
        return _coco_1k(image_emb, text_emb, text_to_image, image_ids)
    if protocol == "cuhk":
        if image_ids is None:
            raise ValueError("protocol 'cuhk' matches captions by person identity: pass image_ids")
        return retrieval_metrics(image_emb, text_emb, text_to_image, image_ids=image_ids)
    raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")


def _coco_1k(image_emb, text_emb, text_to_image, image_ids) -> dict[str, float]:
    """Mean of ``retrieval_metrics`` over 5 folds of 1,000 consecutive images and their captions."""
    n_images = COCO_1K_FOLDS * COCO_1K_FOLD_IMAGES
    if image_ids is not None:
        raise ValueError("protocol 'coco_1k' uses each image row as its id: do not pass image_ids")
    if len(image_emb) != n_images:
        raise ValueError(
            f"protocol 'coco_1k' needs the {n_images:,}-image COCO 5K test split "
            f"({COCO_1K_FOLDS} folds of {COCO_1K_FOLD_IMAGES:,}), got {len(image_emb):,} images"
        )
    text_ids = as_id_array(text_to_image, "text_to_image", len(text_emb))
    if len(text_ids) and (text_ids.min() < 0 or text_ids.max() >= n_images):
        raise ValueError(f"text_to_image ids must lie in [0, {n_images}) for protocol 'coco_1k'")
    folds = []
    for start in range(0, n_images, COCO_1K_FOLD_IMAGES):
        stop = start + COCO_1K_FOLD_IMAGES
        captions = np.flatnonzero((text_ids >= start) & (text_ids < stop))
        folds.append(
            retrieval_metrics(image_emb[start:stop], text_emb[captions], text_ids[captions] - start)
        )
    return {key: float(np.mean([fold[key] for fold in folds])) for key in folds[0]}
