"""The two-branch samplers of imtext.train.sampling: what a neighbourhood batch contains, epoch
coverage and determinism, and the similarity network's negative pairs.
(``sample_candidates`` is tested in test_train_parts.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from imtext.errors import DataError
from imtext.train.sampling import (
    NeighbourhoodBatch,
    neighbourhood_batches,
    sample_negative_pairs,
)


def caption_image_for(counts: dict[int, int], seed: int = 0) -> np.ndarray:
    """Captions of images ``{row: count}``, in a shuffled order (not grouped by image)."""
    rows = np.array([row for row, n in counts.items() for _ in range(n)], dtype=np.int64)
    return rows[np.random.default_rng(seed).permutation(len(rows))]


# Image 4 has no caption; 2 has one; 5 has more than 2 * sentences_per_image; 9 has exactly 2.
COUNTS = {0: 5, 1: 5, 2: 1, 3: 2, 5: 7, 6: 3, 7: 5, 8: 4, 9: 2, 10: 5, 11: 6}


def check_batch(batch: NeighbourhoodBatch, caption_image, images_per_batch, k) -> None:
    counts = np.bincount(caption_image)
    assert isinstance(batch, NeighbourhoodBatch)
    for array in batch:
        assert array.dtype == np.int64
    assert len(batch.images) == images_per_batch
    assert len(set(batch.images.tolist())) == images_per_batch  # no image twice
    assert np.array_equal(caption_image[batch.captions], batch.images[batch.caption_slot])
    # Captions are grouped by slot, in slot order.
    assert np.array_equal(batch.caption_slot, np.sort(batch.caption_slot, kind="stable"))
    for slot, image in enumerate(batch.images.tolist()):
        mine = batch.captions[batch.caption_slot == slot]
        assert len(mine) == min(k, counts[image])  # exactly k, or all it has if fewer
        assert len(set(mine.tolist())) == len(mine)  # distinct captions


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("images_per_batch", "k"), [(3, 2), (4, 3), (2, 1), (10, 5), (5, 10)])
def test_every_batch_holds_distinct_images_with_k_captions_each(seed, images_per_batch, k):
    caption_image = caption_image_for(COUNTS, seed)
    batches = neighbourhood_batches(np.random.default_rng(seed), caption_image, images_per_batch, k)
    assert batches
    for batch in batches:
        check_batch(batch, caption_image, images_per_batch, k)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("images_per_batch", "k"), [(3, 2), (4, 3), (2, 1), (10, 5)])
def test_an_epoch_uses_every_caption_and_never_an_image_without_captions(seed, images_per_batch, k):
    caption_image = caption_image_for(COUNTS, seed)
    batches = neighbourhood_batches(np.random.default_rng(seed), caption_image, images_per_batch, k)
    used = np.concatenate([b.captions for b in batches])
    assert set(used.tolist()) == set(range(len(caption_image)))
    assert 4 not in np.concatenate([b.images for b in batches]).tolist()
    # Each image appears at least ceil(n / k) times: its groups, plus any filling of short batches.
    groups = sum(math.ceil(n / min(k, n)) for n in COUNTS.values())
    assert len(batches) >= math.ceil(groups / images_per_batch)
    for image, n in COUNTS.items():
        seen = sum(int((b.images == image).sum()) for b in batches)
        assert seen >= math.ceil(n / min(k, n))


def test_when_nothing_waits_or_repeats_an_epoch_is_each_caption_exactly_once():
    # Every image has k = 2 captions (one group each) and 12 images fill 3 batches of 4.
    caption_image = caption_image_for({i: 2 for i in range(12)}, 1)
    batches = neighbourhood_batches(np.random.default_rng(3), caption_image, 4, 2)
    assert len(batches) == 3
    assert sorted(np.concatenate([b.captions for b in batches]).tolist()) == list(range(24))


def test_captions_are_only_repeated_to_complete_an_image_s_last_group():
    # 5 captions, 2 per group: groups {a, b}, {c, d}, {e, a-or-b}: each image shows 6 captions.
    caption_image = caption_image_for({i: 5 for i in range(8)}, 2)
    batches = neighbourhood_batches(np.random.default_rng(0), caption_image, 4, 2)
    checked = 0
    for image in range(8):
        shown = np.concatenate([b.captions[caption_image[b.captions] == image] for b in batches])
        if len(shown) == 6:  # not topped up by a short last batch
            values, times = np.unique(shown, return_counts=True)
            assert len(values) == 5 and sorted(times.tolist()) == [1, 1, 1, 1, 2]
            checked += 1
    assert checked >= 4


def test_one_image_with_many_captions_never_shares_a_batch_with_itself():
    caption_image = caption_image_for({0: 20, 1: 2, 2: 2, 3: 1}, 4)
    batches = neighbourhood_batches(np.random.default_rng(5), caption_image, 3, 2)
    for batch in batches:
        check_batch(batch, caption_image, 3, 2)
    assert sum(int((b.images == 0).sum()) for b in batches) >= 10
    assert set(np.concatenate([b.captions for b in batches]).tolist()) == set(range(25))


def test_the_same_seed_gives_the_same_epoch_and_another_seed_another():
    caption_image = caption_image_for(COUNTS)

    def epoch(seed):
        return neighbourhood_batches(np.random.default_rng(seed), caption_image, 3, 2)

    a, b, c = epoch(7), epoch(7), epoch(8)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            assert np.array_equal(u, v)
    flat = [np.concatenate([batch.captions for batch in e]) for e in (a, c)]
    assert not np.array_equal(*flat)


def test_the_sampler_does_not_touch_its_input():
    caption_image = caption_image_for(COUNTS)
    before = caption_image.copy()
    neighbourhood_batches(np.random.default_rng(0), caption_image, 3, 2)
    assert np.array_equal(caption_image, before)


def test_neighbourhood_batches_reject_bad_arguments():
    caption_image = caption_image_for({0: 2, 1: 2})
    with pytest.raises(DataError, match="lower the batch size"):
        neighbourhood_batches(np.random.default_rng(0), caption_image, 3, 2)
    with pytest.raises(ValueError, match="at least 1"):
        neighbourhood_batches(np.random.default_rng(0), caption_image, 2, 0)
    with pytest.raises(ValueError, match="integer"):
        neighbourhood_batches(np.random.default_rng(0), caption_image.astype(float), 2, 2)


# ----------------------------------------------------------------------- sample_negative_pairs


def test_negative_pairs_are_distinct_rows_of_other_labels():
    labels = np.array([0, 1, 0, 2, 3, 3, 4])
    pairs = sample_negative_pairs(np.random.default_rng(0), labels, 3)
    assert pairs.shape == (7, 3) and pairs.dtype == np.int64
    for i, row in enumerate(pairs):
        assert len(set(row.tolist())) == 3
        assert all(labels[j] != labels[i] for j in row)


def test_negative_pairs_reach_every_valid_row_and_are_reproducible():
    labels = np.array([0, 1, 0, 2, 3])
    seen = set()
    for seed in range(200):
        seen.update(sample_negative_pairs(np.random.default_rng(seed), labels, 1)[0].tolist())
    assert seen == {1, 3, 4}
    a = sample_negative_pairs(np.random.default_rng(9), labels, 2)
    assert np.array_equal(a, sample_negative_pairs(np.random.default_rng(9), labels, 2))


def test_negative_pairs_need_enough_rows_of_other_labels():
    with pytest.raises(DataError, match=r"rows \[0, 2\]"):
        sample_negative_pairs(np.random.default_rng(0), np.array([0, 1, 0, 2]), 3)
    with pytest.raises(ValueError, match="per_positive"):
        sample_negative_pairs(np.random.default_rng(0), np.array([0, 1]), 0)
