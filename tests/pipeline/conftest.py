"""Servers and helpers for the pipeline tier: a real S3-compatible endpoint (moto) on 127.0.0.1 and
an MLflow tracking server that proxies its artifacts to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1, stopped after the session."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto S3 server did not start on {url}")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    return S3_ENV


class MlflowServer:
    """A running ``mlflow server`` on 127.0.0.1 whose artifacts go to an S3 bucket (moto)."""

    def __init__(
        self, url: str, s3_endpoint: str, bucket: str, proc: subprocess.Popen, log: Path
    ) -> None:
        self.url, self.s3_endpoint, self.bucket = url, s3_endpoint, bucket
        self.prefix = "mlartifacts/"
        self.proc, self.log = proc, log

    def stop(self) -> None:
        """Stop the server and every process it started (uvicorn runs as its child)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        try:  # the group outlives the leader when a worker ignored SIGTERM
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def objects(self) -> list[str]:
        """Every key under the server's artifact destination."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint)
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture
def mlflow_server(
    tmp_path: Path, s3_endpoint: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[MlflowServer]:
    """``mlflow server`` as the cluster runs it: SQLite backend in ``tmp_path``, artifacts proxied
    (``--serve-artifacts``) to ``s3://<bucket>/mlartifacts`` on the moto endpoint; one worker.

    Clients need only the URL (the server holds the S3 credentials); the AWS test variables and
    ``MLFLOW_S3_ENDPOINT_URL`` are set for the test process too, as a cluster job would have them.
    """
    import boto3

    bucket = f"mlflow-{tmp_path.name.lower().replace('_', '-')[-40:]}".strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **s3_env,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # its job runner starts 7 unused processes
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path / "mlflow-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{tmp_path / 'mlflow-server.db'}",
                "--artifacts-destination",
                f"s3://{bucket}/mlartifacts",
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: stop() ends uvicorn with it
        )
    server = MlflowServer(url, s3_endpoint, bucket, proc, log)
    try:
        wait_for_health(server, timeout=120)
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
        yield server
    finally:
        server.stop()


def wait_for_health(server: MlflowServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = server.log.read_text(errors="replace")[-3000:]
            pytest.fail(f"mlflow server did not start on {server.url}:\n{tail}")
        time.sleep(0.5)
