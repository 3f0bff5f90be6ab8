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

Computation: one pass of matrix products over equal-shape tiles of the score matrix (:class:`Tiling`)
serves both directions, on the device of the embeddings. Images and captions are sorted by id, so
the matching pairs fall in a narrow band of tiles along the diagonal. The band is scored first and
kept: its matching scores give each image's and each caption's best match, read from the very tiles
the counts compare against, so no rounding difference between two ways of computing a score can
split a tie. Then every tile adds, per row and per column, the non-matching scores that reach that
best match. Each score is computed once: the cost is one product of the two embedding matrices plus
a few percent (``bench/bench_metrics.py`` measures the ratio to a bare ``torch.mm``).

Memory beyond the inputs: the band (about ``N_txt x rows + 2 x N_img x cols`` scores, capped at
:data:`BAND_CACHE_BYTES`; band tiles past the cap are scored a second time instead), two tile
buffers, and an id-sorted copy of the embeddings unless the ids are sorted already. 20,000 images x
100,000 captions of dim 256 in float32 take about 0.4 GiB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

SCORE_CHUNK_BYTES = 256 * 2**20
"""Bound on one row of score tiles (a tile's images x every caption) when ``chunk_size`` is not
given; it caps the tile height for very many captions."""

TILE_IMAGES = 2048
"""Images per score tile when ``chunk_size`` is not given (tiles hold twice as many captions).
Large tiles keep BLAS at full speed and make few calls: on a CPU shared with other jobs every
multithreaded call can stall on a descheduled thread, and a tile costs five calls. The band of
tiles kept between the passes grows with the tile, but :data:`SCORE_CHUNK_BYTES` bounds it."""

BAND_CACHE_BYTES = 2**30
"""Band tiles kept between the threshold pass and the counting pass; those beyond it are scored
twice (slower, same ranks)."""

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
    # Sorting both sides by id puts every image's matching captions in one run of columns, so the
    # tiles that hold matching pairs form a narrow band along the diagonal.
    image_order = np.argsort(image_id_arr, kind="stable")
    text_order = np.argsort(text_id_arr, kind="stable")
    match_start, match_stop = matching_caption_runs(
        image_id_arr[image_order], text_id_arr[text_order]
    )
    tiling = Tiling.for_sizes(len(images), len(texts), chunk_size, images.element_size())
    i2t_sorted, t2i_sorted = tiled_ranks(
        rows_in_order(images, image_order),
        rows_in_order(texts, text_order),
        match_start,
        match_stop,
        tiling,
    )
    i2t = np.empty(len(images), dtype=np.int64)
    t2i = np.empty(len(texts), dtype=np.int64)
    i2t[image_order], t2i[text_order] = i2t_sorted, t2i_sorted
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


@dataclass(frozen=True)
class Tiling:
    """The score matrix (images x captions, both sorted by id) cut into equal ``rows x cols`` tiles.

    Ties must come out as ties: an image that duplicates a caption's ground-truth image must score
    that caption bitwise alike, wherever the two sit. BLAS libraries pick kernels, and with them
    the rounding, by shape and position (MKL computes a one-row product with a matrix-vector kernel,
    and the last rows of a tile whose height is not a multiple of 4 along another path; GPUs split
    long sums by shape). So every tile is one ``torch.mm`` of the same shape (the last row and
    column of tiles are zero-padded), with both sides a multiple of 8.
    """

    rows: int
    cols: int
    n_images: int
    n_texts: int

    @classmethod
    def for_sizes(
        cls, n_images: int, n_texts: int, chunk_size: int | None, element_size: int
    ) -> Tiling:
        """Tiles of ``chunk_size`` images (default: :data:`TILE_IMAGES`, fewer when one row of
        tiles would pass :data:`SCORE_CHUNK_BYTES`) x twice as many captions."""
        if chunk_size is None:
            chunk_size = min(TILE_IMAGES, default_chunk_size(n_texts, element_size))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return cls(
            rows=round_up(balanced_tile(n_images, chunk_size), 8),
            # also: MKL runs some 20% slower on widths that are not a multiple of 8
            cols=round_up(balanced_tile(n_texts, 2 * chunk_size), 8),
            n_images=n_images,
            n_texts=n_texts,
        )

    def images_of(self, block: int) -> slice:
        """The real (unpadded) sorted images of row block ``block``."""
        return slice(block * self.rows, min((block + 1) * self.rows, self.n_images))

    def texts_of(self, tile: int) -> slice:
        """The real sorted captions of column tile ``tile``."""
        return slice(tile * self.cols, min((tile + 1) * self.cols, self.n_texts))


