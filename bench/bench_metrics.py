"""Speed of ``retrieval_metrics`` (chunked torch matmul) against ``reference_ranks`` (one query at
a time in numpy), on COCO-5K-sized random embeddings: 5,000 images x 25,000 captions of dim 1024.

The data are random unit vectors in float32, rounded to a 2^-11 grid: every dot product is then a
multiple of 2^-22 below 1 in size, exact in float32 whatever the summation order, so the fast and
the reference ranks must agree exactly, exact ties included (unrounded floats would differ in the
last bit between a matrix product and a vector product, flipping near-ties). The reference loop is
timed in full when a pilot estimates it under ``--reference-budget`` seconds; otherwise on the first
``--reference-queries`` queries of each direction, extrapolated linearly to all of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from imtext.eval.metrics import per_query_ranks, reference_ranks, retrieval_metrics

REPO = Path(__file__).resolve().parents[1]
GRID = 2.0**-11
PILOT_QUERIES = 20


def make_embeddings(
    n_images: int, captions_per_image: int, dim: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N_img, dim) and (N_img * captions_per_image, dim) float32 unit vectors on GRID, and ids."""
    rng = np.random.default_rng(seed)

    def unit_on_grid(n: int) -> np.ndarray:
        x = rng.standard_normal((n, dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return (np.round(x / GRID) * GRID).astype(np.float32)

    text_to_image = np.repeat(np.arange(n_images), captions_per_image)
    return unit_on_grid(n_images), unit_on_grid(len(text_to_image)), text_to_image


def time_reference(images, texts, text_to_image, budget_s: float, subset: int):
    """Seconds for all queries (measured or extrapolated), the ranks computed, and a note."""
    counts = {"i2t": len(images), "t2i": len(texts)}

    def run(direction: str, n: int) -> tuple[float, np.ndarray]:
        limits = {"i2t_queries": 0, "t2i_queries": 0, f"{direction}_queries": n}
        start = time.perf_counter()
        ranks = reference_ranks(images, texts, text_to_image, **limits)
        return time.perf_counter() - start, ranks[0 if direction == "i2t" else 1]

    pilot = {d: run(d, PILOT_QUERIES)[0] / PILOT_QUERIES * counts[d] for d in counts}
    n_run = {
        d: counts[d] if sum(pilot.values()) <= budget_s else min(subset, counts[d]) for d in counts
    }
    seconds, ranks = {}, {}
    for direction, n in n_run.items():
        elapsed, ranks[direction] = run(direction, n)
        seconds[direction] = elapsed * counts[direction] / n
    if n_run == counts:
        note = "all queries"
    else:
        note = (
            "extrapolated from the first "
            + " and ".join(f"{n_run[d]:,} of {counts[d]:,} {d}" for d in counts)
            + " queries"
        )
    return sum(seconds.values()), ranks, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--device", default="cpu", help="device of the fast version (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-budget", type=float, default=180.0, help="seconds")
    parser.add_argument("--reference-queries", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench" / "metrics.md")
    args = parser.parse_args()

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    images, texts, text_to_image = make_embeddings(args.images, args.captions_per_image, args.dim)
    images_t = torch.from_numpy(images).to(args.device)
    texts_t = torch.from_numpy(texts).to(args.device)

    fast_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        metrics = retrieval_metrics(images_t, texts_t, text_to_image)
        fast_times.append(time.perf_counter() - start)
    fast_s = statistics.median(fast_times)
    fast_i2t, fast_t2i = per_query_ranks(images_t, texts_t, text_to_image)

    with threadpool_limits(limits=threads):  # numpy's BLAS gets the same threads as torch
        ref_s, ref_ranks, ref_note = time_reference(
            images, texts, text_to_image, args.reference_budget, args.reference_queries
        )
    for direction, fast in (("i2t", fast_i2t), ("t2i", fast_t2i)):
        expected = ref_ranks[direction]
        if not np.array_equal(fast[: len(expected)], expected):
            raise SystemExit(f"{direction} ranks differ from the reference loop")
    checked = sum(len(r) for r in ref_ranks.values())

    rows = [
        "| method | seconds | speed-up vs reference |",
        "|---|---|---|",
        f"| `reference_ranks` (numpy, one query at a time; {ref_note}) | {ref_s:.2f} | 1.00x |",
        f"| `retrieval_metrics` (torch, chunked matmul; median of {args.repeats}) "
        f"| {fast_s:.2f} | {ref_s / fast_s:.1f}x |",
    ]
    table = "\n".join(
        [
            f"retrieval metrics on {args.images:,} images x {len(texts):,} captions, dim {args.dim}, "
            f"float32 unit vectors on a 2^-11 grid; fast on {args.device}, reference on cpu; "
            f"{threads} threads of {os.cpu_count()} CPUs",
            "",
            *rows,
            "",
            f"Ranks identical on all {checked:,} reference queries. Random data, so chance-level "
            f"metrics: i2t R@1 {metrics['i2t_r1']:.3f}, t2i R@1 {metrics['t2i_r1']:.3f}, "
            f"t2i medr {metrics['t2i_medr']:.0f}.",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
