"""``imtext ui`` (``make ui``) serving an embedded store as ``imtext register`` leaves it: runs in
SQLite, artifacts in ``mlartifacts`` next to the database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from imtext.mlflow_ui import run_url
from imtext.registry.tracking import local_artifact_root
from imtext.ui import latest_run_url
from tests.pipeline.conftest import free_port

IMTEXT = str(Path(sys.executable).parent / "imtext")


def embedded_store(root: Path) -> tuple[str, str, str]:
    """Two runs in a SQLite store with local artifacts, the second with a report; returns the
    tracking URI, the experiment id and the second run's id."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("imtext", artifact_location=local_artifact_root(uri))
    for name in ("first", "second"):
        run = client.create_run(experiment, run_name=name)
        time.sleep(0.01)  # distinct start times
    client.log_text(run.info.run_id, "<html>report</html>", "evaluation/report.html")
    client.set_terminated(run.info.run_id)
    return uri, experiment, run.info.run_id


@pytest.mark.slow
def test_the_latest_run_is_the_last_started(tmp_path):
    uri, experiment, run_id = embedded_store(tmp_path)
    base = "http://127.0.0.1:5000"
    assert latest_run_url(uri, base) == run_url(base, experiment, run_id)
    # A new store has MLflow's Default experiment and no run.
    assert latest_run_url(f"sqlite:///{tmp_path / 'empty.db'}", base) is None


@pytest.mark.slow
def test_imtext_ui_serves_the_store_and_prints_the_latest_run(tmp_path):
    uri, experiment, run_id = embedded_store(tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen(
        [IMTEXT, "ui", "--tracking-uri", uri, "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # imtext becomes the server; its workers share the group
    )
    try:
        printed = [proc.stdout.readline().rstrip("\n")]
        while not printed[-1].startswith("latest run:") and len(printed) < 50:
            printed.append(proc.stdout.readline().rstrip("\n"))
        assert printed[-2:] == [
            f"MLflow UI on {uri}: {base}",
            f"latest run: {run_url(base, experiment, run_id)}",
        ]
        wait_for(f"{base}/health", proc)
        listing = get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=evaluation")
        assert [f["path"] for f in json.loads(listing)["files"]] == ["evaluation/report.html"]
        report = get(f"{base}/get-artifact?path=evaluation/report.html&run_uuid={run_id}")
        assert report == "<html>report</html>"
    finally:
        stop(proc)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            get(url)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"imtext ui did not serve {url}:\n{proc.stdout.read()}")
            time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
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
