"""The guard against a model that does not learn (issue 13): the default recipe of params.yaml,
trained briefly on a slice of the built-in dataset, must retrieve far better than a model that
knows only each image's background colour (the plateau every earlier default sat on)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from imtext.config import read_params, stage_config_from_params
from imtext.data.shapes import background_plateau_rsum
from imtext.data.store import PreparedSplit
from imtext.eval.embed import retrieval_inputs
from imtext.eval.metrics import retrieval_metrics
from imtext.train.loop import train_stage
from tests.conftest import REPO, prepared_shapes

#: 1,440 images: 960 train, 240 val, 240 test (imtext data shapes: val = test = N // 6).
N_IMAGES = 1440
#: Training passes over the slice (90 steps of 128): about 3 epochs of the full dataset.
EPOCHS = 12
#: How far above the background plateau the trained model must be.
FACTOR = 2.5
#: Training seeds, tried in turn until one passes. On this slice the default recipe takes off
#: late for some seeds: measured at 12 epochs, seeds 0-5 reached test rsum 204.1, 229.4, 249.9,
#: 94.3, 240.5 and 124.8 (plateau 64.8, bar 162); at 9 epochs, with the earlier draws, seeds 0-3
#: reached 255.2, 179.1, 210.1 and 116.1. Each run is deterministic (one thread, fixed seeds), but
#: a change that only moves the random draws (bench/README.md, bench_train) acts like a new seed.
#: A second seed makes such a change fail the guard about 1 time in 9 instead of 1 in 3; a recipe
#: on the plateau fails both. The first passing seed ends the test, so it costs one training run
#: unless seed 0 falls short: 78 s alone on 2 idle cores. Cheaper budgets were worse (seeds 0-3,
#: one thread each): 8 epochs reached 120.6, 163.6, 193.4, 77.4; 8 epochs at lr 4e-3 138.9, 66.8,
#: 66.5, 65.8; batch 64 for 8 epochs 101.8, 80.0, 224.4, 68.9; batch 32 for 6 epochs 202.0, 85.2,
#: 86.2, 76.7.
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def slice_prepared(tmp_path_factory) -> Path:
    return prepared_shapes(tmp_path_factory.mktemp("learning"), N_IMAGES, seed=5, size=64)


def test_background_plateau_is_the_recall_of_a_background_only_ranking():
    # Hand-worked: two backgrounds of 2 images with 1 caption each; at K=1 a query finds its
    # item with probability 1/2 in both directions, at K=5 surely.
    assert background_plateau_rsum(["a", "a", "b", "b"], 1, ks=(1,)) == pytest.approx(100.0)
    assert background_plateau_rsum(["a", "a", "b", "b"], 1, ks=(5,)) == pytest.approx(200.0)
    # Two captions each: image->text finds one of its 2 among 4 at K=1 with probability 1/2.
    assert background_plateau_rsum(["a", "a"], 2, ks=(1,)) == pytest.approx(100.0)
    # A 1,000-image split of 5 equally common backgrounds: the plateau of issue 13, ~16.
    assert background_plateau_rsum([str(i % 5) for i in range(1000)]) == pytest.approx(
        15.9, abs=0.2
    )


def _train_the_default_recipe_briefly(prepared: Path, out: Path, seed: int) -> float:
    """Stage I then Stage II of params.yaml's recipe with ``EPOCHS`` in all and training seed
    ``seed``; returns the model's test rsum."""
    params = read_params(REPO / "params.yaml")
    model_cfg = stage_config_from_params("model", params)
    pretrain_cfg = stage_config_from_params("pretrain", params)
    finetune_cfg = stage_config_from_params("finetune", params)
    # The same split of the budget between the stages as the full run, in fewer epochs.
    total = pretrain_cfg.epochs + finetune_cfg.epochs
    stage1 = round(EPOCHS * pretrain_cfg.epochs / total)
    common = {"eval_every": EPOCHS, "patience": None, "seed": seed}
    init = None
    if stage1:
        pretrain_cfg = dataclasses.replace(
            pretrain_cfg,
            epochs=stage1,
            warmup_epochs=min(pretrain_cfg.warmup_epochs, stage1),
            **common,
        )
        train_stage(
            "pretrain", model_cfg, pretrain_cfg, prepared, out / "pretrain",
            device="cpu", progress=False,
        )  # fmt: skip
        init = out / "pretrain" / "model.pt"
    finetune_cfg = dataclasses.replace(finetune_cfg, epochs=EPOCHS - stage1, **common)
    train_stage(
        "finetune", model_cfg, finetune_cfg, prepared, out / "finetune",
        init=init, device="cpu", progress=False,
    )  # fmt: skip

    from imtext.models.files import load_model

    model, _ = load_model(out / "finetune" / "model.pt")
    test = PreparedSplit.load(prepared, "test")
    images, texts = retrieval_inputs(model, test, model_cfg.image_size, torch.device("cpu"))
    return retrieval_metrics(images, texts, test.caption_image)["rsum"]