def tiled_ranks(
    images: torch.Tensor,
    texts: torch.Tensor,
    match_start: np.ndarray,
    match_stop: np.ndarray,
    tiling: Tiling,
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks (N_img,) and (N_txt,) of id-sorted images and captions, each score computed once.

    Sorted image ``r`` matches captions ``match_start[r]:match_stop[r]``. Each tile serves both
    directions: its rows count the captions that reach each image's best match, its columns the
    images that reach each caption's. Those thresholds come from the band tiles (the ones holding
    matching pairs), so the band is scored first, read for thresholds and kept; then every tile is
    counted, band tiles from the cache and the others scored as they come.
    """
    image_tiles = padded_tiles(images, tiling.rows)
    text_tiles = padded_tiles(texts, tiling.cols)
    band = band_tiles(match_start, match_stop, tiling)
    image_best = images.new_full((tiling.n_images,), -torch.inf)
    text_best = texts.new_full((tiling.n_texts,), -torch.inf)

    def score_band_tile(block: int, tile: int, out: torch.Tensor | None = None) -> torch.Tensor:
        scores = torch.mm(image_tiles[block], text_tiles[tile].T, out=out)
        rows, cols = tiling.images_of(block), tiling.texts_of(tile)
        cells = match_cells(match_start[rows], match_stop[rows], cols.start, cols.stop)
        take_matches(scores, cells, image_best[rows], text_best[cols])
        return scores

    cache = {}
    for block, tile in band:
        scores = score_band_tile(block, tile)
        if (len(cache) + 1) * scores.nbytes <= BAND_CACHE_BYTES:
            cache[block, tile] = scores

    image_beaten = torch.zeros(tiling.n_images, dtype=torch.int64, device=images.device)
    text_beaten = torch.zeros(tiling.n_texts, dtype=torch.int64, device=images.device)
    work = images.new_empty((tiling.rows, tiling.cols))
    # float32 even for half-precision scores: bfloat16 counts exactly only up to 256
    flags = torch.empty_like(work, dtype=torch.float32)
    for block in range(len(image_tiles)):
        rows = tiling.images_of(block)
        for tile in range(len(text_tiles)):
            cols = tiling.texts_of(tile)
            scores = cache.pop((block, tile), None)
            if scores is None and (block, tile) in band:  # the cache was full: score it again
                scores = score_band_tile(block, tile, out=work)
            elif scores is None:
                scores = torch.mm(image_tiles[block], text_tiles[tile].T, out=work)
            real = (slice(rows.stop - rows.start), slice(cols.stop - cols.start))  # no padding
            count_beaten(
                scores[real],
                image_best[rows],
                text_best[cols],
                image_beaten[rows],
                text_beaten[cols],
                flags[real],
            )
    return (1 + image_beaten).cpu().numpy(), (1 + text_beaten).cpu().numpy()


def band_tiles(match_start: np.ndarray, match_stop: np.ndarray, tiling: Tiling) -> set:
    """(row block, column tile) of every tile that holds a matching pair.

    With both sides sorted by id, a row block's matching captions are one run of columns (the
    captions of its first image's id through those of its last), hence one run of column tiles.
    """
    band = set()
    for block in range(-(-tiling.n_images // tiling.rows)):
        rows = tiling.images_of(block)
        first_tile = match_start[rows.start] // tiling.cols
        last_tile = (match_stop[rows.stop - 1] - 1) // tiling.cols
        band.update((block, int(tile)) for tile in range(first_tile, last_tile + 1))
    return band


def match_cells(
    match_start: np.ndarray, match_stop: np.ndarray, col0: int, col1: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column, within a tile of captions ``col0:col1``, of every matching pair in it;
    ``match_start`` and ``match_stop`` are the matching runs of the tile's images."""
    lo = np.clip(match_start, col0, col1)
    per_row = np.clip(match_stop, col0, col1) - lo
    rows = np.repeat(np.arange(len(lo)), per_row)
    # the position of each cell within its row's run of matching columns
    within_run = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    return rows, lo[rows] - col0 + within_run


