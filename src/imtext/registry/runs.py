"""The MLflow run of a pipeline run, logged while it trains.

One run per pipeline run: the first training step opens it (:func:`tracked_training` without a
``run_id``) and hands its id downstream; later training steps and ``register`` resume it. Stages
are told apart by metric prefix (``pretrain.val_rsum``, ``finetune.step_loss``) and by a tag per
stage (``imtext.stage.<stage>``: ``running``, ``finished`` or ``failed``), not by nested runs, so
the run page holds the whole history, the system metrics, the dataset and the registered model.
A later stage resumes the run only if it belongs to the same KFP run and parameters: when KFP took
an earlier stage from its cache (another pipeline run's output), the stage opens a run of its own,
tagged ``imtext.continues_run`` with the earlier one, rather than append to another run's history.
Every training step outputs the run it logged to; ``register`` logs to finetune's. A pipeline run
cached all the way to ``register`` therefore names an already registered run, and ``register``
returns its version instead of adding a duplicate.

What :func:`tracked_training` logs:

* at opening: the parameters (flattened ``section.key``), provenance tags (git commit, params
  hash, data URI and digest, the KFP run id) and the raw data as the run's ``training`` dataset
  input (``mlflow.data``, source URI + digest);
* while training: every ``log(metrics, step)`` of the training loop as it happens, with its own
  timestamp; epoch records at ``step = epoch``, step records (``step_*``) at the optimizer step;
* system metrics (CPU, memory, GPU) through MLflow's own monitor.

An unreachable tracking server: opening or resuming the run fails at once, before any training,
with a message that names the URI (nothing is lost, and a training run never starts untracked by
mistake). Once training runs, a failed logging request never stops it: the metrics are kept,
a warning says so, and they are sent with the next record or when the stage ends; if the server
is still away then, a warning says how many were not logged (``history.json`` and ``log.jsonl``
keep them all).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from imtext import __version__
from imtext.config import RegisterConfig
from imtext.registry.provenance import (
    TAG_DATA_DIGEST,
    TAG_DATA_MD5,
    TAG_DATA_URI,
    TAG_GIT_COMMIT,
    TAG_IMTEXT_VERSION,
    TAG_KFP_RUN_ID,
    TAG_PARAMS_SHA256,
    flatten_params,
    git_commit,
    params_sha256,
)
from imtext.registry.retry import (
    DEFAULT_HINT,
    RegistryError,
    Server,
    no_log,
    one_line,
    retry_settings,
    translated,
)

if TYPE_CHECKING:
    from imtext.data.lineage import DataSource

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: Tag ``imtext.stage.<stage>`` holds the stage's state in the run.
STAGE_TAG_PREFIX = "imtext.stage."
#: On a run opened by a later stage: the run of the earlier stage it continues (module docstring).
TAG_CONTINUES_RUN = "imtext.continues_run"
#: The context of the raw data among the run's dataset inputs.
DATASET_CONTEXT = "training"
#: Seconds a logger waits after a failed request before it tries the server again.
RETRY_AFTER_S = 30.0
#: System metrics every this many seconds (MLflow's default of 10 s misses short stages).
SYSTEM_METRICS_INTERVAL_S = "2"


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
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    if urlparse(tracking_uri).scheme != "sqlite":
        return None
    database = unquote(tracking_uri[len("sqlite:///") :])
    if not database or database == ":memory:":
        return None
    return (Path(database).resolve().parent / "mlartifacts").as_uri()


def connect(
    uri: str, cfg: RegisterConfig | None = None, log: Callable[[str], None] = no_log,
    hint: str = DEFAULT_HINT,
) -> Server:  # fmt: skip
    """A client for the tracking server and model registry at ``uri``, its errors translated."""
    return Server(uri, MlflowClient(tracking_uri=uri, registry_uri=uri), hint, log)


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
def tracking_uri_in_force(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI is ``uri`` within the block (the fluent API, the system
    metrics monitor and ``register_model`` resolve through it); afterwards the global URI and
    ``$MLFLOW_TRACKING_URI`` are exactly as they were: a URI nobody set stays unset, so the
    variable keeps deciding."""
    env_before = os.environ.pop("MLFLOW_TRACKING_URI", None)
    # With the variable out of the way, "set" means set by a call to set_tracking_uri.
    set_before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(set_before)  # None: unset again (and the variable removed)
        if env_before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in MLflow's UI: on the server itself, or for an embedded store where
    ``make ui`` serves it."""
    from imtext.mlflow_ui import DEFAULT_PORT, HOST
    from imtext.mlflow_ui import run_url as page

    base = uri if uri.startswith(("http://", "https://")) else f"http://{HOST}:{DEFAULT_PORT}"
    return page(base, experiment_id, run_id)


def source_tags(source: DataSource | None) -> dict[str, str]:
    if source is None:
        return {}
    tags = {TAG_DATA_URI: source.uri, TAG_DATA_DIGEST: source.digest}
    if source.dvc_md5:
        tags[TAG_DATA_MD5] = source.dvc_md5
    return tags


def source_dataset(source: DataSource) -> Any:
    """The raw data as an MLflow dataset: its URI as the source, the listing md5 as digest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    name = source.uri.rstrip("/").rsplit("/", 1)[-1] or source.uri
    return MetaDataset(resolve_dataset_source(source.uri), name=name, digest=source.digest)


