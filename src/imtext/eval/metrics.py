"""Retrieval metrics for image-text retrieval: per-query ranks, Recall@K, median and mean rank.

Scoring: the score of an (image, caption) pair is the dot product of their embeddings. Pass
L2-normalised embeddings to rank by cosine similarity.

Matching: every caption names the *id* of its ground-truth image (``text_to_image``). By default an
image's id is its row, so a caption matches exactly one image; with ``image_ids`` (e.g. CUHK-PEDES
person identities) a caption matches every image with the same id. Images may have any number of
captions (1 for one image, 7 for another). Input that cannot be ranked raises ``ValueError``:

* a caption whose id matches no image;
* an image with no matching caption (its image-to-text rank would be undefined; the error says how
  many there are; distractor images are not supported);
* embeddings that are not finite (a NaN score compares false with everything, which would rank
  every query first).

Rank (1-based) of a query = 1 + the number of NON-matching candidates whose score is >= the score of
the best matching candidate. Ties are broken against the query (pessimistic): a collapsed model that
gives every pair the same score ranks every query last among the non-matching candidates, not first.
Other matching candidates never push a query down: a query hits at K when ANY of its matches is in
the top K.

* ``{i2t,t2i}_r{k}``: percentage (0-100) of queries whose rank is <= k;
* ``{i2t,t2i}_medr``: the median rank with :func:`numpy.median` semantics, so an even number of
  queries gives the mean of the two middle ranks (2.5 is possible); ``_meanr``: the mean rank;
* ``rsum``: the sum of every R@K of both directions.

Memory: scores are computed one chunk of queries at a time (a ``chunk_size x n_candidates`` score
matrix on the device of the embeddings), so 100,000 images x 500,000 captions fits in a few GB. The
default chunk keeps one score matrix near 256 MiB; the masks and a masked copy made while ranking
it bring the peak to about 2.5 times that for float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SCORE_CHUNK_BYTES = 256 * 2**20
"""Size of one chunk's score matrix when ``chunk_size`` is not given."""

DIRECTIONS = ("i2t", "t2i")


