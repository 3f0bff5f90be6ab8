"""Pieces of the training loop: the learning-rate schedule and parameter groups, candidate
sampling for hard negatives, checkpoint files and RNG state, and the range checks of the model and
training configs. Sizes are tiny throughout."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from imtext.config import ModelConfig, TrainConfig, config_from_dict, read_params
from imtext.errors import ConfigError, DataError, ImtextError
from imtext.models import build_model
from imtext.models.dual_path import DualPathModel
from imtext.models.files import FORMAT, load_file, load_model, model_record, save_atomic
from imtext.train.checkpoint import rng_state, set_rng_state
from imtext.train.sampling import sample_candidates
from imtext.train.schedule import build_optimizer, lr_at, parameter_groups, set_epoch_lr
from tests.conftest import REPO

PARAMS = read_params(REPO / "params.yaml")
VOCAB = 12
N_CLASSES = 5


def model_config(**overrides) -> ModelConfig:
    small = {
        "image_backbone": "resnet18",
        "image_weights": None,
        "image_size": 32,
        "embed_dim": 16,
        "word_dim": 8,
        "word2vec": None,
        "text_width": 8,
        "text_blocks": [1, 1, 1, 1],
    }
    return config_from_dict(ModelConfig, PARAMS["model"] | small | overrides, "params.yaml: model")


def train_config(**overrides) -> TrainConfig:
    return config_from_dict(TrainConfig, PARAMS["finetune"] | overrides, "params.yaml: finetune")


def tiny_model(seed: int = 0, **overrides) -> DualPathModel:
    torch.manual_seed(seed)
    return build_model(model_config(**overrides), VOCAB, N_CLASSES)


def batch(seed: int = 0, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, VOCAB, (n, 32), generator=g)


# ------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize(
    ("epoch", "factor"), [(0, 1.0), (1, 1.0), (2, 0.1), (3, 0.1), (4, 0.01), (5, 0.01), (50, 0.01)]
)
def test_lr_at_steps_at_the_milestones(epoch, factor):
    assert lr_at(epoch, 0.5, [2, 4], 0.1) == pytest.approx(0.5 * factor)


def test_lr_at_without_milestones_is_constant():
    assert lr_at(100, 0.05, [], 0.1) == 0.05


def group_by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def test_parameter_groups_cover_every_trainable_parameter_once():
    model = tiny_model()
    groups = parameter_groups(model, train_config(backbone_lr_mult=0.01, word_lr_mult=0.001))
    named = group_by_name(groups)
    assert list(named) == ["backbone", "words", "new"]
    assert named["backbone"]["lr_mult"] == 0.01
    assert named["words"]["lr_mult"] == 0.001
    assert named["new"]["lr_mult"] == 1.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("image.backbone.") for p in named["backbone"]["params"])
    assert {names[id(p)] for p in named["words"]["params"]} == {
        "text.words.weight",
        "text.word_bias",
    }
    new = {names[id(p)] for p in named["new"]["params"]}
    assert {"classifier.weight", "text.word_bn.weight", "image.head.0.weight"} <= new
    assert not any(n.startswith("image.backbone.") for n in new)


def test_parameter_groups_zero_multiplier_freezes_the_backbone():
    model = tiny_model()
    groups = parameter_groups(model, train_config(backbone_lr_mult=0.0))
    assert [g["name"] for g in groups] == ["words", "new"]
    assert all(not p.requires_grad for p in model.image.backbone.parameters())
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert not grouped & {id(p) for p in model.image.backbone.parameters()}


def test_parameter_groups_zero_word_multiplier_freezes_the_words():
    model = tiny_model()
    groups = parameter_groups(model, train_config(word_lr_mult=0.0))
    assert [g["name"] for g in groups] == ["backbone", "new"]
    assert not model.text.words.weight.requires_grad and not model.text.word_bias.requires_grad
    assert model.text.word_bn.weight.requires_grad


def test_build_optimizer_sgd_with_nesterov_and_group_rates():
    cfg = train_config(
        optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, backbone_lr_mult=0.1
    )
    optimizer = build_optimizer(parameter_groups(tiny_model(), cfg), cfg)
    assert type(optimizer) is torch.optim.SGD
    for group in optimizer.param_groups:
        assert group["nesterov"] is True
        assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
        assert group["lr"] == pytest.approx(0.01 * group["lr_mult"])
    assert group_by_name(optimizer.param_groups)["backbone"]["lr"] == pytest.approx(0.001)


def test_build_optimizer_sgd_without_momentum_is_plain():
    cfg = train_config(optimizer="sgd", momentum=0.0)
    optimizer = build_optimizer(parameter_groups(tiny_model(), cfg), cfg)
    assert type(optimizer) is torch.optim.SGD
    assert all(g["nesterov"] is False for g in optimizer.param_groups)


def test_build_optimizer_adam_is_adamw():
    cfg = train_config(optimizer="adam", lr=1e-3, momentum=0.8, weight_decay=0.01)
    optimizer = build_optimizer(parameter_groups(tiny_model(), cfg), cfg)
    assert type(optimizer) is torch.optim.AdamW
    for group in optimizer.param_groups:
        assert group["betas"] == (0.8, 0.999) and group["weight_decay"] == 0.01
        assert group["lr"] == pytest.approx(1e-3 * group["lr_mult"])


def test_set_epoch_lr_scales_every_group():
    cfg = train_config(
        lr=0.01, lr_schedule="step", lr_milestones=[4], lr_gamma=0.1, word_lr_mult=0.001
    )
    optimizer = build_optimizer(parameter_groups(tiny_model(), cfg), cfg)
    assert set_epoch_lr(optimizer, 3, cfg) == pytest.approx(0.01)
    assert set_epoch_lr(optimizer, 5, cfg) == pytest.approx(0.001)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.001 * group["lr_mult"])
    assert group_by_name(optimizer.param_groups)["words"]["lr"] == pytest.approx(1e-6)


# ------------------------------------------------------------------------------------ sampling


def test_sample_candidates_excludes_batch_labels():
    caption_labels = np.repeat(np.arange(50), 5)  # 5 captions per image
    batch_labels = np.arange(0, 50, 2)  # half the images are in the batch
    picked = sample_candidates(np.random.default_rng(0), caption_labels, batch_labels, 64)
    assert picked.shape == (64,)
    assert np.issubdtype(picked.dtype, np.integer)
    assert ((picked >= 0) & (picked < len(caption_labels))).all()
    assert not np.isin(caption_labels[picked], batch_labels).any()


def test_sample_candidates_is_reproducible():
    labels, batch_labels = np.repeat(np.arange(30), 3), np.array([1, 2, 3])
    a = sample_candidates(np.random.default_rng(7), labels, batch_labels, 32)
    b = sample_candidates(np.random.default_rng(7), labels, batch_labels, 32)
    c = sample_candidates(np.random.default_rng(8), labels, batch_labels, 32)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_candidates_falls_back_when_valid_captions_are_rare():
    labels = np.zeros(1000, dtype=np.int64)
    labels[537] = 1
    picked = sample_candidates(np.random.default_rng(0), labels, np.array([0]), 16)
    assert picked.tolist() == [537] * 16


def test_sample_candidates_every_caption_in_the_batch():
    labels = np.array([0, 0, 1, 1, 2])
    with pytest.raises(DataError):
        sample_candidates(np.random.default_rng(0), labels, np.array([2, 1, 0]), 8)


def test_sample_candidates_without_captions():
    with pytest.raises(DataError):
        sample_candidates(np.random.default_rng(0), np.array([], dtype=np.int64), np.array([0]), 8)


# ---------------------------------------------------------------------------------- checkpoints


def test_save_atomic_and_load_file_round_trip(tmp_path):
    record = {"format": FORMAT, "tensor": torch.arange(4.0), "settings": {"a": [1, 2], "b": None}}
    path = tmp_path / "sub" / "model.pt"
    save_atomic(record, path)
    loaded = load_file(path, "model file")
    assert torch.equal(loaded["tensor"], record["tensor"])
    assert loaded["settings"] == record["settings"]
    save_atomic(record | {"tensor": torch.zeros(2)}, path)  # replaces the file
    assert torch.equal(load_file(path, "model file")["tensor"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]


def test_save_atomic_failure_keeps_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"format": FORMAT, "epoch": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises for a lambda
        save_atomic({"format": FORMAT, "bad": lambda: 0}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert load_file(path, "checkpoint")["epoch"] == 1


def test_load_file_missing(tmp_path):
    with pytest.raises(ImtextError, match="checkpoint not found"):
        load_file(tmp_path / "checkpoint.pt", "checkpoint")


def test_load_file_garbage(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x00\x01 definitely not a torch file")
    with pytest.raises(ImtextError, match="model.pt"):
        load_file(path, "model file")


@pytest.mark.parametrize(
    "obj", [{"state_dict": {}}, {"format": FORMAT + 1}, [1, 2], torch.zeros(2)]
)
def test_load_file_without_the_format_key(tmp_path, obj):
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    with pytest.raises(ImtextError, match="not an imtext model file"):
        load_file(path, "model file")


def test_model_record_and_load_model_rebuild_the_model(tmp_path):
    model = tiny_model()
    images, caps = batch(0, n=4)
    model.train()
    model(images, caps)  # move the BatchNorm running statistics off their defaults
    model.eval()
    # Paths of the original weights files are recorded but never reopened by load_model.
    cfg = model_config(image_weights=str(tmp_path / "gone.pth"), word2vec=str(tmp_path / "w.bin"))
    path = tmp_path / "model.pt"
    save_atomic(model_record(model, cfg, VOCAB, N_CLASSES, epoch=3), path)

    loaded, record = load_model(path)
    assert not loaded.training
    assert record["epoch"] == 3 and record["vocab_size"] == VOCAB
    assert record["model_config"]["image_weights"] == str(tmp_path / "gone.pth")
    assert loaded.classifier.out_features == N_CLASSES
    with torch.no_grad():
        expected, got = model(*batch(1)), loaded(*batch(1))
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_rng_state_round_trip_for_torch_and_python(tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    torch.rand(3), random.random(), random.gauss(0, 1)  # states mid-stream, not fresh seeds
    path = tmp_path / "checkpoint.pt"
    save_atomic({"format": FORMAT, "rng": rng_state()}, path)  # as the loop stores it
    expected = torch.rand(5), [random.random() for _ in range(3)]
    set_rng_state(load_file(path, "checkpoint")["rng"])
    got = torch.rand(5), [random.random() for _ in range(3)]
    assert torch.equal(got[0], expected[0])
    assert got[1] == expected[1]


def test_rng_state_round_trip_for_numpy_right_after_seeding():
    np.random.seed(0)
    state = rng_state()
    expected = np.random.rand(5)
    set_rng_state(state)
    assert np.array_equal(np.random.rand(5), expected)


def test_rng_state_round_trip_for_numpy_mid_stream():
    np.random.seed(0)
    np.random.rand(3)
    state = rng_state()
    expected = np.random.rand(5)
    set_rng_state(state)
    assert np.array_equal(np.random.rand(5), expected)


# ------------------------------------------------------------------------------ config checks


def test_repository_model_and_training_sections_are_valid():
    config_from_dict(ModelConfig, PARAMS["model"], "params.yaml: model")
    for stage in ("pretrain", "finetune"):
        config_from_dict(TrainConfig, PARAMS[stage], f"params.yaml: {stage}")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("text_blocks", [3, 4, 6]),
        ("text_blocks", [3, 4, 6, 1, 1]),
        ("text_blocks", [3, 0, 6, 1]),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("embed_dim", 0),
        ("text_width", 0),
    ],
)
def test_model_config_rejects(key, value):
    with pytest.raises(ConfigError) as info:
        config_from_dict(ModelConfig, PARAMS["model"] | {key: value}, "params.yaml: model")
    assert str(info.value).startswith(f"params.yaml: model.{key}:")


@pytest.mark.parametrize(
    "overrides",
    [
        {"batch_size": 31, "ranking": "paired_hard"},
        {"batch_size": 31, "ranking": "paired_random"},
        {"batch_size": 0},
        {"loss_weights": [2.0, 1.0]},
        {"loss_weights": [2.0, 1.0, 0.1, 1.0]},
        {"loss_weights": [2.0, -1.0, 0.1]},
        {"crop_scale": 0},
        {"crop_scale": 1.5},
        {"lr": -0.1},
        {"patience": 0},
        {"candidate_pool": 0},
    ],
)
def test_train_config_rejects(overrides):
    key = next(iter(overrides))
    with pytest.raises(ConfigError) as info:
        config_from_dict(TrainConfig, PARAMS["finetune"] | overrides, "params.yaml: finetune")
    assert str(info.value).startswith(f"params.yaml: finetune.{key}:")


def test_odd_batch_size_is_fine_without_paired_ranking():
    assert train_config(batch_size=31, ranking="batch_sum").batch_size == 31
    assert train_config(crop_scale=1).crop_scale == 1.0
