"""``register``: one MLflow run per candidate model, and a new version of the registered model.

The run holds everything needed to judge and reproduce the candidate: the parameters (flattened
``section.key``), the evaluation metrics, the training history (stepped by epoch), the evaluation
report, the PyTorch model file and the ONNX encoders as a pyfunc model (see :mod:`.pyfunc`). The
run and the version carry the same provenance tags: git commit, data hash, params hash, gate metric.

Registering never moves the serving alias; :func:`imtext.registry.promotion.promote` does, behind
the metric gate. Nothing in the input directories is written.

Why no ``mlflow.pytorch`` model: it pickles the ``nn.Module`` (code and all), which ties loading to
this exact source tree, while ``model.pt`` is a state_dict plus config JSON that
``imtext.train.checkpoint.load_model`` rebuilds; serving uses the ONNX pyfunc. The run keeps
``training/model.pt`` for fine-tuning and re-export.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunStatus
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from imtext import __version__
from imtext.config import RegisterConfig
from imtext.errors import ImtextError
from imtext.registry.export_check import verify_export
from imtext.registry.provenance import (
    TAG_DATA_MD5,
    TAG_GATE_METRIC,
    TAG_GATE_VALUE,
    TAG_GIT_COMMIT,
    TAG_IMTEXT_VERSION,
    TAG_MODEL_SHA256,
    TAG_PARAMS_SHA256,
    TAG_SIMILARITY,
    canonical_json,
    data_md5,
    flatten_params,
    git_commit,
    history_metrics,
    numeric_metrics,
    params_sha256,
    read_json,
)
from imtext.registry.pyfunc import model_digest, save_encoders_model
from imtext.registry.retry import (
    DEFAULT_HINT,
    RegistryError,
    Server,
    bounded_http_retries,
    no_log,
)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: Name of the logged pyfunc model of the ONNX encoders (in the run's "Models" list).
ENCODERS_MODEL_NAME = "encoders"
#: Prefix of the training history's metrics in the run (``training.val_rsum`` per epoch).
HISTORY_PREFIX = "training."
TRAIN_FILES = ("model.pt", "metrics.json", "history.json", "log.jsonl")
EXPORT_REQUIRED = ("image_encoder.onnx", "text_encoder.onnx")
#: MLflow's limits per ``log_batch`` request.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


@dataclass(frozen=True)
class RegisteredVersion:
    """A model version that ``register`` created: ``models:/<name>/<version>``."""

    name: str
    version: str
    run_id: str
    #: The evaluation metrics logged to the run (``evaluate``'s metrics.json, numbers only).
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Candidate:
    """What ``register`` read from the upstream stages, checked before any server is contacted."""

    train_dir: Path
    eval_dir: Path
    export_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    #: preprocess.json's ``similarity``: ``dot`` (embeddings) or ``network`` (pair scores only).
    similarity: str = "dot"


def resolve_tracking_uri(cfg: RegisterConfig, override: str | None = None) -> str:
    """The tracking URI in force: the argument, else ``register.tracking_uri``, else
    ``$MLFLOW_TRACKING_URI``, else the embedded ``sqlite:///mlflow.db``."""
    return (
        override
        or cfg.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or DEFAULT_TRACKING_URI
    )


def local_artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts when MLflow runs embedded on SQLite: an
    ``mlartifacts`` folder next to the database (what ``mlflow server`` would use), rather than
    MLflow's ``./mlruns`` in whatever directory the client happens to run. ``None`` for servers,
    which choose for themselves."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    database = unquote(tracking_uri[len("sqlite:///") :])
    if not database or database == ":memory:":
        return None
    return (Path(database).resolve().parent / "mlartifacts").as_uri()


