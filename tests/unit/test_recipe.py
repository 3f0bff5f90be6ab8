"""The parts of the recipe that learns (issue 13, docs/training.md): schedules, the embedding
before the ReLU, the text CNN's strides, the GRU text encoder, the ResNet stems, the cosine
classifier, the shift augmentation and bf16 on the CPU."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from PIL import Image

from imtext.config import ModelConfig, TrainConfig, config_from_dict, read_params
from imtext.data.datasets import train_transform
from imtext.errors import ConfigError
from imtext.models import build_model
from imtext.models.dual_path import CosineClassifier
from imtext.models.image import ImageBranch, build_backbone, projection_head
from imtext.models.text import TextCNN, TextGRU
from imtext.train.loop import autocast_for, cpu_has_bf16
from imtext.train.schedule import lr_at_time
from tests.conftest import REPO, TINY_MODEL

PARAMS = read_params(REPO / "params.yaml")


def train_config(**overrides) -> TrainConfig:
    return config_from_dict(TrainConfig, PARAMS["finetune"] | overrides, "finetune")


def model_config(**overrides) -> ModelConfig:
    return config_from_dict(ModelConfig, TINY_MODEL | overrides, "model")


# ------------------------------------------------------------------------------- schedules


def test_cosine_schedule_warms_up_linearly_then_falls_to_zero():
    cfg = train_config(lr=1.0, epochs=4, warmup_epochs=1.0, lr_schedule="cosine", lr_milestones=[])
    # Hand-worked: half-way through the warm-up 0.5; the peak at t=1; the cosine's middle
    # (t = 1 + 3/2) 0.5; cos(pi/3) = 0.5 -> (1 + 0.5) / 2 = 0.75 at t = 2; 0 at the end.
    assert lr_at_time(0.5, cfg) == pytest.approx(0.5)
    assert lr_at_time(1.0, cfg) == pytest.approx(1.0)
    assert lr_at_time(2.0, cfg) == pytest.approx(0.75)
    assert lr_at_time(2.5, cfg) == pytest.approx(0.5)
    assert lr_at_time(4.0, cfg) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_without_warm_up_is_the_old_per_epoch_schedule():
    cfg = train_config(
        lr=0.1, epochs=6, lr_schedule="step", lr_milestones=[5], lr_gamma=0.1, warmup_epochs=0.0
    )
    assert [lr_at_time(t, cfg) for t in (0.0, 4.99, 5.0)] == pytest.approx([0.1, 0.1, 0.01])
    warm = dataclasses.replace(cfg, warmup_epochs=2.0)
    assert lr_at_time(1.0, warm) == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"warmup_epochs": 7.0, "epochs": 6}, "warmup_epochs"),
        ({"warmup_epochs": -0.5}, "warmup_epochs"),
        ({"lr_schedule": "cosine", "lr_milestones": [3]}, "lr_milestones"),
    ],
)
def test_schedule_settings_that_cannot_work_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^finetune\.{key}: "):
        train_config(**overrides)


# ---------------------------------------------------------------------------- embeddings


def test_the_pre_relu_head_ends_in_batchnorm_and_can_be_negative():
    torch.manual_seed(0)
    pre, post = projection_head(6, 4, 2, final_relu=False), projection_head(6, 4, 2)
    assert isinstance(pre[-1], torch.nn.BatchNorm1d) and isinstance(post[-1], torch.nn.ReLU)
    x = torch.randn(16, 6)
    assert (pre(x) < 0).any() and (post(x) >= 0).all()


def test_pre_relu_model_embeddings_leave_the_positive_orthant():
    torch.manual_seed(0)
    model = build_model(model_config(embedding="pre_relu"), 12, 6).eval()
    with torch.no_grad():
        images = model.encode_image(torch.randn(4, 3, 32, 32))
        texts = model.encode_text(torch.randint(1, 12, (4, 32)))
    assert (images < 0).any() and (texts < 0).any()
    assert torch.allclose(images.norm(dim=1), torch.ones(4), atol=1e-5)


# ------------------------------------------------------------------------------ text encoders


def test_stride_one_text_cnn_keeps_every_position_to_the_pool():
    strided = TextCNN(10, 8, 4, [1, 1, 1, 1], 16, strides=[1, 2, 2, 1])
    flat = TextCNN(10, 8, 4, [1, 1, 1, 1], 16, strides=[1, 1, 1, 1])
    x = torch.randn(2, 8, 32)
    assert strided.stages(x).shape == (2, 32, 8)
    assert flat.stages(x).shape == (2, 32, 32)
    with pytest.raises(ConfigError, match=r"^model\.text_strides: "):
        model_config(text_strides=[1, 3, 1, 1])


def test_gru_text_encoder_pools_over_words_only_and_stays_finite_on_padding():
    torch.manual_seed(0)
    gru = TextGRU(10, 8, 4, 16, final_relu=False).eval()
    tokens = torch.tensor([[3, 4, 5, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        out = gru(tokens)
        states, _ = gru.gru(gru.words(tokens))
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    # The first caption's pooled vector is the max over its 3 word positions only: changing
    # the GRU's outputs at the padding positions (here via the head's input) changes nothing.
    with torch.no_grad():
        expected = gru.head(states[:, :3].amax(dim=1))
    assert torch.allclose(out[0], expected[0], atol=1e-6)


def test_gru_model_builds_from_the_config_and_trains():
    torch.manual_seed(0)
    model = build_model(model_config(text_encoder="gru", embedding="pre_relu"), 12, 6)
    out = model(torch.randn(4, 3, 32, 32), torch.randint(1, 12, (4, 32)))
    (out.image_emb @ out.text_emb.T).trace().backward()
    assert model.text.gru.weight_ih_l0.grad is not None


# ------------------------------------------------------------------------------ image stems


@pytest.mark.parametrize(("stem", "side"), [("standard", 2), ("no_maxpool", 4), ("cifar", 8)])
def test_stems_leave_a_64px_image_at_the_documented_size(stem, side):
    net = build_backbone("resnet18", stem)
    x = net.conv1(torch.zeros(1, 3, 64, 64))
    x = net.maxpool(net.relu(net.bn1(x)))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    assert x.shape[-2:] == (side, side)


def test_imagenet_weights_do_not_fit_the_cifar_stem(tmp_path):
    with pytest.raises(ConfigError, match="^model.image_weights: .*cifar"):
        ImageBranch("resnet18", 8, weights=str(tmp_path / "w.pth"), stem="cifar")
    with pytest.raises(ConfigError, match="^image_stem: unknown"):
        build_backbone("resnet18", "tiny")


# ------------------------------------------------------------------------------ classifier


def test_cosine_classifier_is_a_scaled_cosine_of_feature_and_class_vector():
    classifier = CosineClassifier(2, 2, scale=10.0)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    logits = classifier(torch.tensor([[2.0, 2.0]]))
    # cos 45 degrees with both class vectors, whatever their lengths.
    assert logits[0].tolist() == pytest.approx([10 / math.sqrt(2), 10 / math.sqrt(2)])
    with pytest.raises(ConfigError, match=r"^model\.classifier_bias: "):
        model_config(classifier="cosine", classifier_bias=True)
    model = build_model(model_config(classifier="cosine", classifier_bias=False), 12, 6)
    assert isinstance(model.classifier, CosineClassifier)
    assert model.classifier.weight.shape == (6, TINY_MODEL["embed_dim"])


# ---------------------------------------------------------------------------- augmentation


def test_shift_augment_moves_the_whole_image_by_at_most_a_sixteenth():
    image = Image.new("RGB", (128, 128), (0, 0, 0))
    image.paste((255, 255, 255), (56, 56, 72, 72))  # a 16 px square in the middle
    transform = train_transform(64, False, augment="shift", mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(0)
    for _ in range(10):
        x = transform(image)
        assert x.shape == (3, 64, 64)
        rows, cols = torch.nonzero(x[0] > 0.5, as_tuple=True)
        # The square is 8 px at 64 px, and it moves by no more than 4 px from the centre.
        assert rows.max() - rows.min() + 1 == pytest.approx(8, abs=1)
        assert abs((rows.min() + rows.max()) / 2 - 31.5) <= 4.5
        assert abs((cols.min() + cols.max()) / 2 - 31.5) <= 4.5


# ------------------------------------------------------------------------------- precision


def test_cpu_autocasts_to_bf16_only_where_the_cpu_has_it():
    cpu = torch.device("cpu")
    with autocast_for(cpu, "bf16"):
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    with autocast_for(cpu, "fp32"), autocast_for(cpu, "fp16"):
        assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == (
            torch.float32
        )
