"""``register``: the candidate model in its MLflow run, and one version of the registered model.

In a pipeline the run is the one the training steps logged to (``run_id``; :mod:`.runs`); from
the command line (``imtext register``) a new run is opened and the training history is logged
from ``history.json``. Either way the run ends up with the parameters, the training history,
the evaluation metrics (linked to the logged model and, when known, the dataset), the evaluation
report, the PyTorch model file and the ONNX encoders as a pyfunc model (``mlflow.pyfunc.log_model``,
see :mod:`.pyfunc`). The version carries the run's provenance tags: git commit, data URI, data
digest and DVC md5, params hash, gate metric, and the run id.

Idempotent: a run already registered (a version tagged ``imtext.run_id`` with its id) is never
registered again; ``register`` returns that version. A retried request that created two versions
(MLflow retries a timed-out POST) is cleaned up to the first.

Registering never moves the serving alias; :func:`imtext.registry.promotion.promote` does, behind
the metric gate. Nothing in the input directories is written.

Why no ``mlflow.pytorch`` model: it pickles the ``nn.Module`` (code and all), which ties loading to
this exact source tree, while ``model.pt`` is a state_dict plus config JSON that
``imtext.models.files.load_model`` rebuilds; serving uses the ONNX pyfunc. The run keeps
``training/model.pt`` for fine-tuning and re-export.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric

from imtext import __version__
from imtext.config import RegisterConfig
from imtext.errors import ImtextError
from imtext.registry.export_check import verify_export
from imtext.registry.provenance import (
    TAG_DATA_DIGEST,
    TAG_DATA_MD5,
    TAG_DATA_URI,
    TAG_GATE_METRIC,
    TAG_GATE_VALUE,
    TAG_GIT_COMMIT,
    TAG_IMTEXT_VERSION,
    TAG_KFP_RUN_ID,
    TAG_MODEL_SHA256,
    TAG_PARAMS_SHA256,
    TAG_RUN_ID,
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
from imtext.registry.pyfunc import encoders_model, model_digest
from imtext.registry.retry import (
    DEFAULT_HINT,
    RegistryError,
    Server,
    no_log,
    retry_settings,
    translated,
)
from imtext.registry.runs import (
    DEFAULT_TRACKING_URI,
    STAGE_TAG_PREFIX,
    connect,
    ensure_experiment,
    local_artifact_root,
    resolve_tracking_uri,
    tracking_uri_in_force,
)

__all__ = [
    "DEFAULT_TRACKING_URI",
    "RegisteredVersion",
    "connect",
    "ensure_experiment",
    "local_artifact_root",
    "register",
    "resolve_tracking_uri",
]

#: Name of the logged pyfunc model of the ONNX encoders (in the run's "Models" list).
ENCODERS_MODEL_NAME = "encoders"
#: The training history ``imtext register`` logs from ``history.json`` (finetune's), under the
#: names the pipeline's live logging uses.
HISTORY_PREFIX = "finetune."
TRAIN_FILES = ("model.pt", "metrics.json", "history.json", "log.jsonl")
EXPORT_REQUIRED = ("image_encoder.onnx", "text_encoder.onnx")
#: Run tags copied onto the version: where the candidate came from.
PROVENANCE_TAGS = (
    TAG_GIT_COMMIT,
    TAG_IMTEXT_VERSION,
    TAG_PARAMS_SHA256,
    TAG_DATA_URI,
    TAG_DATA_DIGEST,
    TAG_DATA_MD5,
    TAG_KFP_RUN_ID,
)


@dataclass(frozen=True)
class RegisteredVersion:
    """A model version of a run: ``models:/<name>/<version>``."""

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


def register(
    cfg: RegisterConfig,
    *,
    params: dict[str, Any],
    train_dir: Path,
    eval_dir: Path,
    export_dir: Path,
    data_dvc: Path | None = Path("data.dvc"),
    tracking_uri: str | None = None,
    run_id: str | None = None,
    log: Callable[[str], None] = no_log,
) -> RegisteredVersion:
    """Log a candidate model to MLflow run ``run_id`` (a new run when ``None``) and register it
    as a version of ``cfg.model_name``, unless that run has one already (without moving any
    alias).

    ``params`` is the whole parameter dict (``params.yaml`` after overrides); ``data_dvc`` gives
    a new run its data md5. Raises :class:`ImtextError` for missing or bad inputs before
    contacting the server, and :class:`~imtext.registry.retry.RegistryUnavailableError` when the
    server does not answer.
    """
    candidate = read_candidate(cfg, Path(train_dir), Path(eval_dir), Path(export_dir))
    uri = resolve_tracking_uri(cfg, tracking_uri)
    hint = register_hint(candidate)
    server = connect(uri, cfg, log, hint)
    with retry_settings(cfg), tracking_uri_in_force(uri):
        if run_id is not None:
            done = version_of_run(server, cfg.model_name, run_id)
            if done is not None:
                log(f"MLflow run {run_id} is already registered as version {done}; not again")
                return RegisteredVersion(cfg.model_name, done, run_id, dict(candidate.metrics))
        with translated("register the candidate", uri, hint):
            with candidate_run(server, cfg, run_id, params, data_dvc, candidate) as run:
                version = log_and_register(server, cfg, run, params, candidate)
    log(f"registered {cfg.model_name!r} version {version} (run {run.info.run_id})")
    return RegisteredVersion(cfg.model_name, version, run.info.run_id, dict(candidate.metrics))


@contextmanager
def candidate_run(
    server: Server,
    cfg: RegisterConfig,
    run_id: str | None,
    params: dict[str, Any],
    data_dvc: Path | None,
    candidate: Candidate,
) -> Iterator[Any]:
    """The run ``register`` logs to, active within the block: ``run_id`` resumed, or a new run
    with the provenance and the training history that live logging would have given it. Ends
    FINISHED, or FAILED when the block fails (a half-logged run is not a candidate)."""
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id)
    else:
        commit = git_commit()
        tags = {
            TAG_GIT_COMMIT: commit,
            "mlflow.source.git.commit": commit,
            TAG_IMTEXT_VERSION: __version__,
            TAG_PARAMS_SHA256: params_sha256(params),
        }
        md5 = data_md5(data_dvc)
        if md5 is not None:
            tags[TAG_DATA_MD5] = md5
        experiment_id = ensure_experiment(server, cfg.experiment)
        run = mlflow.start_run(experiment_id=experiment_id, tags=tags)
    status = "FAILED"
    try:
        if run_id is None:
            mlflow.log_params(flatten_params(params))
            log_history(server, run.info.run_id, candidate.history)
        yield run
        status = "FINISHED"
    finally:
        try:
            mlflow.end_run(status)
        except Exception:
            if status == "FINISHED":
                raise
            server.log(f"could not mark MLflow run {run.info.run_id} as failed")


def log_history(server: Server, run_id: str, history: list[dict[str, Any]]) -> None:
    """``history.json`` as metrics stepped by epoch (what the pipeline logs as it trains)."""
    now = int(time.time() * 1000)
    rows = history_metrics(history, HISTORY_PREFIX)
    if rows:
        metrics = [Metric(key, value, now, step) for key, value, step in rows]
        server.client.log_batch(run_id, metrics=metrics)


def log_and_register(
    server: Server,
    cfg: RegisterConfig,
    run: Any,
    params: dict[str, Any],
    candidate: Candidate,
) -> str:
    """Everything of the candidate into the active ``run``, then its version; returns it."""
    run_id = run.info.run_id
    mlflow.set_tags(
        {
            TAG_GATE_METRIC: cfg.gate_metric,
            TAG_GATE_VALUE: repr(candidate.metrics[cfg.gate_metric]),
            TAG_SIMILARITY: candidate.similarity,
            f"{STAGE_TAG_PREFIX}register": "running",
        }
    )
    with encoders_model(candidate.export_dir) as arguments:
        model = mlflow.pyfunc.log_model(name=ENCODERS_MODEL_NAME, **arguments)
    stored = server.client.get_logged_model(model.model_id).artifact_location
    digest = stored_model_digest(stored, candidate.export_dir)
    # Linked to the model (its page lists them) and, when the run knows its data, the dataset.
    dataset = run_dataset(server.client.get_run(run_id))
    mlflow.log_metrics(candidate.metrics, step=0, model_id=model.model_id, dataset=dataset)
    log_artifacts(params, candidate)
    tags = {
        **{key: value for key, value in run_tags(server, run_id).items() if key in PROVENANCE_TAGS},
        TAG_GATE_METRIC: cfg.gate_metric,
        TAG_GATE_VALUE: repr(candidate.metrics[cfg.gate_metric]),
        TAG_SIMILARITY: candidate.similarity,
        TAG_MODEL_SHA256: digest,
        TAG_RUN_ID: run_id,
    }
    version = create_version(server, cfg, run_id, model.model_uri, tags)
    mlflow.set_tag(f"{STAGE_TAG_PREFIX}register", "finished")
    return version


def run_tags(server: Server, run_id: str) -> dict[str, str]:
    return dict(server.client.get_run(run_id).data.tags)


def run_dataset(run: Any) -> Any | None:
    """The run's ``training`` dataset input as an MLflow dataset, or ``None``."""
    from imtext.registry.runs import DATASET_CONTEXT

    for entry in run.inputs.dataset_inputs if run.inputs else []:
        contexts = {tag.value for tag in entry.tags if tag.key == "mlflow.data.context"}
        if DATASET_CONTEXT in contexts:
            return entry.dataset
    return None


