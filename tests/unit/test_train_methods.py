"""The other methods in the training loop (issue 6): config checks across sections, model building
and rebuilding per method, what a step's batch and losses contain, the reversal schedule, and the
pair scores used for retrieval. Sizes are tiny throughout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from imtext.config import (
    MODEL_METHOD_DEFAULTS,
    ModelConfig,
    TrainConfig,
    check_method,
    config_from_dict,
    config_to_dict,
    read_params,
)
from imtext.data.store import PreparedSplit
from imtext.errors import ConfigError
from imtext.eval.embed import retrieval_inputs, score_split
from imtext.eval.metrics import reference_ranks, retrieval_metrics
from imtext.models import build_model
from imtext.models.dual_path import DualPathModel, DualPathOutput, MethodOutput
from imtext.models.files import load_model, model_record, save_atomic
from imtext.models.logit_scale import LogitScale
from imtext.models.methods import NoEmbeddingError, SimilarityModel, TwoBranchModel
from imtext.train import distributed
from imtext.train.batches import Batch, batch_of, with_negative_pairs
from imtext.train.batches import epoch_loader as _loader
from imtext.train.loop import _initial_model
from imtext.train.objective import forward_kwargs, reversal_coefficient, step_losses
from tests.conftest import REPO, TINY_MODEL

PARAMS = read_params(REPO / "params.yaml")
VOCAB, N_CLASSES = 12, 6


def model_config(**overrides) -> ModelConfig:
    return config_from_dict(ModelConfig, TINY_MODEL | overrides, "model")


#: Stage II with a hinge over in-batch negatives: the loss-term tests below count the terms of
#: the paper's objective (params.yaml's InfoNCE adds a temperature and needs a logit scale).
HINGE_STAGE_II = PARAMS["finetune"] | {"ranking": "batch_sum", "margin": 0.2}


def train_config(**overrides) -> TrainConfig:
    return config_from_dict(TrainConfig, HINGE_STAGE_II | overrides, "finetune")


def tiny(seed: int = 0, **overrides) -> DualPathModel:
    torch.manual_seed(seed)
    return build_model(model_config(**overrides), VOCAB, N_CLASSES)


def inputs(n_images: int = 4, n_texts: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, 32, 32, generator=g)
    return images, torch.randint(1, VOCAB, (n_texts, 32), generator=g)


# ------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("model", "train", "key"),
    [
        ({"method": "similarity"}, {"ranking": "batch_sum"}, "ranking"),
        ({"method": "dual_path"}, {"ranking": "logistic"}, "ranking"),
        ({"method": "two_branch"}, {"ranking": "logistic"}, "ranking"),
        ({}, {"adversarial_weight": 0.1}, "adversarial_weight"),
    ],
)
def test_invalid_method_combinations_name_the_key(model, train, key):
    with pytest.raises(ConfigError, match=rf"^finetune: {key}: "):
        check_method(model_config(**model), train_config(**train), "finetune")


@pytest.mark.parametrize(
    ("model", "train"),
    [
        ({"method": "similarity"}, {"ranking": "logistic"}),
        # Stage I of the pipeline: the instance loss trains the encoders; the ranking loss is off.
        ({"method": "similarity"}, {"ranking": "paired_hard", "loss_weights": [0, 1, 1]}),
        ({"method": "two_branch"}, {"ranking": "topk", "sentences_per_image": 2}),
        ({"method": "two_branch"}, {"ranking": "infonce"}),
        ({"discriminator_dims": [8]}, {"adversarial_weight": 0.1, "ranking": "batch_hardest"}),
        ({"method": "dual_path"}, {"ranking": "topk"}),
    ],
)
def test_valid_method_combinations_pass(model, train):
    check_method(model_config(**model), train_config(**train), "finetune")


@pytest.mark.parametrize(
    ("section", "overrides", "key"),
    [
        ("model", {"method": "similarity", "discriminator_dims": [8]}, "discriminator_dims"),
        ("model", {"fusion_dims": [0]}, "fusion_dims"),
        ("model", {"method": "siamese"}, "method"),
        ("model", {"bn_momentum": 1.5}, "bn_momentum"),
        ("finetune", {"ranking": "paired_hard", "sentences_per_image": 2}, "sentences_per_image"),
        ("finetune", {"adversarial_warmup_epochs": 1}, "adversarial_warmup_epochs"),
        (
            "finetune",
            {"epochs": 6, "adversarial_weight": 1.0, "adversarial_warmup_epochs": 6},
            "adversarial_warmup_epochs",
        ),
        (
            "finetune",
            {"ranking": "logistic", "batch_size": 32, "negatives_per_positive": 32},
            "negatives_per_positive",
        ),
        ("finetune", {"direction_weights": [1.0]}, "direction_weights"),
        ("finetune", {"init_temperature": 0.0}, "init_temperature"),
        ("finetune", {"top_k": 0}, "top_k"),
        ("finetune", {"ranking": "triplet"}, "ranking"),
    ],
)
def test_invalid_values_of_the_new_fields_name_the_key(section, overrides, key):
    cls, base = (ModelConfig, TINY_MODEL) if section == "model" else (TrainConfig, PARAMS[section])
    with pytest.raises(ConfigError, match=rf"^params.yaml: {section}\.{key}: "):
        config_from_dict(cls, base | overrides, f"params.yaml: {section}")


def test_train_stage_refuses_a_bad_combination_before_reading_data(tmp_path):
    from imtext.train.loop import train_stage

    with pytest.raises(ConfigError, match="ranking: model.method 'similarity'"):
        train_stage(
            "pretrain", model_config(method="similarity"), train_config(), tmp_path / "nope",
            tmp_path / "out",
        )  # fmt: skip


# ------------------------------------------------------------------------------ models & files


def test_the_default_model_is_the_paper_s_with_the_same_weights_and_output():
    plain, default = tiny(), tiny(discriminator_dims=[])
    assert type(default) is DualPathModel and default.discriminator is None
    assert list(plain.state_dict()) == list(default.state_dict())
    out = default.eval()(*inputs())
    assert type(out) is DualPathOutput


def test_a_discriminator_leaves_the_other_initial_weights_unchanged():
    plain, adversarial = tiny(), tiny(discriminator_dims=[8])
    extra = set(adversarial.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("discriminator.") for k in extra)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, adversarial.state_dict()[k]), k


@pytest.mark.parametrize(
    ("overrides", "cls"),
    [
        ({"method": "two_branch"}, TwoBranchModel),
        ({"method": "similarity"}, SimilarityModel),
        ({"method": "two_branch", "discriminator_dims": [8, 4]}, TwoBranchModel),
        ({"discriminator_dims": [8]}, DualPathModel),
    ],
)
def test_load_model_rebuilds_every_method(tmp_path, overrides, cls):
    model = tiny(**overrides)
    model.logit_scale = LogitScale(0.05)  # a trained InfoNCE temperature travels with the file
    model.train()
    model(*inputs())  # move BatchNorm statistics off their defaults
    path = tmp_path / "model.pt"
    save_atomic(model_record(model.eval(), model_config(**overrides), VOCAB, N_CLASSES), path)
    loaded, record = load_model(path)
    assert type(loaded) is cls and not loaded.training
    assert record["model_config"]["method"] == overrides.get("method", "dual_path")
    assert loaded.logit_scale is not None
    images, tokens = inputs(seed=1)
    with torch.no_grad():
        if cls is SimilarityModel:
            a = model.score_matrix(model.image_features(images), model.text_features(tokens))
            b = loaded.score_matrix(loaded.image_features(images), loaded.text_features(tokens))
        else:
            a, b = model.encode_image(images), loaded.encode_image(images)
    assert torch.equal(a, b)


def test_model_files_from_before_the_methods_load_as_dual_path(tmp_path):
    model = tiny()
    record = model_record(model, model_config(), VOCAB, N_CLASSES)
    for key in MODEL_METHOD_DEFAULTS:
        del record["model_config"][key]
    save_atomic(record, tmp_path / "old.pt")
    loaded, record = load_model(tmp_path / "old.pt")
    assert type(loaded) is DualPathModel
    expected = config_to_dict(model_config()) | MODEL_METHOD_DEFAULTS
    assert record["model_config"] == expected  # completed for its readers


def test_the_similarity_network_has_no_embedding():
    model = tiny(method="similarity").eval()
    images, tokens = inputs()
    for encode, x in ((model.encode_image, images), (model.encode_text, tokens)):
        with pytest.raises(NoEmbeddingError, match="has no embedding: a dot product"):
            encode(x)


def test_two_branch_embeddings_are_the_branches_normalised_outputs():
    model = tiny(method="two_branch").eval()
    images, tokens = inputs()
    with torch.no_grad():
        emb = model.encode_image(images)
        expected = torch.nn.functional.normalize(model.net.image(model.image(images)), dim=1)
        out = model(images, tokens)
    assert emb.shape == (4, TINY_MODEL["embed_dim"]) and torch.allclose(emb, expected)
    assert torch.allclose(out.image_emb, emb)


def test_an_init_of_another_method_loads_its_encoders(tmp_path, tiny_prepared):
    from imtext.data.store import read_vocabulary

    vocab = list(read_vocabulary(tiny_prepared).words)
    n_classes = int(PreparedSplit.load(tiny_prepared, "train").image_labels.max()) + 1
    torch.manual_seed(0)
    source = build_model(model_config(), len(vocab), n_classes)
    save_atomic(model_record(source, model_config(), len(vocab), n_classes), tmp_path / "dp.pt")
    cfg = model_config(method="two_branch", discriminator_dims=[8])
    model, used = _initial_model(cfg, tmp_path / "dp.pt", vocab, n_classes)
    assert type(model) is TwoBranchModel and used == cfg and model.discriminator is not None
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ------------------------------------------------------------------------------ batches & losses


def test_the_default_loader_batch_is_one_caption_per_image(tiny_prepared):
    cfg = train_config(batch_size=8, workers=0)
    split = PreparedSplit.load(tiny_prepared, "train")
    items = next(iter(_loader(_dataset(split, cfg), cfg, _single(), 0)))
    batch = batch_of(items)
    assert batch.caption_slot is None and batch.tokens.shape[0] == batch.images.shape[0] == 8


def test_cached_items_load_in_process_on_the_cpu_and_in_workers_for_a_gpu(tiny_prepared):
    from imtext.data.datasets import InstanceTrainDataset, train_transform

    cfg = train_config(batch_size=8, workers=2, image_augment="shift")
    split = PreparedSplit.load(tiny_prepared, "train")
    dataset = InstanceTrainDataset(split, train_transform(32, False, augment="shift"))
    assert dataset.cache_resized_images()
    assert _loader(dataset, cfg, _single(), 0).num_workers == 0
    # Built, not iterated: only the loader's settings are checked, so no GPU is needed.
    gpu = distributed.Dist(0, 1, torch.device("cuda", 0))
    assert _loader(dataset, cfg, gpu, 0).num_workers == 2
    uncached = _dataset(split, cfg)
    assert _loader(uncached, cfg, _single(), 0).num_workers == 2


def _dataset(split, cfg):
    from imtext.data.datasets import InstanceTrainDataset, train_transform

    return InstanceTrainDataset(split, train_transform(32, False, cfg.crop_scale), cfg.text_shift)


def _single() -> distributed.Dist:
    return distributed.Dist(0, 1, torch.device("cpu"))


def test_neighbourhood_sampling_reaches_the_loop_s_batches(tiny_prepared):
    """With sentences_per_image 2 each loop batch holds 8 distinct images and 2 of each one's own
    captions (unshifted here, so they can be looked up), and an epoch visits every caption."""
    cfg = train_config(batch_size=8, workers=0, sentences_per_image=2, text_shift=False)
    split = PreparedSplit.load(tiny_prepared, "train")
    token_rows = {tuple(row): i for i, row in enumerate(split.tokens.tolist())}
    seen = set()
    loader = _loader(_dataset(split, cfg), cfg, _single(), 0)
    for items in loader:
        batch = batch_of(items)
        rows = items["index"].numpy()
        slot = batch.caption_slot.numpy()
        assert len(set(rows.tolist())) == 8 == batch.images.shape[0]
        assert np.bincount(slot).tolist() == [2] * 8  # the tiny images have 5 captions each
        captions = [token_rows[tuple(r)] for r in batch.tokens.tolist()]
        assert (split.caption_image[captions] == rows[slot]).all()
        assert torch.equal(batch.text_labels, batch.image_labels[batch.caption_slot])
        seen.update(captions)
    assert seen == set(range(split.n_captions))
    again = [batch_of(i).tokens for i in _loader(_dataset(split, cfg), cfg, _single(), 0)]
    assert torch.equal(again[0], next(iter(loader))["tokens"])  # the epoch seed fixes the epoch


def test_negative_pairs_pair_each_image_with_other_instances_captions():
    labels = torch.tensor([0, 0, 1, 2])  # captions 0 and 1 belong to image 0
    batch = Batch(torch.zeros(3, 3, 2, 2), torch.zeros(4, 5), torch.tensor([0, 1, 2]), labels,
                  caption_slot=torch.tensor([0, 0, 1, 2]))  # fmt: skip
    paired = with_negative_pairs(batch, 2, np.random.default_rng(0))
    assert paired.pairs.shape == (4 * 3, 2) and paired.pair_targets.tolist() == [1] * 4 + [-1] * 8
    assert paired.pairs[:4].tolist() == [[0, 0], [0, 1], [1, 2], [2, 3]]
    for (image, caption), anchor in zip(
        paired.pairs[4:].tolist(), np.repeat(range(4), 2), strict=True
    ):
        assert image == batch.caption_slot[anchor] and labels[caption] != labels[anchor]


def test_the_reversal_coefficient_is_zero_in_warm_up_then_ramps_to_its_maximum():
    cfg = train_config(epochs=3, adversarial_weight=0.1, adversarial_warmup_epochs=1,
                       adversarial_lambda=0.5)  # fmt: skip
    values = [reversal_coefficient(step, 10, cfg) for step in range(30)]
    assert values[:10] == [0.0] * 10
    assert values[10] == 0.0 and all(a < b for a, b in zip(values[10:], values[11:], strict=False))
    assert 0.49 < values[-1] < 0.5


def _batch(n: int = 4) -> Batch:
    labels = torch.arange(n)
    return Batch(*inputs(n, n), labels, labels)


@pytest.mark.parametrize(
    ("model", "train", "extra"),
    [
        ({}, {"ranking": "batch_hardest", "loss_weights": [1.0, 0.0, 0.0]}, set()),
        ({}, {"ranking": "infonce"}, {"temperature"}),
        ({"discriminator_dims": [8]}, {"adversarial_weight": 0.5}, {"adv"}),
        ({"method": "two_branch"}, {"ranking": "topk"}, {"rank_t2i", "rank_i2t", "neighbour"}),
        ({"method": "similarity"}, {"ranking": "logistic"}, set()),
    ],
)
def test_each_method_s_step_losses_train_every_parameter(model, train, extra):
    cfg = train_config(**train)
    net = tiny(**model)
    if cfg.ranking == "infonce":
        net.logit_scale = LogitScale(cfg.init_temperature)
    batch = _batch()
    if cfg.ranking == "logistic":
        batch = with_negative_pairs(batch, 2, np.random.default_rng(0))
    out = net.train()(
        batch.images, batch.tokens, **forward_kwargs(batch, cfg, "discriminator_dims" in model, 0.3)
    )
    # Only the paper's model without extras keeps its own output type.
    assert isinstance(out, MethodOutput) != (model == {} and cfg.ranking != "infonce")
    losses = step_losses(out, batch, cfg, torch.device("cpu"))
    assert set(losses) == {"loss", "rank", "inst_image", "inst_text"} | extra
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    # Every parameter is in the graph (DDP's condition), the frozen-by-weight ones included.
    assert all(p.grad is not None for p in net.parameters())


def test_the_paper_s_step_losses_keep_their_four_terms():
    net, batch = tiny(), _batch()
    out = net(batch.images, batch.tokens)
    assert set(step_losses(out, batch, train_config(), torch.device("cpu"))) == {
        "loss", "rank", "inst_image", "inst_text"
    }  # fmt: skip


# ------------------------------------------------------------------------------ pair scores


def test_similarity_retrieval_ranks_by_the_score_of_every_pair(tiny_prepared):
    from imtext.data.store import read_vocabulary

    split = PreparedSplit.load(tiny_prepared, "val")
    torch.manual_seed(0)
    model = build_model(model_config(method="similarity"), len(read_vocabulary(tiny_prepared)), 5)
    device = torch.device("cpu")
    images, texts = retrieval_inputs(model, split, 32, device, image_batch=5, caption_batch=7)
    scores = score_split(model, split, 32, device, image_batch=5, caption_batch=7)
    assert torch.equal(images @ texts.T, scores) and torch.equal(texts @ images.T, scores.T)
    with torch.no_grad():  # the blocks equal one pair at a time
        feats = model.image_features(_val_images(split)), model.text_features(_tokens(split, [3]))
        assert torch.allclose(scores[2, 3], model.net(feats[0][2:3], feats[1])[0], atol=1e-6)
    ranks = reference_ranks(scores, torch.eye(split.n_captions), split.caption_image)
    metrics = retrieval_metrics(images, texts, split.caption_image)
    assert metrics["i2t_r1"] == pytest.approx(100 * np.mean(ranks[0] == 1))
    with pytest.raises(ConfigError, match="flip_average"):
        retrieval_inputs(model, split, 32, device, flip_average=True)


def _val_images(split: PreparedSplit) -> torch.Tensor:
    from imtext.data.datasets import eval_transform

    transform = eval_transform(32)
    return torch.stack([transform(split.image(i)) for i in range(split.n_images)])


def _tokens(split: PreparedSplit, rows: list[int]) -> torch.Tensor:
    return torch.from_numpy(split.tokens[rows].astype(np.int64))


def test_model_config_defaults_match_params_yaml():
    """The method fields' defaults (for old files) are params.yaml's values: one meaning of
    'default'. The recipe fields of issue 13 are the exception: their defaults rebuild the models
    written before them, params.yaml's values are the recipe that learns (docs/training.md)."""
    recipe = {
        "image_stem",
        "embedding",
        "text_encoder",
        "text_strides",
        "classifier",
        "classifier_scale",
    }
    for key, value in MODEL_METHOD_DEFAULTS.items():
        if key not in recipe:
            assert PARAMS["model"][key] == value, key
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for stage in ("pretrain", "finetune"):
        for key in ("top_k", "sentences_per_image", "adversarial_weight", "init_temperature"):
            assert PARAMS[stage][key] == defaults[key], (stage, key)
