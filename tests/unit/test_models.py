"""The models of imtext.models: the text CNN's shapes and padding, the image branch, the dual-path
model's shared classifier, backbone weight files and word2vec files. Sizes are tiny throughout."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from imtext.config import ModelConfig, config_from_dict, read_params
from imtext.errors import ConfigError
from imtext.models import build_model
from imtext.models.dual_path import DualPathModel, DualPathOutput
from imtext.models.image import (
    BACKBONE_DIM,
    ImageBranch,
    build_backbone,
    load_backbone_weights,
    projection_head,
)
from imtext.models.text import Bottleneck, TextCNN, WordConv, text_stages
from imtext.models.word2vec import init_word_embedding, read_word_vectors
from tests.conftest import REPO

WIDTH = 8
EMBED = 16
WORD_DIM = 8
VOCAB = 20
L = 32


def tiny_text_cnn(blocks=(1, 1, 1, 1)) -> TextCNN:
    torch.manual_seed(0)
    return TextCNN(VOCAB, WORD_DIM, WIDTH, list(blocks), EMBED)


def tokens(n: int = 3, length: int = L, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, length), generator=g)


def model_config(**overrides) -> ModelConfig:
    values = read_params(REPO / "params.yaml")["model"] | {
        "image_backbone": "resnet18",
        "image_weights": None,
        "image_size": 32,
        "embed_dim": EMBED,
        "word_dim": WORD_DIM,
        "word2vec": None,
        "text_width": WIDTH,
        "text_blocks": [1, 1, 1, 1],
    }
    return config_from_dict(ModelConfig, values | overrides, "params.yaml: model")


# ---------------------------------------------------------------------------------- text branch


def test_text_cnn_output_shape_and_post_relu():
    out = tiny_text_cnn()(tokens(3))
    assert out.shape == (3, EMBED)
    assert (out >= 0).all()


def test_text_cnn_lengths_and_channels_per_stage():
    blocks = [2, 1, 2, 1]
    model = tiny_text_cnn(blocks)
    shapes: list[tuple[int, ...]] = []
    hooks = [
        block.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
        for block in model.stages
    ]
    stage_input: list[tuple[int, ...]] = []
    hooks.append(
        model.stages.register_forward_pre_hook(lambda _m, args: stage_input.append(args[0].shape))
    )
    model(tokens(2, L))
    for hook in hooks:
        hook.remove()
    assert len(model.stages) == sum(blocks)
    assert tuple(stage_input[0]) == (2, WORD_DIM, 32)
    ends = np.cumsum(blocks) - 1  # the last block of each stage
    assert [shapes[i][2] for i in ends] == [32, 16, 8, 8]
    assert [shapes[i][1] for i in ends] == [WIDTH, 2 * WIDTH, 4 * WIDTH, 8 * WIDTH]
    # Every block of a stage has the stage's width and length, identity blocks included.
    stage_of_block = np.repeat(np.arange(4), blocks)
    for shape, stage in zip(shapes, stage_of_block, strict=True):
        assert shape == (2, WIDTH * 2**stage, [32, 16, 8, 8][stage])


def test_text_cnn_max_pools_over_positions():
    model = tiny_text_cnn().eval()
    seen: dict[str, torch.Tensor] = {}
    h1 = model.stages.register_forward_hook(lambda _m, _i, out: seen.update(stages=out))
    h2 = model.head.register_forward_pre_hook(lambda _m, args: seen.update(head=args[0]))
    model(tokens(2))
    h1.remove()
    h2.remove()
    assert torch.equal(seen["head"], seen["stages"].amax(dim=2))


def test_text_cnn_with_the_papers_sizes_has_14_bottlenecks_of_the_specified_widths():
    with torch.device("meta"):  # no memory, no initialisation cost
        model = TextCNN(vocab_size=10, word_dim=300, width=256, blocks=[3, 4, 6, 1], embed_dim=2048)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 14

    def widths(block: Bottleneck) -> tuple[int, int, int, int]:
        first, k2, last = block.body[0][0], block.body[2][0], block.body[4][0]
        assert isinstance(k2, WordConv) and k2.conv.kernel_size == (2,)
        return first.in_channels, first.out_channels, k2.conv.out_channels, last.out_channels

    # METHODS.md 1.1: only res-A's first block narrows; the later projection blocks keep full width.
    expected = (
        [(300, 128, 128, 256)]
        + [(256, 64, 64, 256)] * 2
        + [(256, 512, 512, 512)]
        + [(512, 128, 128, 512)] * 3
        + [(512, 1024, 1024, 1024)]
        + [(1024, 256, 256, 1024)] * 5
        + [(1024, 2048, 2048, 2048)]
    )
    assert [widths(b) for b in blocks] == expected
    strides = [b.body[2][0].conv.stride[0] for b in blocks]
    assert strides == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1]
    projected = [not isinstance(b.shortcut, nn.Identity) for b in blocks]
    assert [i for i, p in enumerate(projected) if p] == [0, 3, 7, 13]
    assert model.head[0].in_features == 2048


def test_text_stages_output_eight_times_width():
    stages = text_stages(5, 4, [1, 1, 1, 1])
    assert stages(torch.randn(2, 5, 12)).shape == (2, 32, 3)


def test_word_conv_is_left_padded_and_causal():
    torch.manual_seed(0)
    conv = WordConv(4, 5, stride=1)
    x = torch.randn(1, 4, 10)
    out = conv(x)
    assert out.shape == (1, 5, 10)
    # Position 0 sees only the zero pad on its left and itself.
    assert torch.allclose(out[..., 0], x[..., 0] @ conv.conv.weight[:, :, 1].T, atol=1e-6)
    for t in range(10):
        changed = x.clone()
        changed[..., t] = torch.randn(4)
        new = conv(changed)
        assert torch.equal(new[..., :t], out[..., :t]), t
        assert not torch.allclose(new[..., t], out[..., t]), t


@pytest.mark.parametrize("length", [32, 15, 1])
def test_strided_word_conv_halves_the_length_like_the_shortcut(length):
    block = Bottleneck(4, 4, 8, stride=2)
    out = block(torch.randn(2, 4, length))
    assert out.shape == (2, 8, (length + 1) // 2)


def test_padding_positions_carry_the_word_bias():
    model = tiny_text_cnn().eval()
    with torch.no_grad():
        model.word_bias.copy_(torch.arange(1.0, WORD_DIM + 1))
    assert torch.equal(model.words.weight[0], torch.zeros(WORD_DIM))  # padding_idx row
    seen: dict[str, torch.Tensor] = {}
    hook = model.word_bn.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    caption = torch.zeros(2, L, dtype=torch.long)
    caption[1, :3] = torch.tensor([4, 5, 6])
    model(caption)
    hook.remove()
    x = seen["x"]  # (N, word_dim, L)
    bias = model.word_bias.detach()
    assert torch.equal(x[0], bias[:, None].expand(WORD_DIM, L))
    assert x[0].abs().sum() > 0
    assert torch.equal(x[1, :, 3:], bias[:, None].expand(WORD_DIM, L - 3))
    words = model.words.weight.detach()[[4, 5, 6]] + bias
    assert torch.allclose(x[1, :, :3], words.T)


# --------------------------------------------------------------------------------- image branch


def test_image_branch_output_shape_and_post_relu():
    torch.manual_seed(0)
    branch = ImageBranch("resnet18", EMBED)
    out = branch(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, EMBED)
    assert (out >= 0).all()


def test_projection_head_layers():
    head = projection_head(6, 4, layers=2)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2
    assert head[0].bias is None and head[3].bias is None
    assert head[0].in_features == 6 and head[3].in_features == 4


def test_frozen_backbone_has_no_gradients_and_fixed_batchnorm_statistics():
    torch.manual_seed(0)
    branch = ImageBranch("resnet18", EMBED)
    branch.freeze_backbone(True)
    branch.train()
    assert all(not p.requires_grad for p in branch.backbone.parameters())
    assert all(p.requires_grad for p in branch.head.parameters())
    assert not branch.backbone.training
    assert not any(m.training for m in branch.backbone.modules())
    assert branch.training and branch.head.training

    backbone_stats = branch.backbone.bn1.running_mean.clone()
    layer4_stats = branch.backbone.layer4[-1].bn2.running_var.clone()
    head_stats = branch.head[1].running_mean.clone()
    out = branch(torch.randn(2, 3, 32, 32))
    assert torch.equal(branch.backbone.bn1.running_mean, backbone_stats)
    assert torch.equal(branch.backbone.layer4[-1].bn2.running_var, layer4_stats)
    assert not torch.equal(branch.head[1].running_mean, head_stats)
    out.sum().backward()
    assert all(p.grad is None for p in branch.backbone.parameters())
    assert branch.head[0].weight.grad is not None

    branch.freeze_backbone(False)
    assert branch.backbone.training
    assert all(p.requires_grad for p in branch.backbone.parameters())
    branch(torch.randn(2, 3, 32, 32))
    assert not torch.equal(branch.backbone.bn1.running_mean, backbone_stats)


def test_build_backbone_unknown_name():
    with pytest.raises(ConfigError, match="resnet9"):
        build_backbone("resnet9")


def test_build_backbone_returns_pooled_features():
    backbone = build_backbone("resnet18")
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, BACKBONE_DIM["resnet18"])


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision-style resnet18 state_dict, ``fc`` included."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    assert "fc.weight" in state
    path = tmp_path_factory.mktemp("weights") / "resnet18-test.pth"
    torch.save(state, path)
    return path, state


def test_load_backbone_weights_round_trip(resnet18_file):
    path, state = resnet18_file
    backbone = build_backbone("resnet18")
    load_backbone_weights(backbone, path)
    loaded = backbone.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_image_branch_loads_its_weights_file(resnet18_file):
    path, state = resnet18_file
    branch = ImageBranch("resnet18", EMBED, weights=str(path))
    assert torch.equal(branch.backbone.conv1.weight, state["conv1.weight"])


def test_load_backbone_weights_missing_file(tmp_path):
    path = tmp_path / "nothing.pth"
    with pytest.raises(ConfigError, match="nothing.pth"):
        load_backbone_weights(build_backbone("resnet18"), path)


def test_load_backbone_weights_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a weights file\x00\x01")
    with pytest.raises(ConfigError, match="garbage.pth"):
        load_backbone_weights(build_backbone("resnet18"), path)


def test_load_backbone_weights_of_another_architecture(tmp_path, resnet18_file):
    # resnet34 weights into resnet18: keys resnet18 does not have.
    path = tmp_path / "resnet34-test.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match="resnet34-test.pth"):
        load_backbone_weights(build_backbone("resnet18"), path)
    # resnet18 weights into resnet34: keys missing.
    with pytest.raises(ConfigError, match="resnet18-test.pth"):
        load_backbone_weights(build_backbone("resnet34"), resnet18_file[0])


def test_load_backbone_weights_with_mismatched_shapes(tmp_path, resnet18_file):
    # Same keys, other shapes: what resnet50's bottleneck 1x1 convs look like to resnet18.
    state = dict(resnet18_file[1])
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "shapes.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match="shapes.pth"):
        load_backbone_weights(build_backbone("resnet18"), path)


def test_load_backbone_weights_of_a_torch_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ConfigError, match="list.pth"):
        load_backbone_weights(build_backbone("resnet18"), path)


# ---------------------------------------------------------------------------- dual-path model


@pytest.fixture
def dual_path() -> DualPathModel:
    torch.manual_seed(0)
    return build_model(model_config(), vocab_size=VOCAB, n_classes=7)


def test_dual_path_outputs(dual_path):
    out = dual_path(torch.randn(4, 3, 32, 32), tokens(4))
    assert isinstance(out, DualPathOutput)
    assert out.image_emb.shape == (4, EMBED) and out.text_emb.shape == (4, EMBED)
    assert out.image_logits.shape == (4, 7) and out.text_logits.shape == (4, 7)
    for emb in (out.image_emb, out.text_emb):
        assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    dual_path.eval()
    images, caps = torch.randn(2, 3, 32, 32), tokens(2)
    assert torch.allclose(dual_path.encode_image(images).norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(dual_path.encode_text(caps).norm(dim=1), torch.ones(2), atol=1e-5)
    out = dual_path(images, caps)
    assert torch.allclose(dual_path.encode_image(images), out.image_emb, atol=1e-6)
    assert torch.allclose(dual_path.encode_text(caps), out.text_emb, atol=1e-6)


def test_dual_path_classifier_is_shared(dual_path):
    dual_path.eval()  # no dropout: the logits are the classifier applied to each branch
    images, caps = torch.randn(2, 3, 32, 32), tokens(2)
    # One (7, embed_dim) weight in the whole model.
    shaped = [n for n, p in dual_path.named_parameters() if p.shape == (7, EMBED)]
    assert shaped == ["classifier.weight"]
    with torch.no_grad():
        out = dual_path(images, caps)
        classifier = dual_path.classifier
        assert torch.allclose(out.image_logits, classifier(dual_path.image(images)), atol=1e-6)
        assert torch.allclose(out.text_logits, classifier(dual_path.text(caps)), atol=1e-6)
        classifier.weight.zero_()
        zeroed = dual_path(images, caps)
    bias = classifier.bias.detach().expand(2, 7)
    assert torch.allclose(zeroed.image_logits, bias) and torch.allclose(zeroed.text_logits, bias)
    assert not torch.allclose(out.image_logits, bias) and not torch.allclose(out.text_logits, bias)
    # Gradients of both branches' logits reach the same tensor.
    dual_path.train()
    out = dual_path(torch.randn(2, 3, 32, 32), caps)
    out.image_logits.sum().backward()
    image_grad = classifier.weight.grad.clone()
    classifier.weight.grad = None
    out.text_logits.sum().backward()
    assert image_grad.abs().sum() > 0 and classifier.weight.grad.abs().sum() > 0


def test_dual_path_classifier_bias_follows_the_config():
    model = DualPathModel(model_config(classifier_bias=False), VOCAB, 3)
    assert model.classifier.bias is None


# ------------------------------------------------------------------------------------- word2vec

VOCABULARY = ["<pad>", "<unk>", "red", "circle", "zebra"]
RED, CIRCLE, SQUARE, RED_UPPER = [0.5, -1.0, 2.0], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]


def write_text(path: Path, records: list[tuple[str, list[float]]], header: bool) -> Path:
    lines = [f"{len(records)} {len(records[0][1])}"] if header else []
    lines += [" ".join([word, *map(repr, vec)]) for word, vec in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_binary(path: Path, records: list[tuple[str, list[float]]], newline: bool = True) -> Path:
    data = f"{len(records)} {len(records[0][1])}\n".encode()
    for word, vec in records:
        data += word.encode() + b" " + struct.pack(f"<{len(vec)}f", *vec)
        if newline:
            data += b"\n"
    path.write_bytes(data)
    return path


FORMATS = {
    "text": lambda p, r: write_text(p, r, header=False),
    "text_header": lambda p, r: write_text(p, r, header=True),
    "binary": lambda p, r: write_binary(p, r, newline=True),
    "binary_no_newline": lambda p, r: write_binary(p, r, newline=False),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_word_vectors(tmp_path, fmt):
    path = FORMATS[fmt](
        tmp_path / "vectors", [("red", RED), ("square", SQUARE), ("circle", CIRCLE)]
    )
    vectors, found = read_word_vectors(path, VOCABULARY, 3)
    assert vectors.dtype == np.float32 and vectors.shape == (5, 3)
    assert found.tolist() == [False, False, True, True, False]
    np.testing.assert_array_equal(vectors[2], RED)
    np.testing.assert_array_equal(vectors[3], CIRCLE)
    np.testing.assert_array_equal(vectors[[0, 1, 4]], np.zeros((3, 3)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_word_vectors_case_fallback(tmp_path, fmt):
    path = FORMATS[fmt](tmp_path / "vectors", [("Red", RED_UPPER), ("CIRCLE", CIRCLE)])
    vectors, found = read_word_vectors(path, VOCABULARY, 3)
    assert found.tolist() == [False, False, True, True, False]
    np.testing.assert_array_equal(vectors[2], RED_UPPER)
    np.testing.assert_array_equal(vectors[3], CIRCLE)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("exact_first", [True, False])
def test_read_word_vectors_exact_match_wins(tmp_path, fmt, exact_first):
    records = [("red", RED), ("Red", RED_UPPER), ("RED", SQUARE)]
    if not exact_first:
        records = records[::-1]
    vectors, found = read_word_vectors(FORMATS[fmt](tmp_path / "v", records), VOCABULARY, 3)
    assert found[2]
    np.testing.assert_array_equal(vectors[2], RED)


def test_read_word_vectors_first_case_variant_wins_without_exact_match(tmp_path):
    path = write_text(tmp_path / "v.txt", [("Red", RED_UPPER), ("RED", SQUARE)], header=False)
    vectors, _ = read_word_vectors(path, VOCABULARY, 3)
    np.testing.assert_array_equal(vectors[2], RED_UPPER)


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_word_vectors_wrong_dimension(tmp_path, fmt):
    path = FORMATS[fmt](tmp_path / "vectors", [("red", RED), ("circle", CIRCLE)])
    with pytest.raises(ConfigError, match="word_dim") as info:
        read_word_vectors(path, VOCABULARY, 4)
    assert str(path) in str(info.value)


def test_read_word_vectors_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="absent.bin"):
        read_word_vectors(tmp_path / "absent.bin", VOCABULARY, 3)


def test_read_word_vectors_text_line_with_non_numbers(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("red 0.5 -1 2\ncircle 1 two 3\n")
    with pytest.raises(ConfigError, match="line 2") as info:
        read_word_vectors(path, VOCABULARY, 3)
    assert str(path) in str(info.value)


def test_read_word_vectors_bad_line_number_counts_the_header(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("2 3\nred 0.5 -1 2\ncircle 1 two 3\n")
    with pytest.raises(ConfigError, match="line 3"):
        read_word_vectors(path, VOCABULARY, 3)


def test_read_word_vectors_skips_blank_lines_and_windows_line_ends(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"red 0.5 -1 2\r\n\r\ncircle 1 2 3\r\n")
    vectors, found = read_word_vectors(path, VOCABULARY, 3)
    assert found.tolist() == [False, False, True, True, False]
    np.testing.assert_array_equal(vectors[3], CIRCLE)


def test_init_word_embedding_copies_found_rows_and_keeps_padding_zero():
    torch.manual_seed(0)
    embedding = nn.Embedding(5, 3, padding_idx=0)
    before = embedding.weight.detach().clone()
    vectors = np.arange(15, dtype=np.float32).reshape(5, 3) + 1
    found = np.array([True, False, True, True, False])  # even a found padding row stays zero
    init_word_embedding(embedding, vectors, found)
    weight = embedding.weight.detach()
    assert torch.equal(weight[0], torch.zeros(3))
    assert torch.equal(weight[2:4], torch.from_numpy(vectors[2:4]))
    assert torch.equal(weight[[1, 4]], before[[1, 4]])
    assert embedding.weight.requires_grad


def test_init_word_embedding_with_nothing_found():
    embedding = nn.Embedding(4, 3, padding_idx=0)
    before = embedding.weight.detach().clone()
    init_word_embedding(embedding, np.zeros((4, 3), np.float32), np.zeros(4, bool))
    assert torch.equal(embedding.weight.detach(), before)
