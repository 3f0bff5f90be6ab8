"""Every benchmark runs end to end in its ``--smoke`` mode (tiny data, one repeat), so that a
refactor that breaks a benchmark fails the tests instead of the next person who measures.

The scripts are listed, not globbed: a new benchmark adds itself here together with its smoke mode
(``bench/_tiny.py`` holds the shared tiny data and model, ``bench/_table.py`` writes the tables).
``test_every_benchmark_is_listed`` fails when a script in bench/ is neither listed here nor in
``COVERED_ELSEWHERE``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCH = REPO / "bench"
#: Script -> a line its smoke output must contain (the table's header).
SMOKE = {
    "bench_export.py": "| exporter | export s, first / later passes | checks |",
    "bench_metrics.py": "| ratio to the floor |",
    "bench_prepare.py": "| workers | median s |",
    "bench_startup.py": "| phase | default collector | tuned for a short process | ratio |",
    "bench_step.py": "| layout | precision | ms / step |",
    "bench_train.py": "| stage | ranking |",
}
#: Benchmarks whose smoke mode another test runs.
COVERED_ELSEWHERE = {"bench_serve.py"}  # tests/pipeline/test_bench_serve.py


def test_every_benchmark_is_listed():
    scripts = {path.name for path in BENCH.glob("bench_*.py")}
    assert scripts - set(SMOKE) - COVERED_ELSEWHERE == set()


@pytest.mark.slow  # each renders its own tiny data or model: 5-30 s on 2 cores
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_in_smoke_mode(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    # A smoke run must not replace the last real table (artifacts/bench/<name>.md).
    table = (
        REPO / "artifacts" / "bench" / (script.removeprefix("bench_").removesuffix(".py") + ".md")
    )
    before = table.stat().st_mtime_ns if table.exists() else None
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        cwd=tmp_path,  # a stray relative path would land here, not in the checkout
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert SMOKE[script] in result.stdout
    assert (table.stat().st_mtime_ns if table.exists() else None) == before
