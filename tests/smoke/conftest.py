"""Tiny prepared data for the end-to-end training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from imtext.data.prepare import prepare
from imtext.data.shapes import generate_shapes
from tests.conftest import DEFAULT_PREPARE


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
