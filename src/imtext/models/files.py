"""Model files (``model.pt``): what a trained model is written as, and how it is rebuilt.

A model file holds the state_dict, the model config as JSON and the sizes needed to rebuild the
network, so it loads with ``torch.load(weights_only=True)`` and never unpickles code. The training
checkpoint (``imtext.train.checkpoint``) is a model file plus the resume state, written and read
by the same two functions (:func:`save_atomic`, :func:`load_file`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from imtext.config import (
    MODEL_METHOD_DEFAULTS,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    with_method_defaults,
)
from imtext.errors import ImtextError
from imtext.models import build_model
from imtext.models.dual_path import DualPathModel
from imtext.models.logit_scale import LogitScale

MODEL_FILE = "model.pt"
FORMAT = 1
#: The state_dict entry of a learned InfoNCE temperature (``LogitScale`` on the model).
LOGIT_SCALE_KEY = "logit_scale.log_scale"


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename: a kill mid-write leaves
    the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the model from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_file(path: Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ImtextError(f"{path}: {what} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files raise many types
        raise ImtextError(f"{path}: not a readable imtext {what} ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ImtextError(f"{path}: not an imtext {what} (format {FORMAT} expected)")
    return obj


def model_record(
    model: DualPathModel, model_cfg: ModelConfig, vocab_size: int, n_classes: int, **extra: Any
) -> dict[str, Any]:
    """What a model file holds: weights, architecture and the sizes needed to rebuild it."""
    return {
        "format": FORMAT,
        "model_config": config_to_dict(model_cfg),
        "vocab_size": vocab_size,
        "n_classes": n_classes,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[DualPathModel, dict]:
    """Rebuild a model of any ``model.method`` from a model file (``model.pt``) or a checkpoint;
    returns it in eval mode with the file's other entries.

    Files written before the method fields existed read as ``dual_path`` (the record's
    ``model_config`` is returned completed). A learned InfoNCE temperature in the file is
    attached as ``model.logit_scale`` (it plays no part in retrieval).
    """
    record = load_file(path, "model file")
    record["model_config"] = with_method_defaults(record["model_config"], MODEL_METHOD_DEFAULTS)
    model_cfg = config_from_dict(ModelConfig, record["model_config"], f"{path}: model_config")
    # Weights come from the file: never reload the backbone's ImageNet file from its old path.
    model_cfg = dataclasses.replace(model_cfg, image_weights=None, word2vec=None)
    model = build_model(model_cfg, record["vocab_size"], record["n_classes"])
    if LOGIT_SCALE_KEY in record["state_dict"]:
        model.logit_scale = LogitScale()
    model.load_state_dict(record["state_dict"])
    return model.to(device).eval(), record
