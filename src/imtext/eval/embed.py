"""What retrieval ranks, for a model of any method: embeddings of whole splits, or the scores
of every pair.

Retrieval metrics and the evaluation report rank by the dot products of two matrices. An
embedding model gives its L2-normalised embeddings (:func:`embed_images`, :func:`embed_captions`),
with the paper's optional test-time averaging:

- images: the embedding of the image plus that of its horizontal flip, summed and L2-normalised;
- captions: the embeddings of every position of the words inside the window (the training shift),
  summed and L2-normalised.

Both are off by default (the flip is wrong for captions that say left and right, and the shifts
cost up to L forward passes per caption).

The similarity network has no embedding; it scores every image-sentence pair
(:func:`score_split`), and the (N_img, N_txt) score matrix ``S`` is handed on as ``(S, I)`` with
``I`` the (N_txt, N_txt) identity: ``S @ I.T`` is ``S`` exactly (each product adds zeros to one
``S[i, j] * 1``), and ``I @ S.T`` is its transpose, so every ranking, fold and report query of the
embedding path works unchanged on the scores. It costs N_txt^2 floats (100 MB for 5,000 captions,
2.5 GB for COCO's 25,000).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from imtext.data.datasets import ImageDataset, eval_transform
from imtext.data.store import PreparedSplit
from imtext.data.text import shift_tokens
from imtext.errors import ConfigError
from imtext.models.dual_path import DualPathModel
from imtext.models.methods import SimilarityModel


@torch.no_grad()
def embed_images(
    model: DualPathModel,
    split: PreparedSplit,
    image_size: int,
    device: torch.device,
    batch_size: int = 128,
    flip_average: bool = False,
    workers: int = 0,
) -> torch.Tensor:
    """All images of ``split`` in row order -> (N, D) float32 on the CPU, L2-normalised."""
    model.eval()
    loader = DataLoader(
        ImageDataset(split, eval_transform(image_size)), batch_size=batch_size, num_workers=workers
    )
    chunks = []
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        emb = model.encode_image(images)
        if flip_average:
            emb = F.normalize(emb + model.encode_image(images.flip(3)), dim=1)
        chunks.append(emb.float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def caption_shifts(tokens: np.ndarray, length: int) -> np.ndarray:
    """Every placement of a caption's words in its window: (L - length + 1, L)."""
    window = len(tokens)
    return np.stack([shift_tokens(tokens, length, offset) for offset in range(window - length + 1)])


@torch.no_grad()
def embed_captions(
    model: DualPathModel,
    split: PreparedSplit,
    device: torch.device,
    batch_size: int = 512,
    shift_average: bool = False,
) -> torch.Tensor:
    """All captions of ``split`` in order -> (M, D) float32 on the CPU, L2-normalised."""
    model.eval()
    chunks = []
    for start in range(0, split.n_captions, batch_size):
        rows = split.tokens[start : start + batch_size].astype(np.int64)
        if not shift_average:
            chunks.append(model.encode_text(torch.from_numpy(rows).to(device)).float().cpu())
            continue
        lengths = split.lengths[start : start + batch_size]
        for row, length in zip(rows, lengths, strict=True):
            placed = torch.from_numpy(caption_shifts(row, int(length))).to(device)
            summed = model.encode_text(placed).sum(0, keepdim=True)
            chunks.append(F.normalize(summed, dim=1).float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


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
