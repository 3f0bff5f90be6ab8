"""The training-step pieces of the methods besides the paper's (issue 6), used by ``loop.py``.

- VSE++: ``ranking: batch_hardest``, ``loss_weights: [1, 0, 0]``; the hardest in-batch negative.
- InfoNCE: ``ranking: infonce``; symmetric in-batch InfoNCE with a learned temperature.
- modality-adversarial (seed 002): ``adversarial_weight > 0`` with ``model.discriminator_dims``;
  any embedding loss plus the discriminator's loss behind a gradient reversal.
- two-branch embedding (seed 003): ``model.method: two_branch``, ``ranking: topk``,
  ``sentences_per_image > 1`` (neighbourhood sampling); top-K bidirectional ranking plus the
  neighbourhood constraint.
- two-branch similarity (seed 003): ``model.method: similarity``, ``ranking: logistic``; the
  logistic loss on positive and sampled negative pairs.

The ranking term is weighted by ``loss_weights[0]`` like the paper's, and the instance loss stays
available to every method through the other two weights.

A batch holds B images and T captions; ``caption_slot`` (T,) gives the row of each caption's image
(``None``: caption ``i`` belongs to image ``i``, T = B). The losses that compare pairs row by row
(``batch_*``, ``infonce``) see image ``caption_slot[t]`` next to caption ``t``, with instance labels
so that two captions of one image are never each other's negatives.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from imtext.config import TrainConfig
from imtext.data.store import PreparedSplit
from imtext.data.text import random_shift
from imtext.losses import (
    adversarial_lambda,
    grad_reverse,
    infonce_loss,
    neighbourhood_loss,
    ranking_loss,
    similarity_loss,
    topk_ranking_loss,
)
from imtext.train.sampling import NeighbourhoodBatch, neighbourhood_batches, sample_negative_pairs


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W)
    tokens: torch.Tensor  # (T, L): texts in the order the loss expects
    image_labels: torch.Tensor  # (B,)
    text_labels: torch.Tensor  # (T,)
    #: (T,) int64 row in ``images`` of each caption's image; None: caption i is image i's (T = B).
    caption_slot: torch.Tensor | None = None
    #: ``logistic``: (P, 2) int64 (image row, caption row) pairs, the T positives first.
    pairs: torch.Tensor | None = None
    #: ``logistic``: (P,) +1 for a matching pair, -1 for a sampled negative.
    pair_targets: torch.Tensor | None = None

    def slot(self) -> torch.Tensor:
        """``caption_slot``, or ``arange(T)`` when each caption belongs to the image of its row."""
        if self.caption_slot is not None:
            return self.caption_slot
        return torch.arange(len(self.tokens))


# ------------------------------------------------------------------------------- the losses


def ranking_term(
    out, batch: Batch, cfg: TrainConfig, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ranking term of ``cfg.ranking`` (not ``paired_*``) and the parts worth logging.

    ``out`` is the model's :class:`~imtext.models.dual_path.MethodOutput` (or the plain dual-path
    output): embeddings (B, E) and (T, E), L2-normalised, and for ``infonce`` / ``logistic`` the
    log-scale and the pair scores.
    """
    image_emb, text_emb = out.image_emb.float(), out.text_emb.float()
    labels = batch.text_labels.to(device)
    if cfg.ranking == "logistic":
        loss = similarity_loss(out.pair_scores.float(), batch.pair_targets.to(device))
        return loss, {}
    slot = batch.slot().to(device)
    if cfg.ranking == "topk":
        return topk_term(image_emb, text_emb, slot, batch.image_labels.to(device), cfg)
    paired_images = image_emb if batch.caption_slot is None else image_emb[slot]
    if cfg.ranking == "infonce":
        log_scale = out.log_scale.float()
        loss = infonce_loss(paired_images, text_emb, log_scale, labels=labels)
        return loss, {"temperature": (-log_scale).exp().detach()}
    hardest = cfg.ranking == "batch_hardest"
    return ranking_loss(paired_images, text_emb, cfg.margin, hardest=hardest, labels=labels), {}


