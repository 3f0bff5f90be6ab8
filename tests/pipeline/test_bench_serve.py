"""bench/bench_serve.py --smoke: the benchmark runs end to end (real servers, tiny sizes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.serving import tiny_export, tiny_gallery


@pytest.mark.slow
def test_bench_serve_smoke_writes_its_table(tmp_path):
    export, gallery = tiny_export(tmp_path / "export"), tiny_gallery(tmp_path / "gallery")
    out = tmp_path / "bench_serve.md"
    done = subprocess.run(
        [
            sys.executable, str(REPO / "bench/bench_serve.py"), "--smoke", "--export", str(export),
            "--gallery", str(gallery), "--work", str(tmp_path / "work"), "--out", str(out),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    latency, sweep = [block for block in out.read_text().split("\n\n") if block.startswith("| ")]
    header, *body = [
        line.split("|")[1:-1] for line in latency.splitlines() if line.startswith("| ")
    ]
    assert [cell.strip() for cell in header][:3] == ["gallery", "index", "build s"]
    assert [(r[0].strip(), r[1].strip()) for r in body] == [
        ("4 real", "exact"),
        ("3,000 synthetic", "exact"),
        ("3,000 synthetic", "ivf"),
    ]
    for row in body:
        recall, p50, p99, rps = (float(row[i]) for i in (4, 5, 6, 7))
        assert 0 < recall <= 1 and 0 < p50 <= p99 and rps > 0
    probe, recall, ms = sweep.splitlines()[-1].split("|")[1:-1]
    assert int(probe) == 4 and 0 < float(recall) <= 1 and float(ms) > 0
