"""The models of the other seed methods: the two-branch embedding and similarity networks (seed 003)
and the modality discriminator (seed 002). Shapes, normalisation, pair order, sizes tiny."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import imtext.models as models_pkg
from imtext.models import (
    ModalityDiscriminator,
    SimilarityNetwork,
    TwoBranchEmbedding,
    TwoBranchOutput,
    branch,
    score_head,
)

IMAGE_DIM, TEXT_DIM, HIDDEN, EMBED = 12, 7, 16, 8


def feats(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def embedding_net(**kwargs) -> TwoBranchEmbedding:
    torch.manual_seed(0)
    return TwoBranchEmbedding(IMAGE_DIM, TEXT_DIM, HIDDEN, EMBED, **kwargs)


def similarity_net(**kwargs) -> SimilarityNetwork:
    torch.manual_seed(0)
    return SimilarityNetwork(IMAGE_DIM, TEXT_DIM, HIDDEN, EMBED, **kwargs)


def test_new_model_modules_import_only_torch():
    root = Path(models_pkg.__file__).parent
    for name in ("two_branch", "discriminator"):
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                allowed = module.split(".")[0] in {"__future__", "typing", "torch"}
                assert allowed or module.startswith("imtext.models."), (name, module)


# ----------------------------------------------------------------------------------- branch


def test_branch_is_the_official_layer_stack():
    layers = branch(IMAGE_DIM, HIDDEN, EMBED, dropout=0.5, bn_momentum=0.9)
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features) == (IMAGE_DIM, HIDDEN)
    assert (layers[4].in_features, layers[4].out_features) == (HIDDEN, EMBED)
    assert layers[1].momentum == 0.9 and layers[1].eps == 1e-5 and layers[3].p == 0.5


@pytest.mark.parametrize(
    ("args", "match"),
    [((0, 4, 4, 0.1), "in_dim"), ((4, 0, 4, 0.1), "hidden_dim"), ((4, 4, 4, 1.0), "dropout")],
)
def test_branch_rejects_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        branch(*args)


# ----------------------------------------------------------------------- TwoBranchEmbedding


def test_embedding_network_shapes_and_l2_normalisation():
    net = embedding_net()
    images, sentences = feats(4, IMAGE_DIM, 1), feats(10, TEXT_DIM, 2)  # M = 2.5 N: need not pair
    for mode in (True, False):
        net.train(mode)
        out = net(images, sentences)
        assert isinstance(out, TwoBranchOutput)
        assert out.image_emb.shape == (4, EMBED) and out.text_emb.shape == (10, EMBED)
        for emb in out:
            torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(emb)))
    net.eval()
    torch.testing.assert_close(net.encode_image(images), net(images, sentences).image_emb)
    torch.testing.assert_close(net.encode_text(sentences), net(images, sentences).text_emb)


def test_embedding_network_branches_share_no_weights_and_both_learn():
    net = embedding_net()
    image_params = {id(p) for p in net.image.parameters()}
    assert image_params.isdisjoint(id(p) for p in net.text.parameters())
    out = net(feats(4, IMAGE_DIM, 3), feats(6, TEXT_DIM, 4))
    (out.image_emb @ out.text_emb.T).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_embedding_network_in_eval_mode_is_deterministic_and_row_independent():
    net = embedding_net().eval()
    images = feats(5, IMAGE_DIM, 5)
    full = net.encode_image(images)
    torch.testing.assert_close(net.encode_image(images[2:4]), full[2:4])


# ------------------------------------------------------------------------ SimilarityNetwork


def test_similarity_network_scores_one_value_per_pair():
    net = similarity_net()
    scores = net(feats(6, IMAGE_DIM, 6), feats(6, TEXT_DIM, 7))
    assert scores.shape == (6,)
    scores.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("train", [False, True])
def test_permuting_the_pairs_permutes_the_scores(train):
    # Train mode with dropout 0: BatchNorm's batch statistics do not depend on the row order.
    net = similarity_net(dropout=0.0).train(train)
    images, sentences = feats(9, IMAGE_DIM, 8), feats(9, TEXT_DIM, 9)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    scores = net(images, sentences)
    torch.testing.assert_close(net(images[perm], sentences[perm]), scores[perm])


def test_a_pair_s_score_does_not_depend_on_the_other_pairs_in_eval_mode():
    net = similarity_net().eval()
    images, sentences = feats(5, IMAGE_DIM, 10), feats(5, TEXT_DIM, 11)
    scores = net(images, sentences)
    torch.testing.assert_close(net(images[3:4], sentences[3:4]), scores[3:4])


def test_the_product_fusion_with_unit_weights_is_the_cosine_of_the_branches():
    net = similarity_net(fusion_dims=()).eval()
    assert len(net.fusion) == 1
    with torch.no_grad():
        net.fusion[0].weight.fill_(1.0)
        net.fusion[0].bias.zero_()
    images, sentences = feats(4, IMAGE_DIM, 12), feats(4, TEXT_DIM, 13)
    cosine = (net.encode_image(images) * net.encode_text(sentences)).sum(1)
    torch.testing.assert_close(net(images, sentences), cosine)
    assert cosine.abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("chunk_pairs", [1, 7, 1 << 20])
def test_score_matrix_scores_every_pair_like_forward(chunk_pairs):
    net = similarity_net(fusion_dims=(6, 5)).eval()
    images, sentences = feats(5, IMAGE_DIM, 14), feats(3, TEXT_DIM, 15)
    matrix = net.score_matrix(images, sentences, chunk_pairs=chunk_pairs)
    assert matrix.shape == (5, 3)
    pairs = net(images.repeat_interleave(3, 0), sentences.repeat(5, 1)).view(5, 3)
    torch.testing.assert_close(matrix, pairs)


def test_score_matrix_of_no_images_is_empty():
    net = similarity_net().eval()
    assert net.score_matrix(feats(0, IMAGE_DIM, 0), feats(3, TEXT_DIM, 1)).shape == (0, 3)


def test_similarity_network_rejects_unpaired_rows_and_bad_sizes():
    net = similarity_net()
    with pytest.raises(ValueError, match="same number of rows"):
        net(feats(3, IMAGE_DIM, 0), feats(4, TEXT_DIM, 1))
    with pytest.raises(ValueError, match="chunk_pairs"):
        net.score_matrix(feats(3, IMAGE_DIM, 0), feats(4, TEXT_DIM, 1), chunk_pairs=0)
    with pytest.raises(ValueError, match="widths"):
        SimilarityNetwork(IMAGE_DIM, TEXT_DIM, fusion_dims=(0,))


# --------------------------------------------------------------------- ModalityDiscriminator


def test_discriminator_outputs_one_logit_per_embedding():
    torch.manual_seed(0)
    disc = ModalityDiscriminator(EMBED, hidden_dims=(16, 4), dropout=0.1)
    logits = disc(torch.nn.functional.normalize(feats(5, EMBED, 16), dim=1))
    assert logits.shape == (5,)
    linears = [m for m in disc.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(EMBED, 16), (16, 4), (4, 1)]
    # No BatchNorm: a batch of one modality must not be told apart by its statistics.
    assert not any(isinstance(m, nn.BatchNorm1d) for m in disc.modules())


def test_score_head_layers():
    head = score_head(8, (4, 3), dropout=0.2)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert [type(m) for m in score_head(8, (4,))] == [nn.Linear, nn.ReLU, nn.Linear]
    assert head(feats(5, 8, 0)).shape == (5, 1)


def test_discriminator_without_hidden_layers_is_linear():
    disc = ModalityDiscriminator(EMBED, hidden_dims=())
    x = feats(3, EMBED, 17)
    torch.testing.assert_close(disc(x), x @ disc.net[0].weight[0] + disc.net[0].bias)


def test_discriminator_is_row_independent():
    disc = ModalityDiscriminator(EMBED).eval()
    x = feats(6, EMBED, 18)
    torch.testing.assert_close(disc(x[1:3]), disc(x)[1:3])


@pytest.mark.parametrize(
    "kwargs",
    [{"embed_dim": 0}, {"embed_dim": 4, "hidden_dims": (0,)}, {"embed_dim": 4, "dropout": 1}],
)
def test_discriminator_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        ModalityDiscriminator(**kwargs)
