"""Shared fixtures: tiny annotation files and images written by the tests themselves."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from PIL import Image

from imtext._process import tune_collector_for_a_short_process
from imtext.config import PrepareConfig

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist (``make test``), one thread per worker for PyTorch and ONNX Runtime
    (which follows PyTorch's count), and for every subprocess a test starts: the workers already
    fill the cores, and two thread pools per core spin against each other."""
    # The same collector settings as the commands and steps the tests run (the worker's exit at
    # the end of the suite is then 1-2 s shorter too).
    tune_collector_for_a_short_process()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["MKL_NUM_THREADS"] = "1"
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)


#: Each test's call-phase report, read by ``tmp_path`` at teardown.
CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[CALL_REPORT] = report
    return report


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Path]:
    """pytest's ``tmp_path``, named after the whole test id and removed when the test passed.

    pytest's own cuts names to 30 characters and numbers them from the highest left, so once a
    passing test's directory is removed its path comes back for another test; MLflow caches a
    store per URI within a process, and would then read the removed test's SQLite database. A
    failed test's directory stays, to look at."""
    name = re.sub(r"\W", "_", request.node.name)[:200]
    path = tmp_path_factory.mktemp(name, numbered=True)
    yield path
    report = request.node.stash.get(CALL_REPORT, None)
    if report is not None and report.passed:
        shutil.rmtree(path, ignore_errors=True)


DEFAULT_PREPARE = PrepareConfig(
    max_len=None,
    min_count=1,
    captions_per_image=5,
    use_restval=True,
    image_short_side=256,
    image_format="png",
    workers=2,
)


def write_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def karpathy_image(
    imgid: int, split: str, captions: list[str], filepath: str | None = None
) -> dict:
    entry = {
        "filename": f"img{imgid}.png",
        "imgid": imgid,
        "split": split,
        "sentids": list(range(imgid * 10, imgid * 10 + len(captions))),
        "sentences": [
            {"raw": c, "tokens": c.lower().split(), "imgid": imgid, "sentid": imgid * 10 + j}
            for j, c in enumerate(captions)
        ],
    }
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


