"""The ``evaluate`` stage on tiny data: its files, metrics, report, determinism and bad input."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imtext._fs import MARKER
from imtext.config import EvaluateConfig
from imtext.data.store import PreparedSplit
from imtext.errors import ConfigError, DataError, ImtextError
from imtext.eval.embed import embed_captions, embed_images
from imtext.eval.evaluate import (
    PHASES,
    build_examples,
    evaluate,
    protocol_folds,
    ranks_and_curve,
)
from imtext.eval.metrics import per_query_ranks, retrieval_metrics
from imtext.eval.protocols import evaluate_protocol
from imtext.models.files import load_model

CFG = EvaluateConfig(
    split="test",
    protocol="full",
    batch_size=8,
    flip_average=False,
    shift_average=False,
    report_queries=3,
    report_top_k=4,
    seed=0,
)
FILES = (
    "metrics.json",
    "evaluation.json",
    "recall_curve.json",
    "recall_curve.png",
    "report.html",
    "report.png",
)
METRIC_KEYS = [
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
    "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr", "rsum",
]  # fmt: skip


@pytest.fixture(scope="module")
def embeddings(tiny_prepared, tiny_model_file):
    """Test-split embeddings computed here, independently of the stage: (images, texts, split)."""
    model, _ = load_model(tiny_model_file, "cpu")
    split = PreparedSplit.load(tiny_prepared, "test")
    cpu = torch.device("cpu")
    return embed_images(model, split, 32, cpu), embed_captions(model, split, cpu), split


@pytest.fixture(scope="module")
def run(tiny_prepared, tiny_model_file, tmp_path_factory):
    """One evaluation: (out_dir, returned metrics, log lines, phases the progress saw)."""
    out = tmp_path_factory.mktemp("evaluate") / "out"
    lines: list[str] = []
    seen: list[str] = []

    def progress(items, total, desc):
        assert total == len(PHASES) and desc == "evaluate"
        for item in items:
            seen.append(item)
            yield item

    metrics = evaluate(
        CFG, tiny_model_file, tiny_prepared, out, device="cpu", log=lines.append, progress=progress
    )
    return out, metrics, lines, seen


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_writes_every_file_and_nothing_else(run):
    out, _, lines, seen = run
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, MARKER])
    assert not [p for p in out.parent.iterdir() if p.name != "out"], "temporary files left"
    for name in ("recall_curve.png", "report.png"):
        with Image.open(out / name) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) > 100
    assert seen == list(PHASES)
    (line,) = lines
    assert re.fullmatch(
        r"evaluate test \(full\): R@1/5/10 i2t [\d.]+/[\d.]+/[\d.]+, "
        r"t2i [\d.]+/[\d.]+/[\d.]+, rsum [\d.]+ -> .*out",
        line,
    ), line


def test_metrics_equal_retrieval_metrics_of_independent_embeddings(run, embeddings):
    out, returned, _, _ = run
    images, texts, split = embeddings
    expected = retrieval_metrics(images, texts, split.caption_image)
    stored = read_json(out / "metrics.json")
    assert list(stored) == METRIC_KEYS + ["n_images", "n_captions"]
    assert stored == returned
    assert stored["n_images"] == 12 and stored["n_captions"] == 60
    assert {k: stored[k] for k in METRIC_KEYS} == pytest.approx(expected)
    assert all(isinstance(v, int | float) for v in stored.values())


def test_evaluation_json_holds_the_context(run, tiny_model_file):
    out = run[0]
    context = read_json(out / "evaluation.json")
    assert context["split"] == "test" and context["protocol"] == "full"
    assert context["model"] == str(tiny_model_file) and context["data_format"] == "karpathy"
    assert context["model_config"]["embed_dim"] == 16 and context["seconds"] > 0
    assert context["config"]["report_top_k"] == 4
    assert len(context["report_queries"]["t2i"]) == len(context["report_queries"]["i2t"]) == 3


def test_recall_curve_is_monotone_and_agrees_with_the_metrics(run):
    out, metrics, _, _ = run
    rows = read_json(out / "recall_curve.json")
    assert [row["k"] for row in rows] == list(range(1, 13))  # min(100, 12 images)
    for direction in ("i2t", "t2i"):
        values = [row[direction] for row in rows]
        assert all(0 <= a <= b <= 100 for a, b in zip(values, values[1:], strict=False))
        for k in (1, 5, 10):
            assert values[k - 1] == pytest.approx(metrics[f"{direction}_r{k}"], abs=1e-3)
    assert rows[-1]["t2i"] == 100  # K = every image


def test_report_shows_the_chosen_queries_with_their_ground_truth(run, embeddings):
    out = run[0]
    images, texts, split = embeddings
    page = (out / "report.html").read_text(encoding="utf-8")
    queries = read_json(out / "evaluation.json")["report_queries"]
    rng = np.random.default_rng(CFG.seed)
    assert queries["t2i"] == sorted(rng.choice(60, 3, replace=False).tolist())
    assert queries["i2t"] == sorted(rng.choice(12, 3, replace=False).tolist())
    i2t_ranks, t2i_ranks = per_query_ranks(images, texts, split.caption_image)
    shown = re.findall(r"ground truth at rank (\d+)", page)
    assert shown == [str(t2i_ranks[q]) for q in queries["t2i"]] + [
        str(i2t_ranks[q]) for q in queries["i2t"]
    ]
    for q in queries["t2i"]:
        assert f"“{split.captions[q]}”" in page
    sections = re.findall(r'<section class="example">(.*?)</section>', page)
    assert len(sections) == 6
    for section, q in zip(sections[:3], queries["t2i"], strict=True):
        # One ground-truth image: among the top 4, or shown after them as missed.
        missed = t2i_ranks[q] > 4
        assert section.count('<span class="gt">GT</span>') == 1
        assert section.count("data:image/png;base64,") == 4 + missed
        assert ("not in the top results" in section) == missed
    for section, q in zip(sections[3:], queries["i2t"], strict=True):
        # Five ground-truth captions: those among the top 4, the others (at most 4) as missed.
        top = section.split("not in the top results")[0]
        shown = top.count('<li class="hit">')
        assert (shown > 0) == (i2t_ranks[q] <= 4)
        assert section.count('<li class="hit">') == shown + min(4, 5 - shown)
        assert section.count("<li") == 4 + min(4, 5 - shown)
    assert "http" not in page and "<script" not in page


def test_examples_hold_the_top_scores_of_independent_embeddings(embeddings):
    images, texts, split = embeddings
    image_fold, caption_fold = protocol_folds("full", split.n_images, split.caption_image)
    i2t_ranks, t2i_ranks = per_query_ranks(images, texts, split.caption_image)
    examples = build_examples(
        split, images, texts, CFG, text_ids=split.caption_image, image_ids=np.arange(12),
        image_fold=image_fold, caption_fold=caption_fold, i2t_ranks=i2t_ranks, t2i_ranks=t2i_ranks,
    )  # fmt: skip
    assert [e.direction for e in examples] == ["t2i"] * 3 + ["i2t"] * 3
    for example in examples:
        q = example.query.row
        if example.direction == "t2i":
            scores, gt = (images @ texts[q]).numpy(), np.arange(12) == split.caption_image[q]
        else:
            scores, gt = (texts @ images[q]).numpy(), split.caption_image == q
        # Best first; a tie puts the non-matching candidate first, then the lower row.
        best = sorted(range(len(scores)), key=lambda r: (-scores[r], bool(gt[r]), r))[:4]
        assert [item.row for item in example.results] == best
        assert [item.score for item in example.results] == pytest.approx(scores[best].tolist())
        assert [item.is_match for item in example.results] == gt[best].tolist()
        missed = sorted(set(np.flatnonzero(gt)) - set(best), key=lambda r: -scores[r])[:4]
        assert [item.row for item in example.expected] == missed
        assert all(item.is_match for item in example.expected)
        if example.rank <= 4:
            assert example.results[example.rank - 1].is_match
            assert not any(item.is_match for item in example.results[: example.rank - 1])


def test_the_same_model_gives_the_same_report_and_replaces_old_output(
    run, tiny_prepared, tiny_model_file
):
    out = run[0]
    again = out.parent / "again"
    again.mkdir()
    (again / MARKER).write_text("")
    (again / "stale.txt").write_text("from an earlier run")
    metrics = evaluate(CFG, tiny_model_file, tiny_prepared, again, device="cpu")
    assert sorted(p.name for p in again.iterdir()) == sorted([*FILES, MARKER])
    assert metrics == read_json(out / "metrics.json")
    for name in ("report.html", "report.png", "recall_curve.json", "recall_curve.png"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    shutil.rmtree(again)


def test_test_time_averaging_reaches_the_features_and_no_queries_give_a_plain_report(
    tiny_prepared, tiny_model_file, tmp_path
):
    cfg = dataclasses.replace(CFG, flip_average=True, shift_average=True, report_queries=0)
    out = tmp_path / "out"
    metrics = evaluate(cfg, tiny_model_file, tiny_prepared, out, device="cpu")
    model, _ = load_model(tiny_model_file, "cpu")
    split, cpu = PreparedSplit.load(tiny_prepared, "test"), torch.device("cpu")
    expected = retrieval_metrics(
        embed_images(model, split, 32, cpu, flip_average=True),
        embed_captions(model, split, cpu, shift_average=True),
        split.caption_image,
    )
    assert {k: metrics[k] for k in METRIC_KEYS} == pytest.approx(expected)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<section" not in page and page.count("data:image/png;base64,") == 1
    with Image.open(out / "report.png") as image:
        assert image.format == "PNG"


def test_coco_1k_curve_and_ranks_are_fold_means():
    # Random 5,000 images with 2 captions each: metrics of the protocol equal the fold curves.
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(5000, 8, generator=generator), dim=1)
    caption_image = np.repeat(np.arange(5000), 2)
    texts = torch.nn.functional.normalize(
        images[caption_image] + 0.9 * torch.randn(10000, 8, generator=generator), dim=1
    )
    metrics = evaluate_protocol(images, texts, caption_image, "coco_1k")
    image_fold, caption_fold = protocol_folds("coco_1k", 5000, caption_image)
    assert image_fold.tolist() == (np.arange(5000) // 1000).tolist()
    assert (caption_fold == caption_image // 1000).all()
    i2t, t2i, rows = ranks_and_curve(
        images, texts, caption_image, np.arange(5000), image_fold, caption_fold
    )
    assert len(rows) == 100
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            assert rows[k - 1][direction] == pytest.approx(metrics[f"{direction}_r{k}"], abs=1e-3)
        assert np.mean([np.median(r) for r in np.split(ranks, 5)]) == metrics[f"{direction}_medr"]
    assert 0 < metrics["t2i_r1"] < 100  # neither trivial nor hopeless: the test can tell


def test_missing_model_file_is_an_error_naming_it(tiny_prepared, tmp_path):
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(ImtextError, match=r"nope/model\.pt: model file not found; pass"):
        evaluate(CFG, missing, tiny_prepared, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_missing_split_is_an_error_naming_the_file(tiny_prepared, tiny_model_file, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, prepared)
    (prepared / "test.npz").unlink()
    with pytest.raises(DataError, match=r"test\.npz: prepared split not found; run `imtext prep"):
        evaluate(CFG, tiny_model_file, prepared, tmp_path / "out", device="cpu")
    with pytest.raises(DataError, match="prepared data not found"):
        evaluate(CFG, tiny_model_file, tmp_path / "elsewhere", tmp_path / "out", device="cpu")


def test_a_model_of_another_vocabulary_is_refused_and_old_output_kept(
    tiny_prepared, tiny_model_file, tmp_path
):
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, prepared)
    vocab = read_json(prepared / "vocab.json")
    vocab["words"].append("zebra")
    (prepared / "vocab.json").write_text(json.dumps(vocab))
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("")
    (out / "metrics.json").write_text("{}")
    with pytest.raises(ImtextError, match=r"model\.pt: the model was trained with a vocabulary"):
        evaluate(CFG, tiny_model_file, prepared, out, device="cpu")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (out / "metrics.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("protocol", "message"), [("cuhk", "needs person identities"), ("coco_1k", "5,000-image")]
)
def test_a_protocol_the_data_cannot_follow_is_a_config_error(
    tiny_prepared, tiny_model_file, tmp_path, protocol, message
):
    cfg = dataclasses.replace(CFG, protocol=protocol)
    with pytest.raises(ConfigError, match=message):
        evaluate(cfg, tiny_model_file, tiny_prepared, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