def stored_model_digest(artifact_uri: str, export_dir: Path) -> str:
    """:func:`~imtext.registry.pyfunc.model_digest` of the model as the artifact store holds it
    (``artifact_uri``: where serving downloads it from), after checking that its export files are byte for byte ``export_dir``'s (what serving runs
    on); serving checks the digest before every load."""
    import mlflow.artifacts
    from mlflow.models import Model

    from imtext.registry.pyfunc import EXPORT_ARTIFACT

    with tempfile.TemporaryDirectory(prefix="imtext-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp))
        meta = Model.load(str(local / "MLmodel"))
        recorded = meta.flavors["python_function"]["artifacts"][EXPORT_ARTIFACT]["path"]
        if model_digest(local / recorded) != model_digest(export_dir):
            raise RegistryError(
                f"{artifact_uri}: the export files in the artifact store differ from {export_dir} "
                "right after upload; check the artifact store, then register again"
            )
        return model_digest(local)


def log_artifacts(params: dict[str, Any], candidate: Candidate) -> None:
    """The evaluation report, the training outputs, the export's parity evidence and the params."""
    mlflow.log_artifacts(str(candidate.eval_dir), "evaluation")
    for name in TRAIN_FILES:
        path = candidate.train_dir / name
        if path.is_file():
            mlflow.log_artifact(str(path), "training")
    parity = candidate.export_dir / "parity.json"
    if parity.is_file():
        mlflow.log_artifact(str(parity), "export")
    mlflow.log_text(canonical_json(params), "params.json")


def version_of_run(server: Server, name: str, run_id: str) -> str | None:
    """The lowest version of ``name`` registered from ``run_id`` (tag ``imtext.run_id``)."""
    found = versions_of_run(server, name, run_id)
    return found[0] if found else None


def versions_of_run(server: Server, name: str, run_id: str) -> list[str]:
    versions = server.call(
        f"look for versions of {name!r} from run {run_id}",
        server.client.search_model_versions,
        f"name = '{name}' and run_id = '{run_id}'",
    )
    mine = [v for v in versions or [] if (v.tags or {}).get(TAG_RUN_ID) == run_id]
    return sorted((str(v.version) for v in mine), key=int)


def create_version(
    server: Server, cfg: RegisterConfig, run_id: str, model_uri: str, tags: dict[str, str]
) -> str:
    """The version of ``cfg.model_name`` for ``run_id``: one made now from ``model_uri``, or the
    one that exists already (created by an earlier attempt)."""
    done = version_of_run(server, cfg.model_name, run_id)
    if done is not None:
        return done
    created = mlflow.register_model(model_uri, cfg.model_name, tags=tags)
    server.client.update_model_version(
        cfg.model_name,
        created.version,
        description=(
            f"{cfg.gate_metric} {tags[TAG_GATE_VALUE]} at commit "
            f"{tags.get(TAG_GIT_COMMIT, 'unknown')[:12]}"
        ),
    )
    # A retried request (its answer lost) may have made a second version: keep the first.
    first, *extra = versions_of_run(server, cfg.model_name, run_id) or [str(created.version)]
    for version in extra:
        server.log(f"deleting version {version}: a duplicate of version {first} (run {run_id})")
        server.client.delete_model_version(cfg.model_name, version)
    return first


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


def register_hint(candidate: Candidate) -> str:
    return (
        f"{DEFAULT_HINT}. Nothing was changed on disk: the outputs are still in "
        f"{candidate.train_dir}, {candidate.eval_dir} and {candidate.export_dir}; re-run "
        "`imtext register` once the server answers"
    )