def opening_tags(
    params: dict[str, Any], source: DataSource | None, kfp_run_id: str | None
) -> dict[str, str]:
    """The run's tags at opening: provenance, the data, the KFP run it belongs to."""
    commit = git_commit()
    tags = {
        TAG_GIT_COMMIT: commit,
        "mlflow.source.git.commit": commit,
        TAG_IMTEXT_VERSION: __version__,
        TAG_PARAMS_SHA256: params_sha256(params),
        **source_tags(source),
    }
    if kfp_run_id:
        tags[TAG_KFP_RUN_ID] = kfp_run_id
    return tags


@dataclass
class MetricsLogger:
    """The training loop's ``log(metrics, step)``, logging to an MLflow run as it goes.

    Numbers only, keys prefixed with the stage. Failed requests leave the metrics buffered and
    are retried with the next record (at most every :data:`RETRY_AFTER_S` seconds) and at
    :meth:`flush`; training never sees the failure.
    """

    client: Any
    uri: str
    run_id: str
    stage: str
    warn: Callable[[str], None] = logger.warning
    clock: Callable[[], float] = time.time
    pending: list[Metric] = field(default_factory=list)
    failed_at: float | None = None

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        now = int(self.clock() * 1000)
        at = int(metrics["epoch"]) if "epoch" in metrics else int(step)
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self.pending.append(Metric(f"{self.stage}.{key}", float(value), now, at))
        if self.failed_at is None or self.clock() - self.failed_at >= RETRY_AFTER_S:
            self.flush()

    def flush(self) -> bool:
        """Send what is buffered; whether everything is logged now."""
        if not self.pending:
            return True
        try:
            self.client.log_batch(self.run_id, metrics=self.pending)
        except Exception as exc:
            if self.failed_at is None:
                self.warn(
                    f"MLflow at {self.uri} did not take {len(self.pending)} metric(s) of "
                    f"{self.stage} ({one_line(exc, 160)}); training goes on, they are kept and "
                    "sent when the server answers"
                )
            self.failed_at = self.clock()
            return False
        if self.failed_at is not None:
            self.warn(f"MLflow at {self.uri} answers again; the kept metrics are logged")
        self.pending, self.failed_at = [], None
        return True


@dataclass(frozen=True)
class TrackedStage:
    """A training stage logging to the pipeline's run: pass ``log`` to the training loop."""

    run_id: str
    experiment_id: str
    uri: str
    log: MetricsLogger

    @property
    def url(self) -> str:
        return run_url(self.uri, self.experiment_id, self.run_id)


