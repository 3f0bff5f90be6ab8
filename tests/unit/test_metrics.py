from __future__ import annotations

import numpy as np
import pytest
import torch

from imtext.eval import metrics as metrics_module
from imtext.eval.metrics import (
    Tiling,
    band_tiles,
    default_chunk_size,
    match_cells,
    matching_caption_runs,
    per_query_ranks,
    recall_curve,
    reference_ranks,
    retrieval_metrics,
)

# 3 images, 5 captions: image 0 has captions 0-2, images 1 and 2 have one each.
IMAGES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
TEXTS = torch.tensor(
    [[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64
)
TEXT_TO_IMAGE = [0, 0, 0, 1, 2]
# Scores (rows: images, columns: captions c0..c4), matches in brackets:
#   I0: [1]  [0]  [2]   1    0
#   I1:  0    1    0   [1]   2
#   I2:  1    1    2    2   [2]
# i2t: I0 best match 2, no non-match >= 2 -> 1; I1 best 1, c1 and c4 >= 1 -> 3;
#      I2 best 2, c2 and c3 tie it -> 3 (ties count against the query).
# t2i (columns): c0 best 1, I2 ties -> 2; c1 best 0, I1 and I2 -> 3; c2 best 2, I2 ties -> 2;
#      c3 best 1, I0 ties and I2 beats -> 3; c4 best 2, I1 ties -> 2.
HAND_I2T = [1, 3, 3]
HAND_T2I = [2, 3, 2, 3, 2]


def test_hand_computed_ranks_and_metrics():
    i2t, t2i = per_query_ranks(IMAGES, TEXTS, TEXT_TO_IMAGE)
    assert i2t.tolist() == HAND_I2T and t2i.tolist() == HAND_T2I
    assert i2t.dtype == t2i.dtype == np.int64
    metrics = retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE, ks=(1, 5))
    assert metrics == pytest.approx(
        {
            "i2t_r1": 100 / 3,
            "i2t_r5": 100.0,
            "t2i_r1": 0.0,
            "t2i_r5": 100.0,
            "i2t_medr": 3.0,
            "t2i_medr": 2.0,
            "i2t_meanr": 7 / 3,
            "t2i_meanr": 12 / 5,
            "rsum": 100 / 3 + 200,
        }
    )
    default = retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE)
    assert list(default) == [
        *("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"),
        *("i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr", "rsum"),
    ]
    assert default["rsum"] == pytest.approx(100 / 3 + 400)  # R@5 = R@10 = 100 both ways


def test_hand_computed_identity_hits():
    # Images 0 and 1 show the same person (id 0); image 2 is person 1.
    # i2t: I0 best over c0-c3 is 2, c4 = 0 -> 1; I1 best 1, c4 = 2 -> 2; I2 best 2, c2, c3 tie -> 3.
    # t2i: every caption's best matching image is tied by exactly one other-person image -> 2.
    i2t, t2i = per_query_ranks(IMAGES, TEXTS, [0, 0, 0, 0, 1], image_ids=[0, 0, 1])
    assert i2t.tolist() == [1, 2, 3]
    assert t2i.tolist() == [2, 2, 2, 2, 2]


def test_median_rank_of_an_even_number_of_queries_is_the_mean_of_the_middle_two():
    # I0 scores c0 = 1, c1 = 1 (tie with a non-match) -> 2; I1 scores c0 = 0, c1 = 1 -> 1.
    metrics = retrieval_metrics([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]], [0, 1])
    assert metrics["i2t_medr"] == 1.5
    assert metrics["i2t_r1"] == 50.0


def test_collapsed_model_gets_the_worst_ranks():
    text_to_image = np.array([0, 0, 1, 2, 2, 2, 3])
    same = torch.ones(4, 8), torch.ones(7, 8)
    i2t, t2i = per_query_ranks(*same, text_to_image)
    captions_per_image = np.bincount(text_to_image)
    assert i2t.tolist() == (1 + 7 - captions_per_image).tolist()
    assert t2i.tolist() == [4] * 7
    metrics = retrieval_metrics(*same, text_to_image, ks=(1,))
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 0.0


def _random_case(rng, n_img, n_txt, dim, n_ids=None, duplicates=0):
    """Quantised embeddings (many exact ties), uneven captions per image, optional identities."""
    images = rng.integers(-2, 3, size=(n_img, dim)).astype(np.float64)
    texts = rng.integers(-2, 3, size=(n_txt, dim)).astype(np.float64)
    texts[:duplicates] = texts[-duplicates:] if duplicates else texts[:0]
    if n_ids is None:
        image_ids = None
        ids = np.arange(n_img)
    else:
        image_ids = rng.integers(100, 100 + n_ids, size=n_img)
        ids = np.unique(image_ids)
    # every id gets a caption, the rest go to random images: uneven counts
    text_to_image = np.concatenate([ids, rng.choice(ids, size=n_txt - len(ids))])
    rng.shuffle(text_to_image)
    return images, texts, text_to_image, image_ids


