"""``retrieval_metrics`` against its floor: one bare ``torch.mm`` of the same two matrices.

Timing: COCO-5K-sized random embeddings, 5,000 images x 25,000 captions of dim 1024 in float32.
Each repeat times ``torch.mm(images, texts.T)`` and then ``retrieval_metrics`` back to back, so the
two see the same machine load; the table gives the ratio of the fastest of each and of the medians.

Correctness: the embeddings are random unit vectors rounded to a 2^-11 grid, so every dot product
is a multiple of 2^-22 below 1 in size and exact in float32 whatever the summation order. The ranks
must then equal ``reference_ranks`` (one query at a time in numpy) exactly, exact ties included;
the first ``--reference-queries`` queries of each direction are checked (unrounded floats would
differ in the last bit between a matrix product and a matrix-vector product, flipping near-ties).

Memory: a child process builds 20,000 images x 100,000 captions of dim 256 and reports how far
``retrieval_metrics`` raises its peak resident memory (``VmHWM``) beyond the inputs; on CUDA, the
peak of torch's allocator beyond the inputs.

``--smoke`` runs every part at tiny sizes once, so a test can keep the script from rotting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _table import print_and_write_table  # bench/, the script's own directory
from threadpoolctl import threadpool_limits

from imtext.eval.metrics import per_query_ranks, reference_ranks, retrieval_metrics

GRID = 2.0**-11


def grid_unit_vectors(n: int, dim: int, generator: torch.Generator, device: str) -> torch.Tensor:
    """(n, dim) float32 unit vectors rounded to GRID, built in place (no float64 transient, which
    would raise the memory baseline of the child)."""
    x = torch.randn(n, dim, generator=generator)
    x /= torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x.div_(GRID).round_().mul_(GRID).to(device)


def make_embeddings(
    n_images: int, captions_per_image: int, dim: int, device: str = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Images (N, dim), captions (N * captions_per_image, dim), and each caption's image."""
    generator = torch.Generator().manual_seed(seed)
    text_to_image = np.repeat(np.arange(n_images), captions_per_image)
    images = grid_unit_vectors(n_images, dim, generator, device)
    return images, grid_unit_vectors(len(text_to_image), dim, generator, device), text_to_image


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_against_floor(images, texts, text_to_image, repeats: int, device: str) -> dict:
    """Seconds of ``torch.mm`` and of ``retrieval_metrics``, interleaved, ``repeats`` each."""
    floor, fast = [], []
    for _ in range(repeats):
        floor.append(timed(lambda: torch.mm(images, texts.T), device))
        fast.append(timed(lambda: retrieval_metrics(images, texts, text_to_image), device))
    return {"floor": floor, "fast": fast}


def check_against_reference(images, texts, text_to_image, n_queries: int) -> str:
    """Raise SystemExit unless the first ``n_queries`` ranks of each direction equal the loop's;
    say how many were checked."""
    fast_i2t, fast_t2i = per_query_ranks(images, texts, text_to_image)
    ref_i2t, ref_t2i = reference_ranks(
        images, texts, text_to_image, i2t_queries=n_queries, t2i_queries=n_queries
    )
    for direction, fast, ref in (("i2t", fast_i2t, ref_i2t), ("t2i", fast_t2i, ref_t2i)):
        if not np.array_equal(fast[: len(ref)], ref):
            raise SystemExit(f"{direction} ranks differ from the reference loop")
    return f"{len(ref_i2t):,} image and {len(ref_t2i):,} caption queries"


def resident_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in KiB, from /proc/self/status.

    Not ``ru_maxrss``: a child started by ``subprocess`` inherits its parent's peak through exec,
    which would hide the child's own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field}; peak memory needs Linux")


def reset_peak_resident() -> None:
    """Lower VmHWM to the current resident size (Linux >= 4.0), so that the peak counts only what
    follows, not transients of building the inputs."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory_child(n_images: int, captions_per_image: int, dim: int, device: str) -> None:
    """In a fresh process: print JSON with the bytes of the inputs and the peak beyond them."""
    images, texts, text_to_image = make_embeddings(n_images, captions_per_image, dim, device)
    inputs = images.nbytes + texts.nbytes
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        retrieval_metrics(images, texts, text_to_image)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        reset_peak_resident()
        before = resident_kib("VmRSS")
        retrieval_metrics(images, texts, text_to_image)
        peak = (resident_kib("VmHWM") - before) * 1024
    print(json.dumps({"inputs_bytes": inputs, "peak_beyond_inputs_bytes": peak}))


def measure_peak_memory(n_images: int, captions_per_image: int, dim: int, device: str) -> dict:
    """Run :func:`peak_memory_child` in a subprocess (a clean high-water mark) and read its JSON."""
    args = [n_images, captions_per_image, dim]
    command = [sys.executable, __file__, "--peak-memory-child", *map(str, args), "--device", device]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the memory child failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(args, threads: int, times: dict, checked: str, memory: dict, n_texts: int) -> str:
    floor_min, fast_min = min(times["floor"]), min(times["fast"])
    floor_med, fast_med = statistics.median(times["floor"]), statistics.median(times["fast"])
    gib = 2**30
    return "\n".join(
        [
            f"retrieval_metrics on {args.images:,} images x {n_texts:,} captions, dim {args.dim}, "
            f"float32 unit vectors on a 2^-11 grid, on {args.device}; {threads} threads of "
            f"{os.cpu_count()} CPUs; {args.repeats} interleaved repeats",
            "",
            "| measure | fastest | median |",
            "|---|---|---|",
            f"| `torch.mm(images, texts.T)` (floor) s | {floor_min:.3f} | {floor_med:.3f} |",
            f"| `retrieval_metrics` s | {fast_min:.3f} | {fast_med:.3f} |",
            f"| ratio to the floor | {fast_min / floor_min:.3f}x | {fast_med / floor_med:.3f}x |",
            "",
            f"Ranks identical to `reference_ranks` on the first {checked}.",
            "",
            f"Peak memory beyond the inputs at {args.memory_images:,} images x "
            f"{args.memory_images * args.captions_per_image:,} captions, dim {args.memory_dim}: "
            f"{memory['peak_beyond_inputs_bytes'] / gib:.3f} GiB (inputs "
            f"{memory['inputs_bytes'] / gib:.3f} GiB).",
        ]
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-queries", type=int, default=300)
    parser.add_argument("--memory-images", type=int, default=20_000)
    parser.add_argument("--memory-dim", type=int, default=256)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, one repeat, no table file"
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="default: artifacts/bench/metrics.md (none with --smoke)")  # fmt: skip
    parser.add_argument("--peak-memory-child", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.images, args.dim, args.repeats = 40, 16, 1
        args.memory_images, args.memory_dim = 200, 16
    return args


def main() -> None:
    args = parse_args()
    if args.peak_memory_child:
        peak_memory_child(*args.peak_memory_child, args.device)
        return
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    images, texts, text_to_image = make_embeddings(
        args.images, args.captions_per_image, args.dim, args.device
    )
    times = time_against_floor(images, texts, text_to_image, args.repeats, args.device)
    with threadpool_limits(limits=threads):  # numpy's BLAS gets the same threads as torch
        checked = check_against_reference(images, texts, text_to_image, args.reference_queries)
    memory = measure_peak_memory(
        args.memory_images, args.captions_per_image, args.memory_dim, args.device
    )
    table = report(args, threads, times, checked, memory, len(texts))
    print_and_write_table(table, "metrics", args.out, args.smoke)


if __name__ == "__main__":
    main()