@contextmanager
def tracked_training(
    cfg: RegisterConfig,
    stage: str,
    *,
    run_id: str | None = None,
    params: dict[str, Any] | None = None,
    source: DataSource | None = None,
    kfp_run_id: str | None = None,
    tracking_uri: str | None = None,
    log: Callable[[str], None] = no_log,
    warn: Callable[[str], None] = logger.warning,
) -> Iterator[TrackedStage]:
    """Open (``run_id`` None: with ``params``, ``source`` and ``kfp_run_id``) or resume the
    pipeline's MLflow run for training ``stage``; the run is this process's active run, with
    system metrics, until the block ends (module docstring for what fails and what warns)."""
    uri = resolve_tracking_uri(cfg, tracking_uri)
    hint = f"{DEFAULT_HINT}; nothing was trained, so run the step again once it answers"
    server = connect(uri, cfg, log, hint)
    action = "open the MLflow run" if run_id is None else f"resume MLflow run {run_id}"
    with retry_settings(cfg), tracking_uri_in_force(uri), system_metrics_interval():
        with translated(f"{stage}: {action}", uri, hint):
            active = start(server, cfg, stage, run_id, params or {}, source, kfp_run_id)
        info = active.info
        log(f"{stage}: logging to MLflow run {info.run_id} at {uri}")
        metrics = MetricsLogger(server.client, uri, info.run_id, stage, warn)
        status = "FAILED"
        try:
            yield TrackedStage(info.run_id, info.experiment_id, uri, metrics)
            status = "FINISHED"
        finally:
            finish(metrics, stage, status, warn)


def start(
    server: Server,
    cfg: RegisterConfig,
    stage: str,
    run_id: str | None,
    params: dict[str, Any],
    source: DataSource | None,
    kfp_run_id: str | None,
) -> Any:
    """The active run, ``run_id`` resumed when it belongs to this pipeline run, else a new one
    with the opening records logged; no run is left active when a request fails."""
    earlier = None if run_id is None else server.client.get_run(run_id)
    if earlier is not None and belongs(earlier, params, kfp_run_id):
        active = mlflow.start_run(run_id=run_id, log_system_metrics=True)
        opened = False
    else:
        tags = opening_tags(params, source, kfp_run_id)
        if earlier is not None:
            # An earlier stage came from KFP's cache (another pipeline run) or other params:
            # its run is not this one's, so this stage opens one of its own and links to it.
            tags[TAG_CONTINUES_RUN] = earlier.info.run_id
        active = mlflow.start_run(
            experiment_id=ensure_experiment(server, cfg.experiment),
            tags=tags,
            log_system_metrics=True,
        )
        opened = True
    try:
        if opened:
            mlflow.log_params(flatten_params(params))
            if source is not None:
                mlflow.log_input(source_dataset(source), context=DATASET_CONTEXT)
        mlflow.set_tag(f"{STAGE_TAG_PREFIX}{stage}", "running")
    except BaseException:
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        raise
    return active


def belongs(run: Any, params: dict[str, Any], kfp_run_id: str | None) -> bool:
    """Whether ``run`` is the run of this pipeline run: the same KFP run (when known) and the
    same parameters (when given)."""
    tags = run.data.tags
    if kfp_run_id and tags.get(TAG_KFP_RUN_ID) not in (None, kfp_run_id):
        return False
    return not params or tags.get(TAG_PARAMS_SHA256) in (None, params_sha256(params))


def finish(metrics: MetricsLogger, stage: str, status: str, warn: Callable[[str], None]) -> None:
    """Send the kept metrics, mark the stage and end the active run; a server that is away
    costs a warning, never the stage."""
    logged = metrics.flush()
    if not logged:
        warn(
            f"MLflow at {metrics.uri} is still away: {len(metrics.pending)} metric(s) of "
            f"{metrics.stage} were not logged to run {metrics.run_id} (history.json and "
            "log.jsonl have them)"
        )
    try:
        mlflow.set_tag(f"{STAGE_TAG_PREFIX}{stage}", status.lower())
    except Exception as exc:
        warn(f"could not tag MLflow run {metrics.run_id} ({one_line(exc, 160)})")
    try:
        mlflow.end_run(status)  # leaves the active run even when the request fails
    except Exception as exc:
        warn(f"could not mark MLflow run {metrics.run_id} {status} ({one_line(exc, 160)})")


@contextmanager
def system_metrics_interval() -> Iterator[None]:
    """MLflow samples system metrics every :data:`SYSTEM_METRICS_INTERVAL_S` seconds, unless
    the user chose (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``)."""
    key = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
    if key in os.environ:
        yield
        return
    os.environ[key] = SYSTEM_METRICS_INTERVAL_S
    try:
        yield
    finally:
        os.environ.pop(key, None)
