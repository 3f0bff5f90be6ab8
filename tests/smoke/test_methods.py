"""Every method of issue 6 end to end on tiny data: trained through ``imtext pretrain`` /
``finetune`` (in-process ``cli.main``), rebuilt by ``load_model``, evaluated; and ``imtext ablate``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from imtext.cli import main
from imtext.config import EvaluateConfig
from imtext.data.store import PreparedSplit
from imtext.eval.embed import score_split
from imtext.eval.evaluate import evaluate
from imtext.eval.metrics import retrieval_metrics
from imtext.models.dual_path import DualPathModel
from imtext.models.files import load_model
from imtext.models.methods import SimilarityModel, TwoBranchModel
from tests.conftest import tiny_params

EVAL = EvaluateConfig(
    split="test", protocol="full", batch_size=8, flip_average=False, shift_average=False,
    report_queries=2, report_top_k=3, seed=0,
)  # fmt: skip
RANK_ONLY = {"loss_weights": [1.0, 0.0, 0.0]}

#: name -> (model overrides, stage overrides, model class, extra history keys)
METHODS = {
    "vsepp": ({}, {"ranking": "batch_hardest"}, DualPathModel, set()),
    "infonce": ({}, {"ranking": "infonce"}, DualPathModel, {"train_temperature"}),
    "adversarial": (
        {"discriminator_dims": [8]},
        {"ranking": "batch_sum", "adversarial_weight": 0.1, "adversarial_warmup_epochs": 1},
        DualPathModel,
        {"train_adv", "train_adv_lambda"},
    ),
    "two_branch": (
        {"method": "two_branch"},
        {"ranking": "topk", "sentences_per_image": 2, "margin": 0.05},
        TwoBranchModel,
        {"train_rank_t2i", "train_rank_i2t", "train_neighbour"},
    ),
    "similarity": ({"method": "similarity"}, {"ranking": "logistic"}, SimilarityModel, set()),
}


def method_params(path: Path, model: dict, **stage) -> Path:
    tiny_params(path, **stage)
    params = yaml.safe_load(path.read_text())
    params["model"].update(model)
    path.write_text(yaml.safe_dump(params))
    return path


def train(stage: str, prepared: Path, out: Path, params: Path, *extra) -> None:
    args = [stage, "--prepared", str(prepared), "--out", str(out), "--params", str(params)]
    assert main([*args, "--device", "cpu", *map(str, extra)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_each_method_trains_rebuilds_and_evaluates(name, tiny_prepared, tmp_path):
    model_overrides, stage_overrides, cls, extra = METHODS[name]
    epochs = 2 if name == "adversarial" else 1  # a warm-up epoch, then the reversal
    params = method_params(
        tmp_path / "p.yaml", model_overrides, epochs=epochs, **RANK_ONLY, **stage_overrides
    )
    out = tmp_path / "pretrain"
    train("pretrain", tiny_prepared, out, params)

    history = json.loads((out / "history.json").read_text())
    assert len(history) == epochs and "val_rsum" in history[-1]
    assert extra <= history[0].keys()
    if name == "adversarial":  # epoch 1 is the discriminator's warm-up: no reversal
        assert history[0]["train_adv_lambda"] == 0 < history[1]["train_adv_lambda"]
    model, record = load_model(out / "model.pt")
    assert type(model) is cls and record["model_config"]["method"] == model_overrides.get(
        "method", "dual_path"
    )
    if name == "infonce":
        assert model.logit_scale is not None

    metrics = evaluate(EVAL, out / "model.pt", tiny_prepared, tmp_path / "eval", device="cpu")
    assert 0 <= metrics["rsum"] <= 600 and (tmp_path / "eval" / "report.html").is_file()
    if cls is SimilarityModel:  # ranked by the score of every test pair
        split = PreparedSplit.load(tiny_prepared, "test")
        scores = score_split(model, split, 32, torch.device("cpu"), 8, 32)
        expected = retrieval_metrics(scores, torch.eye(split.n_captions), split.caption_image)
        assert {k: metrics[k] for k in expected} == pytest.approx(expected)


@pytest.mark.slow
def test_a_two_branch_finetune_starts_from_a_dual_path_pretrain(tiny_prepared, tmp_path, caplog):
    base = tiny_params(tmp_path / "base.yaml", epochs=1)
    train("pretrain", tiny_prepared, tmp_path / "pretrain", base)
    model, stage = METHODS["two_branch"][:2]
    params = method_params(tmp_path / "tb.yaml", model, epochs=1, **RANK_ONLY, **stage)
    caplog.set_level("INFO", logger="imtext.train")
    train(
        "finetune", tiny_prepared, tmp_path / "ft", params, "--init", tmp_path / "pretrain/model.pt"
    )
    assert "encoders loaded into a two_branch model; new parts ['net']" in caplog.text
    loaded, _ = load_model(tmp_path / "ft" / "model.pt")
    assert type(loaded) is TwoBranchModel


def test_an_invalid_combination_is_a_one_line_error_naming_the_key(tmp_path, capsys):
    params = method_params(
        tmp_path / "p.yaml", {"method": "similarity"}, ranking="batch_sum", **RANK_ONLY
    )
    args = ["pretrain", "--prepared", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*args, "--params", str(params)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("imtext: error: pretrain: ranking: model.method 'similarity'")
    assert "\n" not in err


PLAN = """
common: [pretrain.epochs=1, finetune.epochs=1]
configurations:
  - name: rank
    description: ranking only.
    stages: [finetune]
    overrides: ["finetune.loss_weights=[1, 0, 0]"]
  - name: inst_rank
    description: instance then ranking.
    stages: [pretrain, finetune]