def retrieval_metrics(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    text_to_image: torch.Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    image_ids: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@K (percent), median and mean rank of both directions, and their R@K sum.

    Args:
        image_emb: (N_img, D) image embeddings.
        text_emb: (N_txt, D) caption embeddings, on the same device.
        text_to_image: (N_txt,) integer id of each caption's ground-truth image.
        ks: the K of each Recall@K, positive integers.
        image_ids: (N_img,) integer id of each image; ``None`` means ``arange(N_img)``.
        chunk_size: queries scored at once; ``None`` sizes it from :data:`SCORE_CHUNK_BYTES`.

    Returns:
        ``i2t_r{k}`` and ``t2i_r{k}`` for each k, then ``i2t_medr``, ``t2i_medr``, ``i2t_meanr``,
        ``t2i_meanr`` and ``rsum``.
    """
    ks = _validated_ks(ks)
    ranks = dict(
        zip(
            DIRECTIONS,
            per_query_ranks(image_emb, text_emb, text_to_image, image_ids, chunk_size),
            strict=True,
        )
    )
    metrics: dict[str, float] = {}
    for direction in DIRECTIONS:
        curve = recall_curve(ranks[direction], max(ks))
        metrics.update({f"{direction}_r{k}": float(curve[k - 1]) for k in ks})
    for direction in DIRECTIONS:
        metrics[f"{direction}_medr"] = float(np.median(ranks[direction]))
    for direction in DIRECTIONS:
        metrics[f"{direction}_meanr"] = float(ranks[direction].mean())
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in DIRECTIONS for k in ks)
    return metrics


def per_query_ranks(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    text_to_image: torch.Tensor | np.ndarray | Sequence[int],
    image_ids: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """1-based rank of every query under the pessimistic tie rule (see the module docstring).

    Shapes as in :func:`retrieval_metrics`. Returns ``(i2t, t2i)``: int64 arrays of shape (N_img,)
    (each image querying the captions) and (N_txt,) (each caption querying the images).
    """
    images, texts = as_embedding_tensors(image_emb, text_emb)
    image_id_arr, text_id_arr = validated_ids(text_to_image, image_ids, len(images), len(texts))
    image_id_t = torch.from_numpy(image_id_arr).to(images.device)
    text_id_t = torch.from_numpy(text_id_arr).to(images.device)
    i2t = _chunked_ranks(images, texts, image_id_t, text_id_t, chunk_size)
    t2i = _chunked_ranks(texts, images, text_id_t, image_id_t, chunk_size)
    return i2t, t2i


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """Recall@1 .. Recall@max_k in percent, shape (max_k,), from 1-based ranks of shape (N,)."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or len(ranks) == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    if ranks.min() < 1:
        raise ValueError(f"ranks are 1-based, got a rank of {ranks.min()}")
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    # Ranks beyond max_k all land in one overflow bin, so the histogram stays max_k + 2 long.
    hits_at = np.bincount(np.minimum(ranks, max_k + 1), minlength=max_k + 2)[1 : max_k + 1]
    return 100.0 * np.cumsum(hits_at) / len(ranks)


def reference_ranks(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    text_to_image: torch.Tensor | np.ndarray | Sequence[int],
    image_ids: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    i2t_queries: int | None = None,
    t2i_queries: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Slow, plain definition of :func:`per_query_ranks`: one query at a time in numpy, on the CPU.

    The tests and the benchmark check the fast version against it. ``i2t_queries`` and
    ``t2i_queries`` rank only the first that many queries of that direction (the benchmark times
    subsets; 0 skips a direction); ``None`` ranks them all.
    """
    images, texts = (e.detach().cpu().numpy() for e in as_embedding_tensors(image_emb, text_emb))
    image_id_arr, text_id_arr = validated_ids(text_to_image, image_ids, len(images), len(texts))
    i2t = [
        _reference_rank(texts @ images[q], text_id_arr == image_id_arr[q])
        for q in range(len(images))[:i2t_queries]
    ]
    t2i = [
        _reference_rank(images @ texts[q], image_id_arr == text_id_arr[q])
        for q in range(len(texts))[:t2i_queries]
    ]
    return np.array(i2t, dtype=np.int64), np.array(t2i, dtype=np.int64)


def _reference_rank(scores: np.ndarray, is_match: np.ndarray) -> int:
    best_match = scores[is_match].max()
    non_matching_scores = scores[~is_match]
    return 1 + int(np.count_nonzero(non_matching_scores >= best_match))


def _chunked_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_ids: torch.Tensor,
    candidate_ids: torch.Tensor,
    chunk_size: int | None,
) -> np.ndarray:
    """Ranks of (N_q, D) queries among (N_c, D) candidates; ids (N_q,) and (N_c,). Returns (N_q,)."""
    if chunk_size is None:
        chunk_size = default_chunk_size(len(candidates), candidates.element_size())
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ranks = torch.empty(len(queries), dtype=torch.int64, device=queries.device)
    for start in range(0, len(queries), chunk_size):
        stop = start + chunk_size
        scores = queries[start:stop] @ candidates.T
        ranks[start:stop] = _ranks_from_scores(scores, query_ids[start:stop], candidate_ids)
    return ranks.cpu().numpy()


def _ranks_from_scores(
    scores: torch.Tensor, query_ids: torch.Tensor, candidate_ids: torch.Tensor
) -> torch.Tensor:
    """Ranks (C,) from a (C, N_c) score matrix; every query has at least one matching candidate."""
    non_matches = query_ids[:, None] != candidate_ids[None, :]
    best_match = scores.masked_fill(non_matches, -torch.inf).amax(dim=1, keepdim=True)
    # >= rather than >: a non-matching candidate tying the best match ranks above it (pessimistic).
    beaten_by = (scores >= best_match).logical_and_(non_matches).sum(dim=1)
    return 1 + beaten_by


def default_chunk_size(n_candidates: int, element_size: int) -> int:
    """Queries per chunk so that one (chunk, n_candidates) score matrix is <= SCORE_CHUNK_BYTES."""
    return max(1, SCORE_CHUNK_BYTES // max(1, n_candidates * element_size))


def as_embedding_tensors(
    image_emb: torch.Tensor | np.ndarray, text_emb: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_img, D) and (N_txt, D) floating tensors of one dtype on one device, checked finite."""
    images, texts = torch.as_tensor(image_emb), torch.as_tensor(text_emb)
    for name, emb in (("image_emb", images), ("text_emb", texts)):
        if emb.ndim != 2 or len(emb) == 0:
            raise ValueError(f"{name} must have shape (N, D) with N >= 1, got {tuple(emb.shape)}")
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image_emb has dimension {images.shape[1]} but text_emb has {texts.shape[1]}"
        )
    if images.device != texts.device:
        raise ValueError(f"image_emb is on {images.device} but text_emb is on {texts.device}")
    dtype = torch.promote_types(images.dtype, texts.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64  # integer embeddings (exact small values in tests) stay exact
    images, texts = images.to(dtype), texts.to(dtype)
    for name, emb in (("image_emb", images), ("text_emb", texts)):
        # min and max propagate NaN, and avoid an (N, D) mask the size of the embeddings.
        if not bool(torch.isfinite(torch.stack(torch.aminmax(emb))).all()):
            raise ValueError(f"{name} contains NaN or infinite values; cannot rank")
    return images, texts


def validated_ids(
    text_to_image: torch.Tensor | np.ndarray | Sequence[int],
    image_ids: torch.Tensor | np.ndarray | Sequence[int] | None,
    n_images: int,
    n_texts: int,
) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids (N_img,) of the images and (N_txt,) of the captions' ground-truth images.

    Raises ValueError unless every caption matches an image and every image has a caption.
    """
    text_ids = as_id_array(text_to_image, "text_to_image", n_texts)
    if image_ids is None:
        image_id_arr = np.arange(n_images, dtype=np.int64)
    else:
        image_id_arr = as_id_array(image_ids, "image_ids", n_images)
    orphan_texts = np.flatnonzero(~np.isin(text_ids, image_id_arr))
    if len(orphan_texts):
        first = orphan_texts[0]
        raise ValueError(
            f"{len(orphan_texts)} of {n_texts} captions have an id that matches no image "
            f"(e.g. caption {first} -> id {text_ids[first]})"
        )
    uncaptioned = np.flatnonzero(~np.isin(image_id_arr, text_ids))
    if len(uncaptioned):
        first = uncaptioned[0]
        raise ValueError(
            f"{len(uncaptioned)} of {n_images} images have no matching caption (e.g. image "
            f"{first}, id {image_id_arr[first]}); image-to-text ranks need at least one per image"
        )
    return image_id_arr, text_ids


def as_id_array(
    values: torch.Tensor | np.ndarray | Sequence[int], name: str, length: int
) -> np.ndarray:
    """A 1-D int64 numpy array of ``length`` ids, or ValueError naming ``name``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    ids = np.asarray(values)
    if ids.ndim != 1 or len(ids) != length:
        raise ValueError(f"{name} must have shape ({length},), got {ids.shape}")
    if length and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def _validated_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int | np.integer) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return tuple(int(k) for k in ks)