def topk_term(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    slot: torch.Tensor,
    image_labels: torch.Tensor,
    cfg: TrainConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The two-branch embedding loss: ``w_t2i * image_term + w_i2t * sentence_term +
    neighbour_weight * neighbourhood`` (official weights 1.5, 1, 0.05), with its parts.

    ``image_emb`` (B, E), ``text_emb`` (T, E) L2-normalised; ``slot`` (T,) each caption's image row.
    """
    image_term, sentence_term = topk_ranking_loss(
        image_emb, text_emb, slot, cfg.margin, cfg.top_k, image_labels=image_labels
    )
    w_t2i, w_i2t = cfg.direction_weights
    loss = w_t2i * image_term + w_i2t * sentence_term
    parts = {"rank_t2i": image_term, "rank_i2t": sentence_term}
    if cfg.neighbour_weight > 0:
        neighbour = neighbourhood_loss(
            text_emb, slot, cfg.margin, cfg.top_k, image_labels=image_labels
        )
        loss = loss + cfg.neighbour_weight * neighbour
        parts["neighbour"] = neighbour
    return loss, parts


def reversal_coefficient(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """The gradient-reversal λ at global ``step`` (0-based) of a stage.

    0 during the ``adversarial_warmup_epochs`` (the discriminator learns alone), then
    :func:`~imtext.losses.adversarial_lambda` of the progress through the remaining steps, rising
    to ``adversarial_lambda``. A function of the step count only, so a resumed run continues the
    ramp where it stopped.
    """
    warm = cfg.adversarial_warmup_epochs * steps_per_epoch
    if step < warm:
        return 0.0
    remaining = max(1, cfg.epochs * steps_per_epoch - warm)
    return adversarial_lambda(min(1.0, (step - warm) / remaining), cfg.adversarial_lambda)


def forward_kwargs(batch: Batch, cfg: TrainConfig, has_discriminator: bool, lam: float) -> dict:
    """What the model's forward needs besides images and tokens: the gradient reversal in front
    of the discriminator, the pairs to score. Empty for the paper's model (forward unchanged)."""
    kwargs: dict = {}
    if has_discriminator:
        kwargs["reverse"] = functools.partial(grad_reverse, lambd=lam)
    if batch.pairs is not None:
        kwargs["pairs"] = batch.pairs
    return kwargs


# ------------------------------------------------------------------------------- the batches


def with_negative_pairs(batch: Batch, per_positive: int, rng: np.random.Generator) -> Batch:
    """``batch`` with the similarity network's pairs: each caption ``t`` with its image (+1), and
    the same image with ``per_positive`` captions of other instances drawn in the batch (-1).

    P = T * (1 + per_positive) pairs; positives first, then each caption's negatives in turn.
    """
    slot = batch.slot()
    negatives = torch.from_numpy(
        sample_negative_pairs(rng, batch.text_labels.numpy(), per_positive)
    )  # (T, per_positive) caption rows
    rows = torch.arange(len(slot))
    positive = torch.stack([slot, rows], dim=1)
    negative = torch.stack([slot.repeat_interleave(per_positive), negatives.reshape(-1)], dim=1)
    targets = torch.cat([torch.ones(len(slot)), -torch.ones(len(negative))])
    return Batch(
        batch.images, batch.tokens, batch.image_labels, batch.text_labels, batch.caption_slot,
        torch.cat([positive, negative]), targets,
    )  # fmt: skip


def rank_share(batches: list, rank: int, world_size: int) -> list:
    """This process's batches: every ``world_size``-th, the same number on every process."""
    usable = len(batches) // world_size * world_size
    return batches[rank:usable:world_size]


def epoch_neighbourhood_batches(
    train: PreparedSplit, cfg: TrainConfig, seed: int, rank: int, world_size: int
) -> list[NeighbourhoodBatch]:
    """One epoch of neighbourhood batches (``batch_size`` images, up to ``sentences_per_image``
    captions each), drawn from ``seed`` alike on every process, then shared out by rank."""
    batches = neighbourhood_batches(
        np.random.default_rng(seed), train.caption_image, cfg.batch_size, cfg.sentences_per_image
    )
    return rank_share(batches, rank, world_size)


class NeighbourhoodDataset(Dataset):
    """Item ``i`` is the whole ``i``-th neighbourhood batch (load it with ``batch_size=None``):

    ``{"image": (B, 3, S, S), "tokens": (T, L) int64, "label": (B,), "caption_slot": (T,),
    "index": (B,)}``: the batch's images augmented, their captions (position-shifted when
    ``shift``), the images' instance labels and each caption's image row in the batch.
    Text shifts draw from ``(seed, i)``, so an item is the same whichever worker loads it.
    """

    def __init__(
        self,
        split: PreparedSplit,
        transform: v2.Compose,
        shift: bool,
        batches: list[NeighbourhoodBatch],
        seed: int,
    ) -> None:
        self.split, self.transform, self.shift = split, transform, shift
        self.batches, self.seed = batches, seed

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.batches[i]
        rng = np.random.default_rng([self.seed, i])
        rows = self.split.tokens[batch.captions]
        if self.shift:
            lengths = self.split.lengths[batch.captions]
            rows = np.stack(
                [random_shift(r, int(n), rng) for r, n in zip(rows, lengths, strict=True)]
            )
        return {
            "image": torch.stack([self.transform(self.split.image(int(r))) for r in batch.images]),
            "tokens": torch.from_numpy(rows.astype(np.int64)),
            "label": torch.from_numpy(self.split.image_labels[batch.images].astype(np.int64)),
            "caption_slot": torch.from_numpy(batch.caption_slot),
            "index": torch.from_numpy(batch.images),
        }


def batch_of(items: dict[str, torch.Tensor]) -> Batch:
    """The :class:`Batch` of a loader item: one caption per image, or a neighbourhood batch."""
    labels = items["label"]
    slot = items.get("caption_slot")
    if slot is None:
        return Batch(items["image"], items["tokens"], labels, labels)
    return Batch(items["image"], items["tokens"], labels, labels[slot], slot)
