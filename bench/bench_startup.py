"""What a pipeline step's or CLI command's process spends on its imports and on its exit, with and
without ``imtext._process.tune_collector_for_a_short_process`` (which the CLI and
``imtext.pipeline_steps`` call).

Each sample is a fresh ``python`` that imports what a training step imports (the training loop and
the registry: torch, torchvision, MLflow), prints the CPU seconds the imports took and the time,
and exits; the exit is the time from that print to the process's end. Plain and tuned processes
alternate, so both see the same load; the ratios are plain / tuned, medians, in this run.

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

from _table import print_and_write_table  # bench/, the script's own directory

REPO = Path(__file__).resolve().parents[1]
#: What a training step imports (components/pretrain.py -> imtext.pipeline_steps).
STEP_IMPORTS = "imtext.train.loop, imtext.registry"


def child_code(imports: str, tuned: bool) -> str:
    tune = "from imtext._process import tune_collector_for_a_short_process as tune; tune()"
    return "\n".join(
        [
            "import time",
            "started = time.process_time()",
            tune if tuned else "",
            f"import {imports}",
            "print(time.process_time() - started, repr(time.time()), flush=True)",
        ]
    )


def sample(imports: str, tuned: bool) -> tuple[float, float]:
    """CPU seconds of the child's imports, and seconds from its last print to its end (the
    child's clock and ours are the same)."""
    child = subprocess.run(
        [sys.executable, "-c", child_code(imports, tuned)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    ended = time.time()
    import_cpu, printed = child.stdout.strip().splitlines()[-1].split()
    return float(import_cpu), ended - float(printed)


def report(imports: str, plain: list[tuple[float, float]], tuned: list[tuple[float, float]]) -> str:
    rows = []
    for label, column in (("imports, CPU s", 0), ("exit, s", 1)):
        before = statistics.median(s[column] for s in plain)
        after = statistics.median(s[column] for s in tuned)
        rows.append(f"| {label} | {before:.2f} | {after:.2f} | {before / after:.2f}x |")
    return "\n".join(
        [
            f"A process that runs `import {imports}` and exits, median of {len(plain)} "
            "alternating samples:",
            "",
            "| phase | default collector | tuned for a short process | ratio |",
            "|---|---:|---:|---:|",
            *rows,
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
    plain, tuned = [], []
    for _ in range(samples):
        plain.append(sample(imports, tuned=False))
        tuned.append(sample(imports, tuned=True))
    table = report(imports, plain, tuned)
    print_and_write_table(table, "startup", args.out, args.smoke)


if __name__ == "__main__":
    main()