def connect(
    uri: str, cfg: RegisterConfig, log: Callable[[str], None], hint: str = DEFAULT_HINT
) -> Server:
    """A retrying client for the tracking server and model registry at ``uri``."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return Server(uri, client, cfg.retries, cfg.retry_backoff_s, hint, log)


def register(
    cfg: RegisterConfig,
    *,
    params: dict[str, Any],
    train_dir: Path,
    eval_dir: Path,
    export_dir: Path,
    data_dvc: Path | None = Path("data.dvc"),
    tracking_uri: str | None = None,
    log: Callable[[str], None] = no_log,
) -> RegisteredVersion:
    """Log a candidate model as an MLflow run and register it as a new version of
    ``cfg.model_name`` (without moving any alias).

    ``params`` is the whole parameter dict (``params.yaml`` after overrides). Raises
    :class:`ImtextError` for missing or bad inputs before contacting the server, and
    :class:`~imtext.registry.retry.RegistryUnavailableError` when the server stays unreachable.
    """
    candidate = read_candidate(cfg, Path(train_dir), Path(eval_dir), Path(export_dir))
    tags = provenance_tags(cfg, params, data_dvc, candidate.metrics)
    tags[TAG_SIMILARITY] = candidate.similarity
    uri = resolve_tracking_uri(cfg, tracking_uri)
    server = connect(uri, cfg, log, register_hint(candidate))
    with bounded_http_retries():
        experiment_id = ensure_experiment(server, cfg.experiment)
        run = server.call(
            "create the MLflow run",
            server.client.create_run,
            experiment_id,
            tags={**tags, "mlflow.source.git.commit": tags[TAG_GIT_COMMIT]},
        )
        run_id = run.info.run_id
        log(f"MLflow run {run_id} in experiment {cfg.experiment!r} at {uri}")
        with run_marked_failed_on_error(server, run_id):
            log_params(server, run_id, params)
            log_metrics(server, run_id, candidate)
            log_artifacts(server, run_id, params, candidate)
            model_id, digest = log_encoders_model(
                server, run_id, experiment_id, candidate.export_dir, tags
            )
            version = create_version(
                server, cfg, run_id, model_id, {**tags, TAG_MODEL_SHA256: digest}
            )
            server.call(
                "finish the MLflow run",
                server.client.set_terminated,
                run_id,
                RunStatus.to_string(RunStatus.FINISHED),
            )
    log(f"registered {cfg.model_name!r} version {version} (run {run_id})")
    return RegisteredVersion(cfg.model_name, str(version), run_id, dict(candidate.metrics))


def read_candidate(
    cfg: RegisterConfig, train_dir: Path, eval_dir: Path, export_dir: Path
) -> Candidate:
    """The upstream outputs, with errors that name the missing file and the stage to re-run."""
    if not (train_dir / "model.pt").is_file():
        raise ImtextError(f"{train_dir / 'model.pt'}: model file not found; run finetune first")
    parity = read_json(export_dir / "parity.json", "export checks")
    if not isinstance(parity, dict) or parity.get("passed") is not True:
        raise ImtextError(
            f"{export_dir / 'parity.json'}: the export did not pass its checks; an unverified "
            "model is never registered, fix the export and run it again"
        )
    for name in EXPORT_REQUIRED:
        if not (export_dir / name).is_file():
            raise ImtextError(f"{export_dir / name}: ONNX encoder not found; run export first")
    # parity.json is only a claim: load the encoders and check them before creating a version.
    verify_export(export_dir)
    raw = read_json(eval_dir / "metrics.json", "evaluation metrics")
    metrics = numeric_metrics(raw) if isinstance(raw, dict) else {}
    if cfg.gate_metric not in metrics:
        raise ImtextError(
            f"{eval_dir / 'metrics.json'}: no numeric {cfg.gate_metric!r} (register.gate_metric); "
            f"it has {', '.join(sorted(metrics)) or 'no numbers'}; re-run evaluate or change "
            "register.gate_metric"
        )
    history_file = train_dir / "history.json"
    history = read_json(history_file, "training history") if history_file.is_file() else []
    if not isinstance(history, list):
        raise ImtextError(f"{history_file}: expected a list of epochs; re-run training")
    spec = read_json(export_dir / "preprocess.json", "export preprocessing")
    similarity = spec.get("similarity", "dot") if isinstance(spec, dict) else None
    if similarity not in ("dot", "network"):
        raise ImtextError(
            f"{export_dir / 'preprocess.json'}: similarity {similarity!r} is neither 'dot' nor "
            "'network'; run export again"
        )
    return Candidate(train_dir, eval_dir, export_dir, metrics, history, similarity)


def provenance_tags(
    cfg: RegisterConfig, params: dict[str, Any], dvc_file: Path | None, metrics: dict[str, float]
) -> dict[str, str]:
    """Tags of the run and the version: where the candidate came from and its gate metric."""
    tags = {
        TAG_GIT_COMMIT: git_commit(),
        TAG_IMTEXT_VERSION: __version__,
        TAG_PARAMS_SHA256: params_sha256(params),
        TAG_GATE_METRIC: cfg.gate_metric,
        TAG_GATE_VALUE: repr(metrics[cfg.gate_metric]),
    }
    data_hash = data_md5(dvc_file)
    if data_hash is not None:
        tags[TAG_DATA_MD5] = data_hash
    return tags


def register_hint(candidate: Candidate) -> str:
    return (
        f"{DEFAULT_HINT}. Nothing was changed on disk: the outputs are still in "
        f"{candidate.train_dir}, {candidate.eval_dir} and {candidate.export_dir}; re-run "
        "`imtext register` once the server answers"
    )


def ensure_experiment(server: Server, name: str) -> str:
    """The id of experiment ``name``, created if missing."""
    client = server.client
    experiment = server.call("look up the experiment", client.get_experiment_by_name, name)
    if experiment is None:
        try:
            return server.call(
                "create the experiment",
                client.create_experiment,
                name,
                artifact_location=local_artifact_root(server.uri),
            )
        except RegistryError:
            # Another run may have created it between our two calls.
            experiment = server.call("look up the experiment", client.get_experiment_by_name, name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise RegistryError(
            f"experiment {name!r} at {server.uri} is deleted; restore it (`mlflow experiments "
            "restore`) or set register.experiment to another name"
        )
    return experiment.experiment_id


@contextmanager
def run_marked_failed_on_error(server: Server, run_id: str) -> Iterator[None]:
    """Mark the run FAILED when the block fails, so a half-logged run is not mistaken for a
    candidate; one attempt only, since the server may be the thing that failed."""
    try:
        yield
    except BaseException:
        try:
            server.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        except Exception:
            server.log(f"could not mark MLflow run {run_id} as failed")
        raise


def log_params(server: Server, run_id: str, params: dict[str, Any]) -> None:
    flat = [Param(key, value) for key, value in sorted(flatten_params(params).items())]
    for start in range(0, len(flat), PARAMS_PER_BATCH):
        server.call(
            "log the parameters",
            server.client.log_batch,
            run_id,
            params=flat[start : start + PARAMS_PER_BATCH],
        )


def log_metrics(server: Server, run_id: str, candidate: Candidate) -> None:
    """The evaluation metrics (step 0) and the training history (``training.*``, step = epoch)."""
    now = int(time.time() * 1000)
    rows = [(key, value, 0) for key, value in candidate.metrics.items()]
    rows += history_metrics(candidate.history, HISTORY_PREFIX)
    metrics = [Metric(key, value, now, step) for key, value, step in rows]
    for start in range(0, len(metrics), METRICS_PER_BATCH):
        server.call(
            "log the metrics",
            server.client.log_batch,
            run_id,
            metrics=metrics[start : start + METRICS_PER_BATCH],
        )


def log_artifacts(
    server: Server, run_id: str, params: dict[str, Any], candidate: Candidate
) -> None:
    """The evaluation report, the training outputs, the export's parity evidence and the params."""
    client = server.client
    server.call(
        "upload the evaluation report",
        client.log_artifacts,
        run_id,
        str(candidate.eval_dir),
        "evaluation",
    )
    for name in TRAIN_FILES:
        path = candidate.train_dir / name
        if path.is_file():
            server.call(f"upload {name}", client.log_artifact, run_id, str(path), "training")
    parity = candidate.export_dir / "parity.json"
    if parity.is_file():
        server.call("upload parity.json", client.log_artifact, run_id, str(parity), "export")
    server.call(
        "upload params.json",
        client.log_text,
        run_id,
        canonical_json(params),
        "params.json",
    )


