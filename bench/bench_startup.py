"""How long a pipeline step's process takes to exit, with and without
``imtext._process.skip_final_collection`` (what the CLI and ``imtext.pipeline_steps`` call).

Each sample is a fresh ``python`` that imports what a training step imports (the training loop and
the registry: torch, torchvision, MLflow), prints the time, and exits; the exit is the time from
that print to the process's end. Plain and frozen processes alternate, so both see the same load;
the ratio is plain / frozen, medians, measured in this run.

    python bench/bench_startup.py            # 7 samples each -> artifacts/bench/startup.md
    python bench/bench_startup.py --smoke    # torch only, 1 sample each, no table file
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: What a training step imports (components/pretrain.py -> imtext.pipeline_steps).
STEP_IMPORTS = "imtext.train.loop, imtext.registry"


def child_code(imports: str, frozen: bool) -> str:
    freeze = "from imtext._process import skip_final_collection; skip_final_collection()"
    return "\n".join(
        [
            "import sys, time",
            f"import {imports}",
            freeze if frozen else "",
            "print(repr(time.time()), flush=True)",
        ]
    )


def exit_seconds(imports: str, frozen: bool) -> float:
    """Seconds from the child's last print to its end (the child's clock and ours are the same)."""
    child = subprocess.run(
        [sys.executable, "-c", child_code(imports, frozen)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    ended = time.time()
    return ended - float(child.stdout.strip().splitlines()[-1])


def report(imports: str, plain: list[float], frozen: list[float]) -> str:
    plain_s, frozen_s = statistics.median(plain), statistics.median(frozen)
    return "\n".join(
        [
            f"Process exit after `import {imports}`, median of {len(plain)} alternating samples:",
            "",
            "| exit | median s | ratio |",
            "|---|---:|---:|",
            f"| plain interpreter exit | {plain_s:.2f} | 1.00 |",
            f"| skip_final_collection | {frozen_s:.2f} | {plain_s / frozen_s:.1f}x faster |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="torch only, 1 sample, no table file")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: artifacts/bench/startup.md (none with --smoke)")  # fmt: skip
    args = parser.parse_args()
    imports, samples = ("torch", 1) if args.smoke else (STEP_IMPORTS, args.samples)
    plain, frozen = [], []
    for _ in range(samples):
        plain.append(exit_seconds(imports, frozen=False))
        frozen.append(exit_seconds(imports, frozen=True))
    table = report(imports, plain, frozen)
    out = args.out or (None if args.smoke else REPO / "artifacts" / "bench" / "startup.md")
    if out is not None:  # a smoke run never replaces the last real table
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
