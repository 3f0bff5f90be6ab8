"""The pipeline's MLflow run (imtext.registry.runs), idempotent registration and the ablation's
nested runs, on an embedded MLflow store in tmp_path; an unreachable server is a closed port on
127.0.0.1."""

from __future__ import annotations

import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from imtext.data.lineage import DataSource
from imtext.registry import RegistryUnavailableError, tracked_training
from imtext.registry.ablation import TAG_CONFIG, log_ablation
from imtext.registry.runs import MetricsLogger
from tests.unit.test_registry import GIT_COMMIT, PARAMS, Stages, make_cfg

SOURCE = DataSource("s3://imtext-data/shapes", "0" * 31 + "1", files=3, bytes=30)


def closed_port_uri() -> str:
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setenv("IMTEXT_GIT_COMMIT", GIT_COMMIT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return make_cfg(f"sqlite:///{tmp_path / 'mlflow.db'}")


def train(run, epochs: int) -> None:
    """What the training loop does with its ``log``: step records, then an epoch record."""
    for epoch in range(1, epochs + 1):
        run.log({"step_loss": 3.0 - epoch}, 10 * epoch)
        run.log({"epoch": epoch, "train_loss": 3.0 - epoch, "val_rsum": 10.0 * epoch}, 10 * epoch)
        time.sleep(0.01)  # epochs take time; their timestamps differ


def test_one_run_for_both_stages_then_registered_once(store, tmp_path):
    with tracked_training(
        store, "pretrain", params=PARAMS, source=SOURCE, kfp_run_id="kfp-1"
    ) as first:
        train(first, 2)
    with tracked_training(
        store, "finetune", run_id=first.run_id, params=PARAMS, kfp_run_id="kfp-1"
    ) as second:
        train(second, 3)
    assert second.run_id == first.run_id
    client = MlflowClient(store.tracking_uri, store.tracking_uri)
    run = client.get_run(first.run_id)
    tags = run.data.tags
    assert tags["imtext.kfp_run_id"] == "kfp-1" and tags["imtext.git_commit"] == GIT_COMMIT
    assert tags["imtext.data_uri"] == SOURCE.uri and tags["imtext.data_digest"] == SOURCE.digest
    assert tags["imtext.stage.pretrain"] == tags["imtext.stage.finetune"] == "finished"
    history = client.get_metric_history(run.info.run_id, "finetune.val_rsum")
    assert [(m.step, m.value) for m in history] == [(1, 10.0), (2, 20.0), (3, 30.0)]
    assert len({m.timestamp for m in history}) == 3
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pretrain.step_loss")] == [
        10,
        20,
    ]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == SOURCE.digest and SOURCE.uri in dataset.dataset.source
    assert first.url.endswith(f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")

    # register resumes the run; a re-run (a retried step, a cached pipeline) adds no version.
    stages = Stages(tmp_path / "stages")
    registered = stages.register(store, 60.0, run_id=first.run_id)
    again = stages.register(store, 60.0, run_id=first.run_id)
    assert registered.version == again.version == "1"
    assert len(client.search_model_versions(f"name = '{store.model_name}'")) == 1
    version = client.get_model_version(store.model_name, "1")
    assert version.tags["imtext.run_id"] == first.run_id
    assert version.tags["imtext.data_digest"] == SOURCE.digest
    assert version.tags["imtext.kfp_run_id"] == "kfp-1"
    assert version.source.startswith("models:/m-")  # the logged model, not a run path
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert {m.key for m in model.metrics} >= {"rsum", "i2t_r1"}  # metrics linked to the model
    assert {m.dataset_digest for m in model.metrics if m.key == "rsum"} == {SOURCE.digest}


def test_a_cached_earlier_stage_of_another_pipeline_run_is_continued_not_appended(store):
    with tracked_training(store, "pretrain", params=PARAMS, kfp_run_id="kfp-1") as first:
        train(first, 1)
    with tracked_training(
        store, "finetune", run_id=first.run_id, params=PARAMS, kfp_run_id="kfp-2"
    ) as second:
        train(second, 1)
    assert second.run_id != first.run_id
    tags = MlflowClient(store.tracking_uri).get_run(second.run_id).data.tags
    assert tags["imtext.continues_run"] == first.run_id and tags["imtext.kfp_run_id"] == "kfp-2"


def test_an_unreachable_server_fails_before_training_and_names_the_uri(store):
    uri = closed_port_uri()
    trained = []
    start = time.monotonic()
    with pytest.raises(RegistryUnavailableError) as caught:
        with tracked_training(make_cfg(uri), "pretrain", params=PARAMS):
            trained.append(1)
    assert time.monotonic() - start < 30 and not trained
    assert uri in str(caught.value) and "nothing was trained" in str(caught.value)


def test_a_server_lost_while_training_costs_warnings_not_the_run(store):
    with tracked_training(store, "pretrain", params=PARAMS) as run:
        pass
    store_client = MlflowClient(store.tracking_uri)
    warnings: list[str] = []
    now = [1000.0]
    down = MlflowClient(closed_port_uri())
    logger = MetricsLogger(
        down, "http://gone", run.run_id, "finetune", warnings.append, lambda: now[0]
    )
    logger({"epoch": 1, "val_rsum": 1.0}, 5)  # fails: kept, one warning
    now[0] += 1
    logger({"epoch": 2, "val_rsum": 2.0}, 10)  # within RETRY_AFTER_S: kept, not tried
    assert len(logger.pending) == 2 and len(warnings) == 1 and "http://gone" in warnings[0]
    assert not logger.flush() and len(warnings) == 1  # still away: no new warning
    logger.client = store_client  # the server is back
    now[0] += 60
    logger({"epoch": 3, "val_rsum": 3.0}, 15)
    assert logger.pending == [] and "answers again" in warnings[-1]
    history = store_client.get_metric_history(run.run_id, "finetune.val_rsum")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_the_ablation_is_a_parent_run_with_a_nested_run_per_configuration_and_seed(store, tmp_path):
    rows = [
        {"config": name, "seed": seed, "rsum": rsum + seed, "i2t_r1": 1.0, "train_seconds": 2.0}
        for name, rsum in (("full", 50.0), ("no-instance", 40.0))
        for seed in (0, 1)
    ]
    summary = [
        {"config": name, "rsum": (rsum + 0.5, 0.7), "i2t_r1": (1.0, 0.0)}
        for name, rsum in (("full", 50.0), ("no-instance", 40.0))
    ]
    table = tmp_path / "ablation.md"
    table.write_text("| table |\n")
    parent = log_ablation(
        store,
        configurations=[("full", ()), ("no-instance", ("finetune.loss_weights=[1,0]",))],
        rows=rows,
        summary=summary,
        metrics=("rsum", "i2t_r1"),
        tables=[table],
    )
    client = MlflowClient(store.tracking_uri)
    experiment = client.get_experiment_by_name(store.experiment)
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert len(children) == 4
    seen = {(c.data.tags[TAG_CONFIG], c.data.params["seed"]): c.data.metrics for c in children}
    assert seen[("no-instance", "1")]["rsum"] == 41.0
    assert client.get_run(parent).data.metrics["full.rsum"] == 50.5
    assert [a.path for a in client.list_artifacts(parent)] == ["ablation.md"]


def test_the_global_tracking_uri_is_put_back_as_it_was(monkeypatch):
    import mlflow

    from imtext.registry.runs import tracking_uri_in_force

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    with tracking_uri_in_force("sqlite:///inside.db"):
        assert mlflow.get_tracking_uri() == "sqlite:///inside.db"
    assert not mlflow.is_tracking_uri_set()  # unset again: the variable decides later
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    with tracking_uri_in_force("sqlite:///inside.db"):
        pass
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///changed.db")
    assert mlflow.get_tracking_uri() == "sqlite:///changed.db"
