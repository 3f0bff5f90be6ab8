"""Embedding whole splits for retrieval, with the paper's optional test-time averaging.

Images: the embedding of the image plus that of its horizontal flip, summed and L2-normalised.
Captions: the embeddings of every position of the words inside the window (the training shift),
summed and L2-normalised. Both are off by default (the flip is wrong for captions that say left
and right, and the shifts cost up to L forward passes per caption).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from imtext.data.datasets import ImageDataset, eval_transform
from imtext.data.store import PreparedSplit
from imtext.data.text import shift_tokens
from imtext.models.dual_path import DualPathModel


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