def log_encoders_model(
    server: Server, run_id: str, experiment_id: str, export_dir: Path, tags: dict[str, str]
) -> tuple[str, str]:
    """Log the ONNX encoders as a pyfunc model of the run; returns its logged-model id and the
    :func:`~imtext.registry.pyfunc.model_digest` of the files uploaded.

    Done step by step (rather than ``mlflow.pyfunc.log_model``) so every request goes through the
    retries and no global MLflow state (tracking URI, active run) is touched.
    """
    client = server.client
    model = server.call(
        "create the logged model",
        client.create_logged_model,
        experiment_id,
        name=ENCODERS_MODEL_NAME,
        source_run_id=run_id,
        tags=tags,
    )
    with tempfile.TemporaryDirectory(prefix="imtext-model-") as tmp:
        path = Path(tmp) / "model"
        record = Model(
            artifact_path=model.artifact_location,
            run_id=run_id,
            model_uuid=model.model_id,
            model_id=model.model_id,
        )
        save_encoders_model(export_dir, path, record)
        # Hashed before upload: what serving downloads must hash the same (load_champion).
        digest = model_digest(path)
        server.call(
            "upload the encoders model", client.log_model_artifacts, model.model_id, str(path)
        )
    server.call(
        "link the model to the run",
        client.log_outputs,
        run_id,
        [LoggedModelOutput(model.model_id, step=0)],
    )
    server.call(
        "finalize the logged model",
        client.finalize_logged_model,
        model.model_id,
        LoggedModelStatus.READY,
    )
    return model.model_id, digest