@pytest.mark.slow
def test_the_default_recipe_learns_far_above_the_background_plateau(slice_prepared, tmp_path):
    """params.yaml's recipe, only shorter, trained with its own loader; test recall on 240
    images against the recall of a ranking that knows only each image's background."""
    annotations = json.loads((slice_prepared.parent / "shapes" / "dataset.json").read_text())
    backgrounds = [
        im["scene"]["background"] for im in annotations["images"] if im["split"] == "test"
    ]
    plateau = background_plateau_rsum(backgrounds)
    reached = {}
    for seed in SEEDS:
        reached[seed] = _train_the_default_recipe_briefly(
            slice_prepared, tmp_path / f"s{seed}", seed
        )
        if reached[seed] >= FACTOR * plateau:
            return
    pytest.fail(
        f"test rsum on {len(backgrounds)} images by training seed "
        + ", ".join(f"{seed}: {rsum:.1f}" for seed, rsum in reached.items())
        + f"; none is {FACTOR}x the background plateau {plateau:.1f}: the default recipe no "
        "longer learns (docs/training.md)"
    )


def test_a_stage_of_zero_epochs_passes_its_initial_model_on(tiny_prepared, tmp_path):
    """``pretrain.epochs: 0`` (the default): Stage I trains nothing, its model.pt is the model it
    was built as, and Stage II starts from exactly that."""
    from imtext.config import ModelConfig
    from imtext.data.store import read_vocabulary
    from imtext.models import build_model
    from imtext.models.files import load_model
    from tests.conftest import TINY_MODEL

    params = read_params(REPO / "params.yaml")
    model_cfg = ModelConfig(**TINY_MODEL)
    cfg = dataclasses.replace(
        stage_config_from_params("pretrain", params), epochs=0, batch_size=8, workers=0
    )
    logged: list[tuple[dict, int]] = []
    metrics = train_stage(
        "pretrain", model_cfg, cfg, tiny_prepared, tmp_path / "pretrain", device="cpu",
        progress=False, log=lambda m, step: logged.append((m, step)),
    )  # fmt: skip
    assert metrics == {"best_epoch": 0, "epochs": 0, "steps": 0}
    assert logged == [({"epoch": 0}, 0)]
    assert json.loads((tmp_path / "pretrain" / "history.json").read_text()) == []
    # Every output dvc.yaml declares for the stage exists (dvc repro fails on a missing one);
    # log.jsonl is the CLI's log callable's, not train_stage's.
    stage_outs = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["pretrain"]["outs"]
    for out in stage_outs:
        path = Path(out if isinstance(out, str) else next(iter(out)))
        assert path.name == "log.jsonl" or (tmp_path / "pretrain" / path.name).is_file(), path
    passed, record = load_model(tmp_path / "pretrain" / "model.pt")
    assert record["epoch"] == 0
    torch.manual_seed(cfg.seed)
    n_classes = int(PreparedSplit.load(tiny_prepared, "train").image_labels.max()) + 1
    built = build_model(model_cfg, len(read_vocabulary(tiny_prepared)), n_classes)
    for key, value in built.state_dict().items():
        assert torch.equal(passed.state_dict()[key], value), key
