"""What retrieval ranks, for a model of any method: embeddings, or the scores of every pair.

Retrieval metrics and the evaluation report rank by the dot products of two matrices. An
embedding model gives its L2-normalised embeddings (``imtext.train.features``). The similarity
network has no embedding; it scores every image-sentence pair, and the (N_img, N_txt) score matrix
``S`` is handed on as ``(S, I)`` with ``I`` the (N_txt, N_txt) identity: ``S @ I.T`` is ``S``
exactly (each product adds zeros to one ``S[i, j] * 1``), and ``I @ S.T`` is its transpose, so
every ranking, fold and report query of the embedding path works unchanged on the scores. It costs
N_txt^2 floats (100 MB for 5,000 captions, 2.5 GB for COCO's 25,000).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from imtext.data.datasets import ImageDataset, eval_transform
from imtext.data.store import PreparedSplit
from imtext.errors import ConfigError
from imtext.models.dual_path import DualPathModel
from imtext.models.methods import SimilarityModel
from imtext.train.features import embed_captions, embed_images


def retrieval_inputs(
    model: DualPathModel,
    split: PreparedSplit,
    image_size: int,
    device: torch.device,
    image_batch: int = 128,
    caption_batch: int = 512,
    flip_average: bool = False,
    shift_average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N_img, D), texts (N_txt, D))``, float32 on the CPU, whose products
    ``images @ texts.T`` are the model's (N_img, N_txt) scores: embeddings, or ``(S, I)`` for the
    similarity network (module docstring)."""
    if not isinstance(model, SimilarityModel):
        images = embed_images(model, split, image_size, device, image_batch, flip_average)
        return images, embed_captions(model, split, device, caption_batch, shift_average)
    if flip_average or shift_average:
        raise ConfigError(
            "flip_average / shift_average: the test-time averaging of embeddings does not apply "
            "to the similarity network, which scores pairs; set both to false"
        )
    scores = score_split(model, split, image_size, device, image_batch, caption_batch)
    return scores, torch.eye(scores.shape[1], dtype=scores.dtype)


@torch.no_grad()
def score_split(
    model: SimilarityModel,
    split: PreparedSplit,
    image_size: int,
    device: torch.device,
    image_batch: int = 128,
    caption_batch: int = 512,
) -> torch.Tensor:
    """Scores (N_img, N_txt) float32 on the CPU of every image of ``split`` with every caption.

    Each encoder runs once per item; only the fusion runs per pair, in blocks
    (:meth:`SimilarityModel.score_matrix`).
    """
    model.eval()
    loader = DataLoader(ImageDataset(split, eval_transform(image_size)), batch_size=image_batch)
    images = [model.image_features(batch.to(device)) for batch, _ in loader]
    texts = [
        model.text_features(
            torch.from_numpy(split.tokens[i : i + caption_batch].astype(np.int64)).to(device)
        )
        for i in range(0, split.n_captions, caption_batch)
    ]
    if not images or not texts:
        return torch.zeros(split.n_images, split.n_captions)
    return model.score_matrix(torch.cat(images), torch.cat(texts)).float().cpu()
