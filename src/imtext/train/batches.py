"""The batches a training step sees: the epoch's loader and the batch built from each loader item.

A loader item is ``batch_size`` images with one caption each, or (``sentences_per_image > 1``) a
whole neighbourhood batch: several captions of each of its images. :func:`batch_of` turns an item
into a :class:`Batch`; :func:`mined_batch` and :func:`with_negative_pairs` build the batches of the
objectives that need more than the item (which objective needs which: ``imtext.train.objective``).

A batch holds B images and T captions; ``caption_slot`` (T,) gives the row of each caption's image
(``None``: caption ``i`` belongs to image ``i``, T = B). The losses that compare pairs row by row
(``batch_*``, ``infonce``) see image ``caption_slot[t]`` next to caption ``t``, with instance labels
so that two captions of one image are never each other's negatives.

Reproducibility: an epoch's loader draws from ``epoch_seed(seed, epoch)``, so an epoch replayed
after a resume sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from imtext.config import TrainConfig
from imtext.data.datasets import InstanceTrainDataset
from imtext.data.store import PreparedSplit
from imtext.data.text import random_shift
from imtext.losses import hardest_negative_indices
from imtext.models.dual_path import DualPathModel
from imtext.train import distributed
from imtext.train.sampling import (
    NeighbourhoodBatch,
    neighbourhood_batches,
    sample_candidates,
    sample_negative_pairs,
)


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


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, epoch, process)."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**31


# ---------------------------------------------------------------------- a step's batch


def batch_of(items: dict[str, torch.Tensor]) -> Batch:
    """The :class:`Batch` of a loader item: one caption per image, or a neighbourhood batch."""
    labels = items["label"]
    slot = items.get("caption_slot")
    if slot is None:
        return Batch(items["image"], items["tokens"], labels, labels)
    return Batch(items["image"], items["tokens"], labels, labels[slot], slot)


def mined_batch(
    core: DualPathModel,
    items: dict[str, torch.Tensor],
    train: PreparedSplit,
    cfg: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
    *,
    hardest: bool,
) -> Batch:
    """The paper's Stage II batch: images ``P + N``, texts ``P captions + one negative per P image``.

    Negatives come from ``candidate_pool`` random captions of images outside the batch; when
    ``hardest``, the one scoring highest against each anchor (the network in eval mode, no
    gradient), otherwise a random one.
    """
    images, tokens, labels = items["image"], items["tokens"], items["label"]
    half = len(labels) // 2
    candidates, candidate_labels = _candidate_captions(train, labels, cfg, rng)
    if hardest:
        chosen = _hardest(core, images[:half], labels[:half], candidates, candidate_labels, device)
    else:
        chosen = torch.arange(half)
    return Batch(
        images,
        torch.cat([tokens[:half], candidates[chosen]]),
        labels,
        torch.cat([labels[:half], candidate_labels[chosen]]),
    )


def _candidate_captions(
    train: PreparedSplit, labels: torch.Tensor, cfg: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``candidate_pool`` random captions of images outside the batch (position-shifted with
    ``text_shift``): their tokens (pool, L) and instance labels (pool,)."""
    pool = sample_candidates(rng, train.caption_labels, labels.numpy(), cfg.candidate_pool)
    rows = train.tokens[pool]
    if cfg.text_shift:
        rows = np.stack(
            [random_shift(r, int(n), rng) for r, n in zip(rows, train.lengths[pool], strict=True)]
        )
    return torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(train.caption_labels[pool])


def _hardest(
    core: DualPathModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """For each image, the row of the candidate scoring highest against it (network in eval mode,
    no gradient)."""
    was_training = core.training
    core.eval()
    with torch.no_grad():
        anchors = core.encode_image(images.to(device))
        scored = core.encode_text(candidates.to(device))
    core.train(was_training)
    return hardest_negative_indices(anchors, scored, labels, candidate_labels).cpu()


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


# ------------------------------------------------------------------------ the epoch's loader


#: Load cached items in the training process when training on the CPU (bench_train.py turns it
#: off to time worker processes instead).
IN_PROCESS_WHEN_CACHED = True


def epoch_loader(
    dataset: InstanceTrainDataset, cfg: TrainConfig, info: distributed.Dist, epoch: int
) -> DataLoader:
    """The loader of ``epoch``: shuffled images, or neighbourhood batches, this process's share."""
    generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
    if cfg.sentences_per_image > 1:
        return _neighbourhood_loader(dataset, cfg, info, epoch, generator)
    workers = cfg.workers
    if dataset.cached and info.device.type == "cpu" and IN_PROCESS_WHEN_CACHED:
        # On the CPU a cached item costs 0.15-0.3 ms, so a worker process only takes turns on the
        # cores with the step's threads (bench/README.md). In-process items draw what one worker
        # would have. On a GPU the step leaves the CPU free, and the workers keep it fed.
        workers = 0
        dataset.draw_as_worker_zero(loader_base_seed(epoch_seed(cfg.seed, epoch)))
    else:
        dataset.draw_as_worker_zero(None)
    if info.world_size > 1:
        sampler = DistributedSampler(
            dataset, info.world_size, info.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        generator=generator,
        pin_memory=info.device.type == "cuda",
        persistent_workers=False,
    )


def loader_base_seed(seed: int) -> int:
    """The base seed that a DataLoader whose generator is seeded with ``seed`` hands its workers
    (worker k seeds itself with base + k): the generator's first draw, made when an epoch's
    iterator is created, before the sampler draws its order."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def _neighbourhood_loader(
    dataset: InstanceTrainDataset,
    cfg: TrainConfig,
    info: distributed.Dist,
    epoch: int,
    generator: torch.Generator,
) -> DataLoader:
    """The epoch's neighbourhood batches (one loader item each), this process's share of them."""
    seed = epoch_seed(cfg.seed, epoch)  # without the rank: every process draws the same epoch
    batches = epoch_neighbourhood_batches(dataset.split, cfg, seed, info.rank, info.world_size)
    items = NeighbourhoodDataset(dataset.split, dataset.image, dataset.shift, batches, seed)
    return DataLoader(
        items,
        batch_size=None,
        shuffle=False,  # the batches come shuffled
        num_workers=cfg.workers,
        generator=generator,
        pin_memory=info.device.type == "cuda",
        persistent_workers=False,
    )


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
        image: Callable[[int], torch.Tensor],
        shift: bool,
        batches: list[NeighbourhoodBatch],
        seed: int,
    ) -> None:
        self.split, self.image, self.shift = split, image, shift
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
            "image": torch.stack([self.image(int(r)) for r in batch.images]),
            "tokens": torch.from_numpy(rows.astype(np.int64)),
            "label": torch.from_numpy(self.split.image_labels[batch.images].astype(np.int64)),
            "caption_slot": torch.from_numpy(batch.caption_slot),
            "index": torch.from_numpy(batch.images),
        }
