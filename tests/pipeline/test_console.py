"""What `imtext pipeline run` prints (issue 19): a short run on the console, each step's full log in
its step directory, and a failing step's log named with its last lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from imtext.console import tail
from imtext.data.shapes import generate_shapes
from imtext.errors import ImtextError
from tests.pipeline.test_kfp_local import FAST, STEPS, pipeline_run, small_params

pytestmark = pytest.mark.slow

#: The most lines a run may print, progress bars aside (issue 19).
MAX_LINES = 60


def looks_like_json(line: str) -> bool:
    """A line of the executor's JSON dumps: a brace, or a quoted key."""
    return line.strip().startswith(("{", "}", '"'))


def test_a_run_prints_a_line_per_step_and_keeps_the_rest_in_step_logs(tmp_path, capsys):
    data = tmp_path / "shapes"
    generate_shapes(data, n_images=72, seed=3, size=32)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pipeline_run(
        "--data",
        str(data),
        "--params",
        str(small_params(tmp_path / "params.yaml")),
        "--out",
        str(tmp_path / "kfp"),
        "--tracking-uri",
        tracking,
        *FAST,
    )
    captured = capsys.readouterr()
    out, lines = captured.out, captured.out.splitlines()

    assert len(lines) < MAX_LINES, out
    assert "executor" not in out.lower() and "executor" not in captured.err.lower()
    assert not [line for line in lines if looks_like_json(line)]
    for step in STEPS:
        assert re.search(rf"^\[\d\d:\d\d:\d\d\] {step} +started$", out, re.M), step
        assert re.search(rf"^\[\d\d:\d\d:\d\d\] {step} +succeeded in \S+$", out, re.M), step
    for stage in ("pretrain", "finetune"):  # tiny_params: 2 epochs each
        epochs = re.findall(
            rf"^    {stage} epoch (\d)/2, loss [\d.]+, \d+ img/s, val rsum", out, re.M
        )
        assert epochs == ["1", "2"], stage

    report = Path(re.search(r"^report: (.+)$", out, re.M).group(1))
    run_dir = report.parents[2]
    assert f"step logs: {run_dir}/<step>/<step>.log" in out
    for step in STEPS:  # the whole log, the executor's input and output included
        log = (run_dir / step / f"{step}.log").read_text()
        assert "Got executor_input" in log and "Wrote executor output file" in log, step
    assert "registered: imtext-dual-path version 1" in out
    assert "promotion: version 1 is now @champion" in out
    assert lines[-6:] == [
        "  # the HTML report of this run",
        lines[-5],
        "  # MLflow's UI on the run's store, at the latest run",
        f"  imtext ui --tracking-uri {tracking}",
        "  # the same stages with DVC (dvc repro), outputs in artifacts/",
        "  make repro",
    ]
    assert str(report) in lines[-5] or report.as_uri() in lines[-5]


@pytest.fixture
def broken_data(tmp_path) -> Path:
    """A dataset whose annotation file lacks the split of its one image: prepare fails at once."""
    data = tmp_path / "broken"
    (data / "images").mkdir(parents=True)
    (data / "dataset.json").write_text(json.dumps({"images": [{"filename": "x.png"}]}))
    return data


def run_broken(tmp_path: Path, data: Path, *extra: str) -> str:
    with pytest.raises(ImtextError) as failure:
        pipeline_run(
            "--data",
            str(data),
            "--params",
            str(small_params(tmp_path / "params.yaml")),
            "--out",
            str(tmp_path / "kfp"),
            *extra,
        )
    return str(failure.value)


def test_a_failing_step_names_its_log_and_shows_its_last_lines(tmp_path, broken_data, capsys):
    error = run_broken(tmp_path, broken_data)
    out = capsys.readouterr().out

    log = Path(re.fullmatch(r".*step 'prepare' failed; its log: (\S+)", error).group(1))
    assert log.name == "prepare.log" and log.parent.name == "prepare"
    assert re.search(r"^\[\d\d:\d\d:\d\d\] prepare +FAILED after \S+$", out, re.M)
    last = tail(log)
    assert f"    its log: {log}; the last {len(last)} lines:" in out
    shown = [line[len("    | ") :] for line in out.splitlines() if line.startswith("    | ")]
    assert shown == last
    assert any("missing field 'split'" in line for line in shown)  # the cause is among them
    assert not re.search(r"pretrain +started", out)  # nothing after the failed step ran


def test_verbose_prints_the_runners_whole_log_as_before(tmp_path, broken_data, capsys):
    error = run_broken(tmp_path, broken_data, "--verbose")
    out = capsys.readouterr().out
    assert "Its log is above" in error and "'prepare'" in error
    assert "Got executor_input" in out and "missing field 'split'" in out
    assert not list((tmp_path / "kfp").rglob("*.log"))
