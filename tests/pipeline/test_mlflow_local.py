"""mlflow/start-local.sh: a tracking server on 127.0.0.1 with a SQLite backend store whose artifact
proxy writes to a local directory or, as in the cluster, to S3 (moto standing in for MinIO)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest

from tests.conftest import REPO
from tests.pipeline.conftest import free_port

SCRIPT = REPO / "mlflow" / "start-local.sh"


@contextmanager
def local_server(state: Path, **env: str) -> Iterator[str]:
    """Run start-local.sh in its own process group; yield its URL once /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = state.parent / f"{state.name}-server.log"
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "PORT": str(port),
        "MLFLOW_LOCAL_DIR": str(state),
        **env,
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", str(SCRIPT)],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the server's workers share this group: stop them all
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    assert response.read().strip() == b"OK"
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"MLflow did not start on {url}:\n{log.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        try:  # a worker that outlived the server
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def log_through_the_proxy(url: str) -> tuple[str, str]:
    """Log a run with one text artifact the way the pipeline does; return (run id, artifact URI)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    experiment = client.create_experiment("start-local")
    run = client.create_run(experiment)
    client.log_param(run.info.run_id, "stage", "test")
    client.log_text(run.info.run_id, "hello from imtext", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    assert client.download_artifacts(run.info.run_id, "notes/hello.txt", dst_path=None)
    return run.info.run_id, client.get_run(run.info.run_id).info.artifact_uri


def test_script_prints_the_uri_and_refuses_s3_without_credentials(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "ARTIFACTS_"))
    }
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env=env | {"MLFLOW_LOCAL_DIR": str(tmp_path), "ARTIFACTS_DESTINATION": "s3://bucket"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "AWS_ACCESS_KEY_ID" in result.stderr


@pytest.mark.slow
def test_local_server_with_sqlite_and_local_artifacts(tmp_path):
    state = tmp_path / "state"
    with local_server(state) as url:
        run_id, artifact_uri = log_through_the_proxy(url)
    # Clients see only the proxy; the bytes land under the state directory.
    assert artifact_uri.startswith("mlflow-artifacts:")
    (stored,) = (state / "artifacts").rglob("hello.txt")
    assert stored.read_text() == "hello from imtext" and run_id in str(stored)
    assert (state / "mlflow.db").stat().st_size > 0


@pytest.mark.slow
def test_local_server_proxies_artifacts_to_s3(tmp_path, s3_endpoint, s3_env):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="mlflow-artifacts-local")
    with local_server(
        tmp_path / "state",
        ARTIFACTS_DESTINATION="s3://mlflow-artifacts-local/runs",
        MLFLOW_S3_ENDPOINT_URL=s3_endpoint,
        **s3_env,
    ) as url:
        run_id, artifact_uri = log_through_the_proxy(url)
    assert artifact_uri.startswith("mlflow-artifacts:")
    listing = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket="mlflow-artifacts-local", Prefix="runs/"
    )
    keys = [obj["Key"] for obj in listing.get("Contents", [])]
    assert any(key.endswith(f"{run_id}/artifacts/notes/hello.txt") for key in keys), keys
