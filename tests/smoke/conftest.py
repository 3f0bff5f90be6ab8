"""Tiny prepared data and CPU-sized training settings for the end-to-end training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imtext.data.prepare import prepare
from imtext.data.shapes import generate_shapes
from tests.conftest import DEFAULT_PREPARE, REPO

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


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """The built-in dataset at 72 images of 32 px (train 48, val 12, test 12), prepared."""
    root = tmp_path_factory.mktemp("tiny")
    generate_shapes(root / "shapes", n_images=72, seed=3, size=32)
    out = root / "prepared"
    out.parent.mkdir(exist_ok=True)
    prepare(
        DEFAULT_PREPARE,
        root / "shapes" / "dataset.json",
        root / "shapes" / "images",
        out,
        log=lambda message: None,
    )
    return out