@pytest.mark.parametrize(
    ("n_img", "n_txt", "dim", "n_ids", "chunk_sizes"),
    [
        (1, 1, 3, None, (1, None)),
        (1, 4, 2, None, (1, 3)),
        (7, 13, 2, None, (1, 3, 5, None)),
        (20, 57, 3, None, (1, 6, 19, 100, None)),
        (33, 100, 8, None, (7, None)),
        (30, 71, 3, 9, (1, 4, None)),
        (25, 40, 2, 25, (3, None)),
    ],
)
def test_fast_ranks_equal_the_reference_loop(n_img, n_txt, dim, n_ids, chunk_sizes):
    rng = np.random.default_rng(n_img * 1000 + n_txt)
    images, texts, text_to_image, image_ids = _random_case(
        rng, n_img, n_txt, dim, n_ids, duplicates=min(3, n_txt // 2)
    )
    expected = reference_ranks(images, texts, text_to_image, image_ids)
    for chunk_size in chunk_sizes:
        got = per_query_ranks(images, texts, text_to_image, image_ids, chunk_size=chunk_size)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


def test_duplicate_images_and_float32_tensors_equal_the_reference_loop():
    rng = np.random.default_rng(7)
    images, texts, text_to_image, _ = _random_case(rng, 12, 30, 4)
    images[6:] = images[:6]  # every image has a twin: t2i ties on every query
    images_t, texts_t = torch.from_numpy(images).float(), torch.from_numpy(texts).float()
    expected = reference_ranks(images_t, texts_t, torch.from_numpy(text_to_image))
    got = per_query_ranks(images_t, texts_t, torch.from_numpy(text_to_image), chunk_size=5)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert (got[1] >= 2).all()


def test_reference_can_rank_only_the_first_queries():
    rng = np.random.default_rng(3)
    images, texts, text_to_image, _ = _random_case(rng, 10, 25, 3)
    full = reference_ranks(images, texts, text_to_image)
    head = reference_ranks(images, texts, text_to_image, i2t_queries=4, t2i_queries=6)
    np.testing.assert_array_equal(head[0], full[0][:4])
    np.testing.assert_array_equal(head[1], full[1][:6])
    i2t_only = reference_ranks(images, texts, text_to_image, t2i_queries=0)
    np.testing.assert_array_equal(i2t_only[0], full[0])
    assert i2t_only[1].shape == (0,)


def test_recall_curve():
    np.testing.assert_allclose(recall_curve(np.array([1, 2, 2, 5]), 3), [25.0, 75.0, 75.0])
    np.testing.assert_allclose(recall_curve(np.array([9, 9]), 2), [0.0, 0.0])
    with pytest.raises(ValueError, match="1-based"):
        recall_curve(np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="max_k"):
        recall_curve(np.array([1]), 0)


def test_default_chunk_keeps_the_score_matrix_near_256_mib():
    assert default_chunk_size(500_000, 4) * 500_000 * 4 <= 256 * 2**20
    assert default_chunk_size(500_000, 4) >= 100
    assert default_chunk_size(10**12, 8) == 1


@pytest.mark.parametrize(
    ("images", "texts", "text_to_image", "image_ids", "message"),
    [
        (np.ones((3, 4)), np.ones((3, 5)), [0, 1, 2], None, "dimension 4 but text_emb has 5"),
        (np.ones((3, 4)), np.ones((3, 4)), [0, 1], None, r"text_to_image must have shape \(3,\)"),
        (np.ones((3, 4)), np.ones((3, 4)), [0, 1, 3], None, "1 of 3 captions .* caption 2 -> id 3"),
        (np.ones((3, 4)), np.ones((3, 4)), [0, 1, 2], [5, 6], r"image_ids must have shape \(3,\)"),
        (np.ones((3, 4)), np.ones((3, 4)), [5, 6, 9], [5, 6, 7], "id 9"),
        (np.ones((3, 4)), np.ones((2, 4)), [0, 1], None, "1 of 3 images have no matching caption"),
        (np.ones((3, 4)), np.ones((3, 4)), [0.0, 1.0, 2.0], None, "integer ids"),
        (np.ones(4), np.ones((3, 4)), [0, 1, 2], None, r"image_emb must have shape \(N, D\)"),
        (np.ones((0, 4)), np.ones((3, 4)), [0, 1, 2], None, "N >= 1"),
        (np.full((3, 4), np.nan), np.ones((3, 4)), [0, 1, 2], None, "image_emb contains NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(images, texts, text_to_image, image_ids, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(images, texts, text_to_image, image_ids=image_ids)
    with pytest.raises(ValueError, match=message):
        reference_ranks(images, texts, text_to_image, image_ids)


def test_bad_ks_and_chunk_size_raise():
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE, ks=(0, 5))
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE, ks=())
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE, chunk_size=0)


def test_numpy_and_mixed_dtype_inputs_give_the_same_ranks():
    expected = per_query_ranks(IMAGES, TEXTS, TEXT_TO_IMAGE)
    got = per_query_ranks(IMAGES.numpy().astype(np.float32), TEXTS, np.array(TEXT_TO_IMAGE))
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    ints = per_query_ranks(IMAGES.long(), TEXTS.long(), TEXT_TO_IMAGE)
    np.testing.assert_array_equal(ints[1], expected[1])


# --- the tiled single-GEMM path (issue 17) ---------------------------------------------------


def _twenty_bit_values(rng, n, dim):
    """float32 values +-[1, 2) with 20 significant bits: float32 products and sums round, but in
    float64 every score of dim <= 64 is exact (products are multiples of 2^-38 below 4)."""
    signs = rng.choice([-1.0, 1.0], size=(n, dim))
    return (signs * (1 + rng.integers(0, 2**19, size=(n, dim)) / 2**19)).astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
def test_twin_embeddings_tie_wherever_their_tiles_lie(seed):
    # Float32 scores are rounded here, so a twin ties its original only if both are scored by the
    # same arithmetic: the same tile shape and a position-independent kernel. The tail tile and
    # small chunk sizes put twins in different row blocks and column tiles.
    rng = np.random.default_rng(seed)
    n_img, dim = 23, 48
    text_to_image = np.repeat(np.arange(n_img), rng.integers(1, 5, n_img))
    rng.shuffle(text_to_image)
    images, texts = (
        _twenty_bit_values(rng, n_img, dim),
        _twenty_bit_values(rng, len(text_to_image), dim),
    )
    images[[22, 13, 9, 6]] = images[[0, 1, 2, 3]]
    texts[-3:] = texts[:3]
    images64, texts64 = images.astype(np.float64), texts.astype(np.float64)
    assert ((images @ texts.T).astype(np.float64) != images64 @ texts64.T).any()  # rounding occurs
    exact = reference_ranks(images64, texts64, text_to_image)
    for chunk_size in (1, 3, 5, 7, None):
        got = per_query_ranks(images, texts, text_to_image, chunk_size=chunk_size)
        np.testing.assert_array_equal(got[0], exact[0])
        np.testing.assert_array_equal(got[1], exact[1])
    # the twin of a caption's image ties with it, and ties count against the query
    assert (exact[1][text_to_image == 0] >= 2).all()


@pytest.mark.parametrize("seed", range(12))
def test_random_galleries_equal_the_reference_loop(seed):
    """Random shapes, 1 to 12 captions per image, unsorted ids, person identities every third
    seed; small integer embeddings, so scores are exact and ties are everywhere."""
    rng = np.random.default_rng(1000 + seed)
    n_img = int(rng.integers(1, 40))
    n_txt = n_img * int(rng.integers(1, 13))
    n_ids = int(rng.integers(1, n_img + 1)) if seed % 3 == 0 else None
    images, texts, text_to_image, image_ids = _random_case(
        rng, n_img, max(n_txt, n_ids or 0), int(rng.integers(1, 6)), n_ids, duplicates=2
    )
    expected = reference_ranks(images, texts, text_to_image, image_ids)
    for chunk_size in (None, 1, int(rng.integers(1, n_img + 1))):
        got = per_query_ranks(images, texts, text_to_image, image_ids, chunk_size=chunk_size)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("cache_bytes", [0, 8 * 8 * 8])
def test_band_tiles_beyond_the_cache_are_scored_again_with_the_same_ranks(monkeypatch, cache_bytes):
    rng = np.random.default_rng(5)
    images, texts, text_to_image, image_ids = _random_case(rng, 30, 90, 3, n_ids=12)
    expected = reference_ranks(images, texts, text_to_image, image_ids)
    monkeypatch.setattr(metrics_module, "BAND_CACHE_BYTES", cache_bytes)  # 0 or one 8x8 tile
    got = per_query_ranks(images, texts, text_to_image, image_ids, chunk_size=2)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_band_holds_every_matching_pair_and_match_cells_find_them():
    rng = np.random.default_rng(2)
    image_ids = np.sort(rng.integers(0, 15, size=40))
    text_ids = np.sort(np.concatenate([np.unique(image_ids), rng.choice(image_ids, 100)]))
    tiling = Tiling.for_sizes(len(image_ids), len(text_ids), 3, 4)
    assert tiling.rows % 8 == 0 and tiling.cols % 8 == 0
    start, stop = matching_caption_runs(image_ids, text_ids)
    band = band_tiles(start, stop, tiling)
    found = set()
    for block, tile in band:
        rows, cols = tiling.images_of(block), tiling.texts_of(tile)
        r, c = match_cells(start[rows], stop[rows], cols.start, cols.stop)
        found.update(zip((r + rows.start).tolist(), (c + cols.start).tolist(), strict=True))
    expected = set(zip(*np.nonzero(image_ids[:, None] == text_ids[None, :]), strict=True))
    assert found == {(int(r), int(c)) for r, c in expected}
    # each block's band is the run of column tiles between its first and last match, no more
    assert len(band) < 2 * len(range(0, len(image_ids), tiling.rows)) + len(text_ids) // tiling.cols


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_counts_stay_exact_past_256(dtype):
    # a collapsed model: 299 non-matching ties per query, more than bfloat16 counts exactly
    same = torch.ones(300, 4, dtype=dtype)
    i2t, t2i = per_query_ranks(same, same, np.arange(300))
    assert set(i2t.tolist()) == set(t2i.tolist()) == {300}
