"""Candidate captions for the paper's hard negative mining.

Before each Stage II step the paper scores 256 random captions of *other* training images against
the anchor images and takes the best-scoring one per anchor as its negative text. Captions of any
image in the batch are excluded, so a "negative" is never a caption of a batch image (nor, with
identity labels, of the same person).

Also the batch samplers of the two-branch networks: :func:`neighbourhood_batches` (several
sentences of each image in a batch, for the neighbourhood constraint) and
:func:`sample_negative_pairs` (the similarity network's negative pairs). All are pure functions of
numpy arrays and a seeded ``np.random.Generator``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

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


class NeighbourhoodBatch(NamedTuple):
    """One neighbourhood-sampled batch (two-branch embedding network): several sentences of each of its images.

    ``images`` (B,) int64 image rows, all distinct; ``captions`` (T,) int64 caption indices,
    grouped by image in the order of ``images``; ``caption_slot`` (T,) int64 the position in
    ``images`` of each caption's image, i.e. ``caption_image[captions] == images[caption_slot]``
    (the ``text_image`` argument of ``imtext.losses.neighbourhood``).
    """

    images: np.ndarray
    captions: np.ndarray
    caption_slot: np.ndarray


def neighbourhood_batches(
    rng: np.random.Generator,
    caption_image: np.ndarray,
    images_per_batch: int,
    sentences_per_image: int,
) -> list[NeighbourhoodBatch]:
    """One epoch of neighbourhood-sampled batches over the captions of ``caption_image`` (m,).

    Every image contributes ``k = min(sentences_per_image, its caption count)`` distinct captions
    whenever it is in a batch: images with fewer captions than asked for bring all of them. The
    epoch covers every caption at least once, in the fewest appearances that do:

    1. each image's captions are shuffled and cut into ``ceil(n / k)`` groups of ``k``; the last
       group is completed with the image's first captions, so a few captions repeat;
    2. the groups are shuffled and packed in order into batches of ``images_per_batch`` groups; a
       group whose image is already in the batch waits for the next batch, so no image appears
       twice in a batch;
    3. the last batch, when short, is filled with groups of random other images (repeats).

    So every batch holds exactly ``images_per_batch`` distinct images, and the same ``rng`` state
    gives the same epoch. Images with no caption never appear. The official code instead draws each
    batch from shuffled captions, each with one other caption of its image, so an image could be its
    own negative in a batch (METHODS.md section 3.1).
    """
    caption_image = _checked_caption_image(caption_image, images_per_batch, sentences_per_image)
    images, counts = np.unique(caption_image, return_counts=True)
    if len(images) < images_per_batch:
        raise DataError(
            f"neighbourhood sampling needs {images_per_batch} images with captions per batch, but "
            f"the split has {len(images)}; lower the batch size"
        )
    groups = _CaptionGroups.of(rng, caption_image, images, counts, sentences_per_image)
    return [groups.batch(b) for b in _packed(rng, groups.group_image.tolist(), images_per_batch)]


def _checked_caption_image(
    caption_image: np.ndarray, images_per_batch: int, sentences_per_image: int
) -> np.ndarray:
    caption_image = np.asarray(caption_image)
    if caption_image.ndim != 1 or not np.issubdtype(caption_image.dtype, np.integer):
        raise ValueError(f"caption_image must be a 1-d integer array, got {caption_image.dtype}")
    if images_per_batch < 1 or sentences_per_image < 1:
        raise ValueError(
            "images_per_batch and sentences_per_image must be at least 1, got "
            f"{images_per_batch} and {sentences_per_image}"
        )
    return caption_image


@dataclass(frozen=True)
class _CaptionGroups:
    """Each image's captions, shuffled and cut into groups of up to ``sentences_per_image``.

    Images are numbered in ``np.unique`` order; group ``g`` belongs to image ``group_image[g]`` and
    is that image's ``group_index[g]``-th group.
    """

    images: np.ndarray  # (I,) image rows that have captions
    by_image: np.ndarray  # (m,) caption indices grouped by image, shuffled within each image
    starts: np.ndarray  # (I,) where each image's captions start in ``by_image``
    counts: np.ndarray  # (I,) captions per image
    size: np.ndarray  # (I,) captions per group of each image
    group_image: np.ndarray  # (G,)
    group_index: np.ndarray  # (G,)

    @classmethod
    def of(
        cls,
        rng: np.random.Generator,
        caption_image: np.ndarray,
        images: np.ndarray,
        counts: np.ndarray,
        sentences_per_image: int,
    ) -> _CaptionGroups:
        """``images, counts``: ``np.unique(caption_image, return_counts=True)``."""
        shuffled = rng.permutation(len(caption_image))
        by_image = shuffled[np.argsort(caption_image[shuffled], kind="stable")]
        size = np.minimum(counts, sentences_per_image)
        n_groups = -(-counts // size)
        group_image = np.repeat(np.arange(len(images)), n_groups)
        first_group = np.repeat(np.cumsum(n_groups) - n_groups, n_groups)
        return cls(
            images, by_image, np.concatenate([[0], np.cumsum(counts)[:-1]]), counts, size,
            group_image, np.arange(len(group_image)) - first_group,
        )  # fmt: skip

    def members(self, group: int) -> np.ndarray:
        """The caption indices of ``group``. Position p of an image's padded list is its caption
        p % n: past the end it wraps to the first ones, which belong to an earlier group (the
        padding is shorter than a group)."""
        image = self.group_image[group]
        offsets = self.group_index[group] * self.size[image] + np.arange(self.size[image])
        return self.by_image[self.starts[image] + offsets % self.counts[image]]

    def batch(self, groups: list[int]) -> NeighbourhoodBatch:
        parts = [self.members(group) for group in groups]
        return NeighbourhoodBatch(
            images=self.images[self.group_image[groups]].astype(np.int64),
            captions=np.concatenate(parts).astype(np.int64),
            caption_slot=np.repeat(np.arange(len(groups)), [len(p) for p in parts]),
        )


def _packed(rng: np.random.Generator, image_of: list[int], per_batch: int) -> list[list[int]]:
    """The groups (``image_of[g]`` the image of group ``g``) shuffled and packed in order into
    batches of ``per_batch`` distinct images; the last batch completed with random groups."""
    pending = deque(rng.permutation(len(image_of)).tolist())
    batches: list[list[int]] = []
    while pending:
        batch = _take_distinct(pending, image_of, per_batch)
        if len(batch) < per_batch:
            batch = _completed(rng, batch, image_of, per_batch)
        batches.append(batch)
    return batches


def _take_distinct(pending: deque, image_of: list[int], per_batch: int) -> list[int]:
    """Up to ``per_batch`` groups of distinct images from the front of ``pending``; a group whose
    image was already taken stays at the front, in order, for the next batch."""
    batch: list[int] = []
    seen: set[int] = set()
    waiting: list[int] = []
    while pending and len(batch) < per_batch:
        group = pending.popleft()
        if image_of[group] in seen:
            waiting.append(group)
        else:
            batch.append(group)
            seen.add(image_of[group])
    pending.extendleft(reversed(waiting))
    return batch


def _completed(
    rng: np.random.Generator, batch: list[int], image_of: list[int], per_batch: int
) -> list[int]:
    """``batch`` filled up to ``per_batch`` with groups of random other images."""
    batch = list(batch)
    seen = {image_of[group] for group in batch}
    for group in rng.permutation(len(image_of)).tolist():
        if image_of[group] not in seen:
            batch.append(group)
            seen.add(image_of[group])
            if len(batch) == per_batch:
                break
    return batch


def sample_negative_pairs(
    rng: np.random.Generator, labels: np.ndarray, per_positive: int
) -> np.ndarray:
    """For each row ``i`` of a batch, ``per_positive`` distinct rows ``j`` with
    ``labels[j] != labels[i]``, uniformly at random: (B, per_positive) int64.

    The similarity network's negative pairs: row ``i``'s image with row ``j``'s sentence (B is a
    batch, so the (B, B) draw is cheap). Raises :class:`DataError` when some row has fewer than
    ``per_positive`` rows of another label.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-d, got shape {labels.shape}")
    if per_positive < 1:
        raise ValueError(f"per_positive must be at least 1, got {per_positive}")
    valid = labels[:, None] != labels[None, :]
    short = np.flatnonzero(valid.sum(1) < per_positive)
    if len(short):
        raise DataError(
            f"batch rows {short[:5].tolist()} have fewer than {per_positive} rows of another "
            "instance to pair with; lower the negatives per positive or raise the batch size"
        )
    # A random key per pair, the invalid ones last: the smallest keys are a uniform random subset.
    keys = np.where(valid, rng.random(valid.shape), np.inf)
    return np.argsort(keys, axis=1, kind="stable")[:, :per_positive].astype(np.int64)