def take_matches(
    scores: torch.Tensor,
    cells: tuple[np.ndarray, np.ndarray],
    image_best: torch.Tensor,
    text_best: torch.Tensor,
) -> None:
    """Raise the tile's images' and captions' best matching scores to its matching ``cells``, then
    set those cells to NaN: NaN compares false with everything, so no count sees a matching pair.

    The thresholds are read from the tile itself rather than from separate dot products, which
    round differently and would break near-ties differently from the scores they are compared to.
    """
    rows, cols = (torch.from_numpy(c).to(scores.device) for c in cells)
    matching = scores[rows, cols]
    image_best.scatter_reduce_(0, rows, matching, reduce="amax")
    text_best.scatter_reduce_(0, cols, matching, reduce="amax")
    scores[rows, cols] = torch.nan


def count_beaten(
    scores: torch.Tensor,
    image_best: torch.Tensor,
    text_best: torch.Tensor,
    image_beaten: torch.Tensor,
    text_beaten: torch.Tensor,
    flags: torch.Tensor,
) -> None:
    """Add, per image (row) and per caption (column) of a tile's (R, C) ``scores``, the scores that
    reach (>=: ties count against the query) that query's best matching score.

    ``flags`` is an (R, C) float32 buffer. The comparisons write 0.0/1.0 into it rather than bool,
    which torch's CPU kernels produce about four times faster; float32 sums of 0/1 are exact up to
    2^24, far more than a tile row or column.
    """
    image_beaten += torch.ge(scores, image_best[:, None], out=flags).sum(1).long()
    text_beaten += torch.ge(scores, text_best[None, :], out=flags).sum(0).long()


def balanced_tile(n: int, max_size: int) -> int:
    """Tile length <= ``max_size`` cutting ``n`` into equal tiles with the least padding."""
    n_tiles = -(-n // max_size)
    return -(-n // n_tiles)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_tiles(emb: torch.Tensor, size: int) -> list[torch.Tensor]:
    """(N, D) rows cut into contiguous (size, D) tiles, the last one padded with zero rows."""
    tiles = list(emb.split(size))
    if len(tiles[-1]) < size:
        tail = emb.new_zeros((size, emb.shape[1]))
        tail[: len(tiles[-1])] = tiles[-1]
        tiles[-1] = tail
    return tiles


def rows_in_order(emb: torch.Tensor, order: np.ndarray) -> torch.Tensor:
    """``emb[order]`` as a contiguous tensor, without a copy when that is ``emb`` itself."""
    if np.array_equal(order, np.arange(len(order))):
        return emb.contiguous()
    return emb[torch.from_numpy(order).to(emb.device)]


def matching_caption_runs(
    sorted_image_ids: np.ndarray, sorted_text_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each image of id-sorted images, its matching captions among id-sorted captions: the
    run ``start[r]:stop[r]``, arrays of shape (N_img,)."""
    return (
        np.searchsorted(sorted_text_ids, sorted_image_ids, side="left"),
        np.searchsorted(sorted_text_ids, sorted_image_ids, side="right"),
    )


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
