"""Where a model came from: code commit, data hash, parameter hash, and the run's inputs as MLflow
params and metrics. Pure functions of files and dicts; nothing here talks to MLflow."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from imtext.errors import ImtextError

#: Tag keys shared by the run and the model version.
TAG_GIT_COMMIT = "imtext.git_commit"
#: DVC's md5 of the raw data (a ``.dvc`` file's or ``dvc.lock``'s), when DVC tracks it.
TAG_DATA_MD5 = "imtext.data_md5"
#: Where the raw data was read (a directory or ``s3://bucket/prefix``) and the md5 of its listing
#: (:mod:`imtext.data.lineage`).
TAG_DATA_URI = "imtext.data_uri"
TAG_DATA_DIGEST = "imtext.data_digest"
#: The Kubeflow Pipelines run the MLflow run belongs to.
TAG_KFP_RUN_ID = "imtext.kfp_run_id"
#: On a model version: the MLflow run it was registered from (``register`` checks it to never
#: register one run twice).
TAG_RUN_ID = "imtext.run_id"
TAG_PARAMS_SHA256 = "imtext.params_sha256"
TAG_GATE_METRIC = "imtext.gate_metric"
TAG_GATE_VALUE = "imtext.gate_value"
#: How the model scores a pair: ``dot`` (embeddings) or ``network`` (the similarity network).
TAG_SIMILARITY = "imtext.similarity"
#: sha256 over every file of the version's pyfunc model (code, MLmodel, environment, export), as
#: written at registration (:func:`imtext.registry.pyfunc.model_digest`); serving checks it.
TAG_MODEL_SHA256 = "imtext.model_sha256"
#: The imtext version that registered the model; serving runs its own installed imtext, which
#: must be this version.
TAG_IMTEXT_VERSION = "imtext.version"

#: MLflow rejects longer param values; longer ones are cut and marked (the full params are an
#: artifact, ``params.json``).
MAX_PARAM_CHARS = 6000


def git_commit(cwd: Path | None = None) -> str:
    """The commit checked out in ``cwd``, else ``$IMTEXT_GIT_COMMIT`` (set by images built without
    ``.git``), else ``"unknown"``."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        commit = result.stdout.strip()
        if commit:
            return commit
    except (OSError, subprocess.SubprocessError):
        pass  # no git, not a repository, or a broken one: fall back
    return os.environ.get("IMTEXT_GIT_COMMIT", "").strip() or "unknown"


def data_md5(dvc_file: Path | None) -> str | None:
    """The md5 of the data a ``.dvc`` file tracks (``path=md5`` pairs when it tracks several), or
    ``None`` when there is no such file."""
    if dvc_file is None or not Path(dvc_file).is_file():
        return None
    try:
        meta = yaml.safe_load(Path(dvc_file).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ImtextError(
            f"{dvc_file}: not a readable DVC file ({' '.join(str(exc).split())}); restore it with "
            "`dvc add` or pass no data file"
        ) from None
    outs = meta.get("outs") if isinstance(meta, dict) else None
    hashes = [
        (o.get("path", "?"), o["md5"]) for o in outs or [] if isinstance(o, dict) and "md5" in o
    ]
    if not hashes:
        raise ImtextError(f"{dvc_file}: no 'outs' with an md5; run `dvc add` on the data again")
    if len(hashes) == 1:
        return str(hashes[0][1])
    return ",".join(f"{path}={md5}" for path, md5 in hashes)


def canonical_json(obj: Any) -> str:
    """One JSON text per value: sorted keys, no whitespace, so equal params hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def params_sha256(params: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(params).encode("utf-8")).hexdigest()


def flatten_params(params: dict[str, Any]) -> dict[str, str]:
    """``{"finetune": {"lr": 0.01}}`` -> ``{"finetune.lr": "0.01"}``: MLflow params are flat strings.

    Lists and nested mappings below a section become JSON; ``None`` becomes ``"null"`` as in
    ``params.yaml``.
    """
    flat: dict[str, str] = {}
    for section, values in params.items():
        if not isinstance(values, dict):
            flat[str(section)] = _param_text(values)
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = _param_text(value)
    return flat


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict (booleans, strings, NaN and nested values left out)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def history_metrics(history: list[dict[str, Any]], prefix: str) -> list[tuple[str, float, int]]:
    """``(prefix + key, value, epoch)`` for every number of every epoch of ``history.json``."""
    rows = []
    for index, entry in enumerate(history):
        step = int(entry.get("epoch", index + 1))
        for key, value in numeric_metrics(entry).items():
            if key != "epoch":
                rows.append((f"{prefix}{key}", value, step))
    return rows


def read_json(path: Path, what: str) -> Any:
    """A JSON file an upstream stage wrote, with an error that names it and the stage to re-run."""
    path = Path(path)
    if not path.is_file():
        raise ImtextError(f"{path}: {what} not found; run the stage that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImtextError(f"{path}: {what} is not valid JSON ({exc}); re-run its stage") from None