def with_global_tracking_uri(uri: str, call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` run with MLflow's global tracking URI set to ``uri``.

    ``create_model_version`` resolves its ``models:/m-...`` source through the global tracking
    URI, not the client's, so without this a store other than the process default fails with
    "Logged model ... not found".
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        # set_tracking_uri also writes $MLFLOW_TRACKING_URI (and unsets it when restoring None),
        # so both the global (read raw: get_tracking_uri() would fold the variable into it) and
        # the variable are put back exactly as they were.
        env_before = os.environ.get("MLFLOW_TRACKING_URI")
        global_before = tracking_utils._tracking_uri
        mlflow.set_tracking_uri(uri)
        try:
            return call(*args, **kwargs)
        finally:
            mlflow.set_tracking_uri(global_before)
            if env_before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env_before

    return wrapped


def create_version(
    server: Server, cfg: RegisterConfig, run_id: str, model_id: str, tags: dict[str, str]
) -> str:
    """A new version of ``cfg.model_name`` (created if missing) from the logged model."""
    client = server.client
    existing = server.call(
        "look up the registered model",
        client.get_registered_model,
        cfg.model_name,
        missing_ok=True,
    )
    if existing is None:
        try:
            server.call(
                "create the registered model", client.create_registered_model, cfg.model_name
            )
        except RegistryError:
            # Another run may have created it in the meantime; a real refusal shows up below.
            pass
    version = server.call(
        "register the new model version",
        with_global_tracking_uri(server.uri, client.create_model_version),
        cfg.model_name,
        f"models:/{model_id}",
        run_id=run_id,
        tags=tags,
        description=(
            f"{cfg.gate_metric} {tags[TAG_GATE_VALUE]} at commit {tags[TAG_GIT_COMMIT][:12]}"
        ),
        model_id=model_id,
    )
    return str(version.version)
