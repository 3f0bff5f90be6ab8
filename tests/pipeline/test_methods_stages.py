"""Every non-default method of issue 6 through the DVC stages (``dvc repro`` of the repository's
dvc.yaml) and the KFP pipeline (``imtext pipeline run``, local runner) on the tiny built-in
dataset. The CLI path of the same methods is tests/smoke/test_methods.py, whose settings these are.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from imtext.config import apply_overrides
from imtext.data.shapes import generate_shapes
from tests.conftest import REPO
from tests.pipeline.test_dvc import dvc_repo, run
from tests.pipeline.test_kfp_local import STEPS, pipeline_run, small_params, summary
from tests.smoke.test_methods import METHODS, RANK_ONLY

pytestmark = pytest.mark.slow

#: The work past training, shrunk (the tiny model and data of small_params cover training).
FAST = ["evaluate.report_queries=2", "export.quantize=none"]


def method_overrides(name: str) -> list[str]:
    """``section.key=value`` settings (YAML values) that make the pipeline train ``name``: the
    method's model settings, and its stage settings in both training stages (dvc.yaml and the DAG
    run pretrain, then finetune from it), with as few epochs as the method allows."""
    model, stage, _, _ = METHODS[name]
    epochs = 2 if name == "adversarial" else 1  # a warm-up epoch, then the reversal
    settings = [f"model.{key}={json.dumps(value)}" for key, value in model.items()]
    for section in ("pretrain", "finetune"):
        values = {"epochs": epochs, **RANK_ONLY, **stage}
        settings += [f"{section}.{key}={json.dumps(value)}" for key, value in values.items()]
    return settings + FAST


def expected_method(name: str) -> str:
    return METHODS[name][0].get("method", "dual_path")


def expected_similarity(name: str) -> str:
    """``preprocess.json``'s scoring: the similarity network's pair scorer, else dot products."""
    return "network" if expected_method(name) == "similarity" else "dot"


def check_trained(train_dir: Path, name: str) -> None:
    """``train_dir`` holds a model of method ``name``, with that method's training history."""
    record = torch.load(train_dir / "model.pt", map_location="cpu", weights_only=True)
    assert record["model_config"]["method"] == expected_method(name)
    if name == "adversarial":
        assert record["model_config"]["discriminator_dims"] == [8]
    history = json.loads((train_dir / "history.json").read_text())
    assert len(history) == (2 if name == "adversarial" else 1)
    assert METHODS[name][3] <= history[-1].keys(), f"{name}: history keys {sorted(history[-1])}"
    if name == "adversarial":  # epoch 1 is the discriminator's warm-up: no reversal
        assert history[0]["train_adv_lambda"] == 0 < history[1]["train_adv_lambda"]


def check_evaluated(eval_dir: Path) -> float:
    rsum = json.loads((eval_dir / "metrics.json").read_text())["rsum"]
    assert isinstance(rsum, int | float) and math.isfinite(rsum) and 0 <= rsum <= 600
    return rsum


def check_exported(export_dir: Path, name: str) -> None:
    parity = json.loads((export_dir / "parity.json").read_text())
    assert parity["passed"] is True, parity.get("failures")
    preprocess = json.loads((export_dir / "preprocess.json").read_text())
    assert preprocess["similarity"] == expected_similarity(name)
    for encoder in ("image_encoder.onnx", "text_encoder.onnx"):
        assert (export_dir / encoder).is_file()
    if expected_similarity(name) == "network":
        assert (export_dir / "pair_scorer.onnx").is_file()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """The built-in dataset at 72 images of 32 px."""
    path = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(path, n_images=72, seed=3, size=32)
    return path


@pytest.mark.parametrize("name", METHODS)
def test_each_method_runs_through_the_dvc_stages(name, shapes, tmp_path):
    repo = dvc_repo(tmp_path / "repo")
    # As it is: the INT8 encoders are one directory output, empty with export.quantize none.
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load(small_params(tmp_path / "small.yaml").read_text())
    params = apply_overrides(params, method_overrides(name))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(shapes, repo / "data" / "shapes")

    run("dvc", "repro", cwd=repo)
    artifacts = repo / "artifacts"
    check_trained(artifacts / "pretrain", name)
    check_trained(artifacts / "finetune", name)
    check_evaluated(artifacts / "evaluate")
    check_exported(artifacts / "export", name)
    assert "up to date" in run("dvc", "status", cwd=repo)


@pytest.mark.parametrize("name", METHODS)
def test_each_method_runs_through_the_kfp_pipeline(name, shapes, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # nothing of a step may land in the working directory anyway
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"  # each method's own store and model name
    model_name = f"imtext-test-{name.replace('_', '-')}"
    sets = [*method_overrides(name), f"register.model_name={model_name}"]
    pipeline_run(
        "--data", str(shapes),
        "--params", str(small_params(tmp_path / "params.yaml")),
        "--out", str(tmp_path / "kfp"),
        "--tracking-uri", tracking,
        "--device", "cpu",
        *[arg for setting in sets for arg in ("--set", setting)],
    )  # fmt: skip
    out = summary(capsys.readouterr().out)
    printed = re.search(r"^\| rsum .*\|\s+([\d.]+) \|$", out, re.M)
    assert f"registered: {model_name} version 1 (MLflow {tracking})" in out
    assert "promotion: version 1 is now @champion: no version holds alias 'champion' yet" in out

    run_dir = Path(re.search(r"^report: (.+)$", out, re.M).group(1)).parents[2]
    assert {p.name for p in run_dir.iterdir()} == set(STEPS)
    check_trained(run_dir / "pretrain" / "model", name)
    check_trained(run_dir / "finetune" / "model", name)
    rsum = check_evaluated(run_dir / "evaluate" / "evaluation")
    assert printed and float(printed.group(1)) == pytest.approx(rsum, abs=0.05), out
    check_exported(run_dir / "export" / "onnx", name)

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    version = client.get_model_version_by_alias(model_name, "champion")
    assert str(version.version) == "1"
    assert version.tags["imtext.similarity"] == expected_similarity(name)
    logged = client.get_run(version.run_id).data
    assert logged.params["model.method"] == expected_method(name)
    assert logged.params["finetune.ranking"] == METHODS[name][1]["ranking"]
    assert logged.metrics["rsum"] == pytest.approx(rsum)
