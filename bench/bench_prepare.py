"""Throughput of the prepare stage by number of image threads, on photo-sized JPEG images.

Photographs (COCO is 640x480) dominate prepare time: decoding, downscaling to a 256 short side and
re-encoding. Pillow releases the GIL for that work, so threads should scale with cores. This measures
it: images per second for each ``workers`` value, as a ratio to ``workers: 1`` in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _table import print_and_write_table  # bench/, the script's own directory
from PIL import Image

from imtext.config import load_stage_config
from imtext.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


def make_photo_dataset(root: Path, n_images: int, seed: int = 0) -> None:
    """Noisy 640x480 JPEGs (they compress like photographs) with one caption each."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images = []
    for i in range(n_images):
        base = rng.integers(0, 256, size=(3,), dtype=np.uint8)
        pixels = np.clip(base + rng.normal(0, 40, size=(480, 640, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.jpg", quality=90)
        split = "train" if i < n_images * 0.8 else "test"
        images.append(
            {
                "filename": f"{i}.jpg",
                "imgid": i,
                "split": split,
                "sentences": [{"raw": f"photo {i}"}],
            }
        )
    (root / "dataset.json").write_text(json.dumps({"images": images}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="6 images, one repeat, no table file")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: artifacts/bench/prepare.md (none with --smoke)")  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.images, args.repeats = 6, 1

    base_cfg = load_stage_config("prepare", REPO / "params.yaml")
    cfg = dataclasses.replace(base_cfg, image_format="jpeg")
    worker_counts = sorted({1, 2, os.cpu_count() or 1})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_photo_dataset(root / "raw", args.images)
        timings: dict[int, list[float]] = {w: [] for w in worker_counts}
        for _ in range(args.repeats):
            for workers in worker_counts:  # interleaved, so drift hits every setting alike
                start = time.perf_counter()
                prepare(
                    dataclasses.replace(cfg, workers=workers),
                    root / "raw" / "dataset.json",
                    root / "raw" / "images",
                    root / f"out{workers}",
                    log=lambda message: None,
                )
                timings[workers].append(time.perf_counter() - start)

    baseline = statistics.median(timings[1])
    rows = [
        "| workers | median s | images/s | speed-up vs workers=1 |",
        "|---|---|---|---|",
    ]
    for workers, times in timings.items():
        median = statistics.median(times)
        rows.append(
            f"| {workers} | {median:.2f} | {args.images / median:.0f} | {baseline / median:.2f}x |"
        )
    table = "\n".join(
        [
            f"prepare on {args.images} JPEGs 640x480 -> short side 256, "
            f"{args.repeats} repeats, {os.cpu_count()} CPUs",
            "",
            *rows,
        ]
    )
    print_and_write_table(table, "prepare", args.out, args.smoke)


if __name__ == "__main__":
    main()
