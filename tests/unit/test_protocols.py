from __future__ import annotations

import numpy as np
import pytest
import torch

from imtext.eval.metrics import reference_ranks, retrieval_metrics
from imtext.eval.protocols import PROTOCOLS, evaluate_protocol


def _coco_5k(rng, dim=8):
    """5,000 images with 1 to 7 captions each, in shuffled order (folds are not caption slices)."""
    per_image = rng.integers(1, 8, size=5000)
    text_to_image = np.repeat(np.arange(5000), per_image)
    rng.shuffle(text_to_image)
    images = rng.standard_normal((5000, dim)).astype(np.float32)
    texts = images[text_to_image] + rng.standard_normal((len(text_to_image), dim)).astype(
        np.float32
    )
    return images, texts, text_to_image


def test_coco_1k_is_the_mean_over_five_folds_of_1000_images():
    images, texts, text_to_image = _coco_5k(np.random.default_rng(0))
    folds = []
    for fold in range(5):
        lo, hi = 1000 * fold, 1000 * (fold + 1)
        captions = (text_to_image >= lo) & (text_to_image < hi)
        folds.append(
            retrieval_metrics(images[lo:hi], texts[captions], text_to_image[captions] - lo)
        )
    expected = {key: np.mean([f[key] for f in folds]) for key in folds[0]}
    got = evaluate_protocol(images, texts, text_to_image, "coco_1k")
    assert got == pytest.approx(expected)
    assert list(got) == list(folds[0])
    as_tensors = evaluate_protocol(
        torch.from_numpy(images),
        torch.from_numpy(texts),
        torch.from_numpy(text_to_image),
        "coco_1k",
    )
    assert as_tensors == pytest.approx(expected)
    # 1K galleries are easier than the 5K one: no query ranks worse in its fold than in all 5K
    full = evaluate_protocol(images, texts, text_to_image, "full")
    assert got["t2i_r1"] >= full["t2i_r1"] and got["t2i_meanr"] <= full["t2i_meanr"]


@pytest.mark.parametrize("n_images", [4999, 1000, 10000])
def test_coco_1k_needs_exactly_5000_images(n_images):
    images = np.zeros((n_images, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="5,000-image COCO 5K test split"):
        evaluate_protocol(images, images, np.arange(n_images), "coco_1k")


def test_coco_1k_rejects_image_ids_and_out_of_range_ids():
    images = np.zeros((5000, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="do not pass image_ids"):
        evaluate_protocol(images, images, np.arange(5000), "coco_1k", image_ids=np.arange(5000))
    with pytest.raises(ValueError, match=r"\[0, 5000\)"):
        evaluate_protocol(images, images, np.arange(1, 5001), "coco_1k")


def test_cuhk_uses_identity_hits_and_requires_image_ids():
    rng = np.random.default_rng(1)
    image_ids = np.repeat(np.arange(40), 3)
    text_to_image = np.repeat(np.arange(40), 5)
    images = rng.standard_normal((120, 4))
    texts = rng.standard_normal((200, 4))
    got = evaluate_protocol(images, texts, text_to_image, "cuhk", image_ids=image_ids)
    assert got == retrieval_metrics(images, texts, text_to_image, image_ids=image_ids)
    assert {"t2i_r1", "t2i_r5", "t2i_r10"} <= set(got)
    with pytest.raises(ValueError, match="pass image_ids"):
        evaluate_protocol(images, texts, text_to_image, "cuhk")


def test_full_is_retrieval_metrics_on_the_whole_split():
    rng = np.random.default_rng(2)
    images, texts = rng.standard_normal((10, 3)), rng.standard_normal((23, 3))
    text_to_image = np.concatenate([np.arange(10), rng.integers(0, 10, 13)])
    got = evaluate_protocol(images, texts, text_to_image, "full")
    assert got == retrieval_metrics(images, texts, text_to_image)


def test_unknown_protocol_lists_the_valid_ones():
    images = np.eye(2)
    with pytest.raises(ValueError, match="unknown protocol 'coco_5k'.*full, coco_1k, cuhk"):
        evaluate_protocol(images, images, [0, 1], "coco_5k")
    assert PROTOCOLS == ("full", "coco_1k", "cuhk")


def _metrics_of_ranks(i2t, t2i, ks=(1, 5, 10)):
    """retrieval_metrics' keys computed from given ranks, the plain way."""
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out.update({f"{name}_r{k}": 100.0 * np.mean(ranks <= k) for k in ks})
    for stat, fn in (("medr", np.median), ("meanr", np.mean)):
        out.update({f"{name}_{stat}": float(fn(r)) for name, r in (("i2t", i2t), ("t2i", t2i))})
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


def test_cuhk_ties_between_people_count_against_the_query():
    # 30 people with 1-4 images each; person 7's first image duplicates person 3's first image,
    # so captions of either person tie with the other's image, and some captions duplicate
    # captions of other people. Integer embeddings: exact scores, many further ties.
    rng = np.random.default_rng(4)
    image_ids = np.repeat(np.arange(30), rng.integers(1, 5, 30)) + 500
    text_to_image = rng.choice(np.unique(image_ids), size=150)
    text_to_image[:30] = np.unique(image_ids)
    images = rng.integers(-2, 3, size=(len(image_ids), 6)).astype(np.float32)
    texts = rng.integers(-2, 3, size=(150, 6)).astype(np.float32)
    images[np.flatnonzero(image_ids == 507)[0]] = images[np.flatnonzero(image_ids == 503)[0]]
    texts[140:] = texts[:10]
    i2t, t2i = reference_ranks(images, texts, text_to_image, image_ids)
    got = evaluate_protocol(images, texts, text_to_image, "cuhk", image_ids=image_ids)
    assert got == pytest.approx(_metrics_of_ranks(i2t, t2i))
