"""``imtext pretrain`` and ``imtext finetune`` end to end on tiny data: outputs, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_params
from tests.smoke.test_cli import IMTEXT, _assert_one_line_error, imtext

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
VAL_KEYS = {"val_i2t_r1", "val_t2i_r1", "val_rsum", "val_i2t_medr", "val_t2i_meanr"}


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = state_dict(a), state_dict(b)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def pretrained(tiny_prepared, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    params = tiny_params(root / "params.yaml")
    out = root / "pretrain"
    result = imtext(
        "pretrain", "--prepared", tiny_prepared, "--out", out, "--params", params,
        "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_pretrain_writes_model_metrics_history_and_logs(pretrained):
    for name in ("checkpoint.pt", "model.pt", "metrics.json", "history.json", "log.jsonl"):
        assert (pretrained / name).is_file(), name
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert VAL_KEYS <= metrics.keys() and metrics["epochs"] == 2
    history = json.loads((pretrained / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["train_rank"] == 0 and h["train_inst_image"] > 0 for h in history)
    assert not list(pretrained.glob(".*")), "temporary files left behind"
    lines = [json.loads(line) for line in (pretrained / "log.jsonl").read_text().splitlines()]
    assert {line["stage"] for line in lines} == {"pretrain"} and lines[-1]["epoch"] == 2


def test_the_same_run_writes_the_same_model_file_byte_for_byte(pretrained, tiny_prepared, tmp_path):
    # DVC hashes model.pt: wall-clock numbers in it would make every rerun look like a change.
    again = tmp_path / "again"
    params = tiny_params(tmp_path / "params.yaml")
    result = imtext(
        "pretrain", "--prepared", tiny_prepared, "--out", again, "--params", params,
        "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (again / "model.pt").read_bytes() == (pretrained / "model.pt").read_bytes()


def test_finetune_starts_from_pretrain_and_trains_the_ranking_loss(
    pretrained, tiny_prepared, tmp_path
):
    params = tiny_params(tmp_path / "params.yaml", ranking="paired_hard")
    out = tmp_path / "finetune"
    result = imtext(
        "finetune", "--prepared", tiny_prepared, "--init", pretrained / "model.pt",
        "--out", out, "--params", params, "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "finetune done: best epoch" in result.stderr
    history = json.loads((out / "history.json").read_text())
    assert all(h["train_rank"] > 0 for h in history)
    record = torch.load(out / "model.pt", weights_only=True)
    assert record["stage"] == "finetune" and record["train_config"]["ranking"] == "paired_hard"


def test_existing_checkpoint_needs_resume(pretrained, tiny_prepared, tmp_path):
    params = tiny_params(tmp_path / "params.yaml")
    result = imtext(
        "pretrain", "--prepared", tiny_prepared, "--out", pretrained, "--params", params,
        "--device", "cpu",
    )  # fmt: skip
    _assert_one_line_error(result, "checkpoint.pt", "--resume")


def test_resume_with_other_settings_is_refused(pretrained, tiny_prepared, tmp_path):
    params = tiny_params(tmp_path / "params.yaml", lr=0.5)
    result = imtext(
        "pretrain", "--prepared", tiny_prepared, "--out", pretrained, "--params", params,
        "--device", "cpu", "--resume",
    )  # fmt: skip
    _assert_one_line_error(result, "other settings")


def test_finetune_from_a_missing_model_names_it(tiny_prepared, tmp_path):
    params = tiny_params(tmp_path / "params.yaml")
    result = imtext(
        "finetune", "--prepared", tiny_prepared, "--init", tmp_path / "nope.pt",
        "--out", tmp_path / "out", "--params", params, "--device", "cpu",
    )  # fmt: skip
    _assert_one_line_error(result, "nope.pt", "not found")


@pytest.mark.slow
def test_finetune_killed_and_resumed_ends_with_the_same_weights(
    pretrained, tiny_prepared, tmp_path
):
    """SIGKILL during Stage II, ``--resume``: the result equals an uninterrupted run's."""
    params = tiny_params(tmp_path / "params.yaml", epochs=4, ranking="paired_hard")
    args = ["finetune", "--prepared", tiny_prepared, "--init", pretrained / "model.pt",
            "--params", params, "--device", "cpu"]  # fmt: skip
    whole = imtext(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [IMTEXT, *map(str, args), "--out", str(killed)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    history = killed / "history.json"
    deadline = time.monotonic() + 120
    while not history.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # during epoch 2 (of 4): no clean-up runs
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    done = len(json.loads(history.read_text()))
    assert done < 4 and not (killed / "metrics.json").exists(), "the run was not interrupted"

    resumed = imtext(*args, "--out", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {done}" in resumed.stderr
    assert_same_weights(tmp_path / "whole" / "checkpoint.pt", killed / "checkpoint.pt")
    assert_same_weights(tmp_path / "whole" / "model.pt", killed / "model.pt")
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (killed, tmp_path / "whole")]
    for m in metrics:
        del m["train_samples_per_s"]  # wall-clock, the one thing allowed to differ
    assert metrics[0] == metrics[1]


@pytest.mark.slow
def test_data_parallel_pretrain_with_two_cpu_processes(tiny_prepared, tmp_path):
    params = tiny_params(tmp_path / "params.yaml", epochs=1)
    out = tmp_path / "ddp"
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", IMTEXT, "pretrain",
         "--prepared", str(tiny_prepared), "--out", str(out), "--params", str(params),
         "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stderr
    # 48 training images, batch 8 per process: 3 steps per epoch, not 6.
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and "val_rsum" in history[0]


def test_a_run_that_stopped_early_stays_stopped_when_resumed(tiny_prepared, tmp_path):
    """A retried pipeline step resumes with the same params: after an early stop (patience used
    up) it must not train the epochs the uninterrupted run never trained."""
    out = tmp_path / "pretrain"
    args = ["pretrain", "--prepared", tiny_prepared, "--out", out, "--device", "cpu"]
    first = imtext(*args, "--params", tiny_params(tmp_path / "one.yaml", epochs=1))
    assert first.returncode == 0, first.stderr
    # As a run with patience 1 leaves its checkpoint after a validation that did not improve.
    record = torch.load(out / "checkpoint.pt", weights_only=True)
    record["run_state"]["bad_evals"] = 1
    torch.save(record, out / "checkpoint.pt")
    params = tiny_params(tmp_path / "three.yaml", epochs=3, patience=1)
    resumed = imtext(*args, "--params", params, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stderr
    assert len(json.loads((out / "history.json").read_text())) == 1
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1


def test_cached_in_process_items_train_what_a_decoding_worker_trains(
    tiny_prepared, tmp_path, monkeypatch
):
    """With the resized-image cache the loader runs in the training process (no worker) and
    draws what its one worker would have: the same weights as decoding every image in a worker
    every epoch."""
    from imtext.config import load_stage_config
    from imtext.data.datasets import InstanceTrainDataset
    from imtext.train.loop import train_stage

    params = tiny_params(tmp_path / "params.yaml", epochs=2, image_augment="shift", workers=1)
    model_cfg = load_stage_config("model", params)
    cfg = load_stage_config("finetune", params)
    cached = train_stage("finetune", model_cfg, cfg, tiny_prepared, tmp_path / "cached",
                         device="cpu", progress=False)  # fmt: skip
    monkeypatch.setattr(InstanceTrainDataset, "cache_resized_images", lambda self: False)
    decoded = train_stage("finetune", model_cfg, cfg, tiny_prepared, tmp_path / "decoded",
                          device="cpu", progress=False)  # fmt: skip
    assert_same_weights(tmp_path / "cached" / "model.pt", tmp_path / "decoded" / "model.pt")
    assert cached["val_rsum"] == decoded["val_rsum"]
