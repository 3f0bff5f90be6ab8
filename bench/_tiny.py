"""What the benchmarks' ``--smoke`` modes run on: a tiny rendered dataset and the params.yaml model
shrunk, so that each script runs end to end in seconds (``tests/unit/test_bench_smoke.py``). Not a
benchmark itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from imtext.config import ModelConfig, config_from_dict, load_stage_config

#: Overrides of the params.yaml ``model`` section: the same architecture, narrow and at 32 px.
SMOKE_MODEL = {"image_size": 32, "embed_dim": 16, "word_dim": 8, "text_width": 8}
#: Overrides of a training stage: a few tiny batches, no worker processes.
SMOKE_STAGE = {"batch_size": 8, "workers": 0, "candidate_pool": 16, "patience": None}
#: Images of the smoke dataset (the built-in shapes, 32 px): train, val and test all hold some.
SMOKE_IMAGES = 48


def smoke_model_config(params: Path) -> ModelConfig:
    values = dataclasses.asdict(load_stage_config("model", params)) | SMOKE_MODEL
    return config_from_dict(ModelConfig, values, "--smoke model")


def smoke_stage_config(stage: str, params: Path):
    return dataclasses.replace(load_stage_config(stage, params), **SMOKE_STAGE)


def smoke_prepared(root: Path, params: Path) -> Path:
    """The built-in dataset, :data:`SMOKE_IMAGES` images at 32 px, rendered into ``root/shapes``
    and prepared (params.yaml's ``prepare`` settings) into ``root/prepared``."""
    from imtext.data.prepare import prepare
    from imtext.data.shapes import generate_shapes

    generate_shapes(root / "shapes", n_images=SMOKE_IMAGES, seed=0, size=32)
    prepare(
        load_stage_config("prepare", params),
        root / "shapes" / "dataset.json",
        root / "shapes" / "images",
        root / "prepared",
        log=lambda message: None,
    )
    return root / "prepared"