contrasts: [[inst_rank, rank]]
"""


@pytest.mark.slow
def test_ablate_writes_the_table_and_resumes(tiny_prepared, tmp_path, caplog):
    params = tiny_params(tmp_path / "p.yaml")
    (tmp_path / "plan.yaml").write_text(PLAN)
    args = ["ablate", "--prepared", tiny_prepared, "--out", tmp_path / "runs",
            "--configs", tmp_path / "plan.yaml", "--seeds", 0, 1, "--params", params,
            "--device", "cpu", "--table-dir", tmp_path / "table"]  # fmt: skip
    args = [str(a) for a in args]
    assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "table" / "ablation.csv").open()))
    assert [(r["config"], r["seed"]) for r in rows] == [
        ("rank", "0"), ("rank", "1"), ("inst_rank", "0"), ("inst_rank", "1"),
        ("rank", "mean"), ("rank", "std"), ("inst_rank", "mean"), ("inst_rank", "std"),
    ]  # fmt: skip
    assert float(rows[4]["rsum"]) == pytest.approx(
        (float(rows[0]["rsum"]) + float(rows[1]["rsum"])) / 2, abs=0.01
    )
    table = (tmp_path / "table" / "ablation.md").read_text()
    assert "| inst_rank | pretrain → finetune |" in table and "inst_rank − rank:" in table
    run = tmp_path / "runs" / "runs" / "inst_rank" / "seed1"
    assert json.loads(
        (run / "pretrain" / "model.pt").exists() and (run / "result.json").read_text()
    )
    # Runs with a result are not trained again.
    caplog.clear()
    caplog.set_level("INFO")
    assert main(args) == 0
    assert "ablate: rank seed 0: rsum" in caplog.text and "seed 0: finetune" not in caplog.text
    # --table-only tabulates what has finished (seed 2 never ran) and trains nothing.
    (tmp_path / "runs" / "runs" / "rank" / "seed1" / "result.json").unlink()
    caplog.clear()
    assert main([*args[:-2], "--table-dir", str(tmp_path / "part"), "--seeds", "0", "1", "2",
                 "--table-only"]) == 0  # fmt: skip
    assert "finetune" not in caplog.text
    assert not (tmp_path / "runs" / "runs" / "rank" / "seed2").exists()
    rows = list(csv.DictReader((tmp_path / "part" / "ablation.csv").open()))
    assert [(r["config"], r["seed"]) for r in rows[:3]] == [
        ("rank", "0"), ("inst_rank", "0"), ("inst_rank", "1"),
    ]  # fmt: skip
    assert "| rank | finetune | 1 |" in (tmp_path / "part" / "ablation.md").read_text()
