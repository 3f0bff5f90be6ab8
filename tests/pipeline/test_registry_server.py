"""imtext.registry against a real tracking server whose artifacts are proxied to S3 (moto).

The set-up of the cluster (``mlflow server --serve-artifacts --artifacts-destination s3://...``) on
127.0.0.1: the client talks HTTP only, the server writes to the bucket. See ``mlflow_server`` in
``conftest.py``.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from imtext.registry import RegistryUnavailableError, load_champion, promote
from tests.unit.test_promotion_race import add_version, run_races
from tests.unit.test_registry import (
    GIT_COMMIT,
    Stages,
    make_cfg,
    png_bytes,
    snapshot,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def client_env(tmp_path, monkeypatch):
    """The client side of a cluster job: a working directory, a commit, bounded HTTP retries."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setenv("IMTEXT_GIT_COMMIT", GIT_COMMIT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return work


def test_register_promote_and_serve_through_the_server(mlflow_server, client_env, tmp_path):
    cfg = make_cfg(mlflow_server.url)
    stages = Stages(tmp_path / "stages")
    for rsum in (60.0, 70.0, 65.0):
        stages.evaluation(rsum)
    before = snapshot(stages.root)

    first = stages.register(cfg, 60.0)
    assert promote(cfg, first.version).promoted
    better = stages.register(cfg, 70.0)
    decision = promote(cfg, better.version)
    assert decision.promoted and decision.previous_champion == first.version
    worse = stages.register(cfg, 65.0)
    refused = promote(cfg, worse.version)
    assert not refused.promoted and "65" in refused.reason and "70" in refused.reason
    assert snapshot(stages.root) == before

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    model = client.get_registered_model(cfg.model_name)
    assert str(model.aliases[cfg.alias]) == better.version
    tags = client.get_model_version(cfg.model_name, worse.version).tags
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.champion_rsum"] == "70.0"
    assert tags["imtext.git_commit"] == GIT_COMMIT

    # The artifacts went through the proxy into the bucket, not onto this machine.
    keys = mlflow_server.objects()
    for suffix in (
        "/artifacts/evaluation/report.html",
        "/artifacts/training/model.pt",
        "/artifacts/params.json",
        "/artifacts/MLmodel",
        "/artifacts/artifacts/export/image_encoder.onnx",
        "/artifacts/artifacts/export/text_encoder.onnx",
    ):
        assert any(key.endswith(suffix) for key in keys), f"no *{suffix} in {keys[:20]}"
    assert not (client_env / "mlartifacts").exists() and not (client_env / "mlruns").exists()

    champion = load_champion(cfg.model_name, tracking_uri=mlflow_server.url)
    texts = champion.predict(pd.DataFrame({"text": ["a red square", "a blue circle"]}))
    images = champion.predict(pd.DataFrame({"image": [png_bytes((200, 10, 10))]}))
    assert texts.shape == (2, images.shape[1])
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-4)

    # The server goes away: the next call fails within seconds and says what to do.
    mlflow_server.stop()
    start = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match=mlflow_server.url):
        promote(cfg, worse.version)
    assert time.monotonic() - start < 30


def test_concurrent_promotions_through_the_server_end_on_the_best_version(
    mlflow_server, client_env
):
    # The promotion lock is a registered model created through the REST API: the server's
    # database makes the second creator fail, whichever machine it runs on.
    cfg = make_cfg(mlflow_server.url, gate_min_delta=0.0)
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    assert [add_version(client, cfg.model_name, rsum) for rsum in (10.0, 20.0, 30.0)] == [
        "1",
        "2",
        "3",
    ]
    run_races(cfg, client)
