"""bench/bench_metrics.py in its smoke mode, so that a refactor that breaks the benchmark fails CI
(issue 17). It checks the script runs end to end and reports; the speed target lives in the
script's table, never in a test."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_bench_metrics_smoke_mode_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "metrics.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_metrics.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    table = out.read_text()
    assert table == result.stdout
    assert "| ratio to the floor |" in table
    assert "Ranks identical to `reference_ranks` on the first 40 image and 200 caption" in table
    assert "Peak memory beyond the inputs at 200 images x 1,000 captions, dim 16:" in table