@pytest.fixture
def karpathy_dir(tmp_path: Path) -> Path:
    """A tiny COCO-like Karpathy dataset: train, restval (with filepath), val and test images.

    The word "zebra" occurs only in a test caption, "giraffe" only in a val caption.
    """
    images = [
        karpathy_image(0, "train", ["a red square", "a square that is red"]),
        karpathy_image(1, "train", ["a blue circle", "one blue disc", "a circle"], "sub"),
        karpathy_image(2, "restval", ["a green star on grey"], "sub"),
        karpathy_image(3, "val", ["a giraffe square"]),
        karpathy_image(4, "test", ["a zebra circle", "a red circle"]),
        karpathy_image(5, "test", ["a blue square"]),
    ]
    for i, entry in enumerate(images):
        folder = tmp_path / "images" / entry.get("filepath", "")
        write_image(folder / entry["filename"], (40 * i, 20, 200 - 30 * i))
    (tmp_path / "dataset.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return tmp_path


@pytest.fixture
def cuhk_dir(tmp_path: Path) -> Path:
    """A tiny CUHK-PEDES reid_raw.json: identities 7 and 3 in train, 11 in val, 20 and 21 in test."""
    rows = [
        ("train", 7, "CUHK01/a.png", ["a man in a red shirt", "red shirt and jeans"]),
        ("train", 7, "CUHK01/b.png", ["the man wears a red shirt", "jeans and red top"]),
        ("train", 3, "cam_a/c.png", ["a woman with a blue bag", "blue bag"]),
        ("val", 11, "cam_b/d.png", ["a child in green", "green coat"]),
        ("test", 20, "test/e.png", ["a tall man in black", "black coat"]),
        ("test", 21, "test/f.png", ["a woman in a yellow dress", "yellow dress"]),
    ]
    records = []
    for i, (split, pid, path, captions) in enumerate(rows):
        write_image(tmp_path / "imgs" / path, (30 * i, 100, 50))
        records.append(
            {
                "split": split,
                "captions": captions,
                "file_path": path,
                "processed_tokens": [c.split() for c in captions],
                "id": pid,
            }
        )
    (tmp_path / "reid_raw.json").write_text(json.dumps(records))
    return tmp_path


def write_params(path: Path, **prepare_overrides) -> Path:
    section = dataclasses.asdict(DEFAULT_PREPARE) | prepare_overrides
    path.write_text(yaml.safe_dump({"prepare": section}))
    return path


TINY_MODEL = {
    "image_backbone": "resnet18",
    "image_weights": None,
    "image_size": 32,
    "embed_dim": 16,
    "dropout": 0.2,
    "word_dim": 8,
    "word2vec": None,
    "text_width": 8,
    "text_blocks": [1, 1, 1, 1],
    "classifier_bias": True,
    "method": "dual_path",
    "branch_hidden": 16,
    "fusion_dims": [8],
    "discriminator_dims": [],
    "bn_momentum": 0.1,
    "image_stem": "standard",
    "embedding": "pre_relu",
    "text_encoder": "cnn",
    "text_strides": [1, 2, 2, 1],
    "classifier": "linear",
    "classifier_scale": 32.0,
}


def tiny_params(path: Path, **stage_overrides) -> Path:
    """params.yaml with the repository's stages shrunk to seconds on a CPU."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"] = dict(TINY_MODEL)
    for stage in ("pretrain", "finetune"):
        params[stage].update(epochs=2, batch_size=8, workers=0, candidate_pool=16, patience=None)
        params[stage].update(stage_overrides)
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def karpathy_prepared(karpathy_dir: Path, tmp_path: Path) -> Path:
    """``karpathy_dir`` run through ``prepare`` with the default settings."""
    from imtext.data.prepare import prepare

    out = tmp_path / "prepared"
    prepare(
        DEFAULT_PREPARE,
        karpathy_dir / "dataset.json",
        karpathy_dir / "images",
        out,
        log=lambda m: None,
    )
    return out


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """The built-in dataset at 72 images of 32 px (train 48, val 12, test 12), prepared."""
    return prepared_shapes(tmp_path_factory.mktemp("tiny"), n_images=72, seed=3, size=32)


def prepared_shapes(root: Path, n_images: int, seed: int, size: int) -> Path:
    """The built-in dataset rendered into ``root/shapes`` and prepared into ``root/prepared``
    with the default settings; returns the prepared directory."""
    from imtext.data.prepare import prepare
    from imtext.data.shapes import generate_shapes

    generate_shapes(root / "shapes", n_images=n_images, seed=seed, size=size)
    out = root / "prepared"
    prepare(
        DEFAULT_PREPARE,
        root / "shapes" / "dataset.json",
        root / "shapes" / "images",
        out,
        log=lambda message: None,
    )
    return out


@pytest.fixture(scope="session")
def tiny_model_file(tiny_prepared: Path, tmp_path_factory) -> Path:
    """An untrained ``TINY_MODEL`` for ``tiny_prepared`` saved as a ``model.pt`` (seeded weights):
    enough for everything downstream of training (evaluate, export, register)."""
    import torch

    from imtext.config import ModelConfig, config_from_dict
    from imtext.data.store import PreparedSplit, read_vocabulary
    from imtext.models import build_model
    from imtext.models.files import model_record, save_atomic

    cfg = config_from_dict(ModelConfig, dict(TINY_MODEL), "TINY_MODEL")
    vocab_size = len(read_vocabulary(tiny_prepared))
    n_classes = int(PreparedSplit.load(tiny_prepared, "train").image_labels.max()) + 1
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size, n_classes).eval()
    path = tmp_path_factory.mktemp("tiny-model") / "model.pt"
    save_atomic(model_record(model, cfg, vocab_size, n_classes), path)
    return path
