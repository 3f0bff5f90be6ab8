"""Hot swap: the alias moves to a new version while a client keeps querying the service.

Two versions are registered in a real MLflow store (SQLite in tmp_path) from two stand-in exports
with different weights; the service follows ``models:/NAME@champion``, polling every 0.2 s.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import quote

import pytest

from imtext.registry import load_champion, promote
from imtext.serve.gallery import read_gallery
from imtext.serve.index import IndexCache
from imtext.serve.model import RegistrySource
from imtext.serve.service import Service
from tests.serving import get_json, running, serve_config, tiny_export, tiny_gallery
from tests.unit.test_registry import GIT_COMMIT, Stages, make_cfg


@pytest.fixture
def registry(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setenv("IMTEXT_GIT_COMMIT", GIT_COMMIT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_cfg(f"sqlite:///{work / 'mlflow.db'}")


def test_the_alias_moves_while_a_client_queries_and_no_request_fails(tmp_path, registry):
    stages = Stages(tmp_path / "stages")
    first = stages.register(registry, rsum=50.0)
    assert promote(registry, first.version).promoted
    gallery = read_gallery(tiny_gallery(tmp_path / "gallery"))
    cfg = serve_config(poll_seconds=0.2)
    source = RegistrySource(
        f"models:/{registry.model_name}@champion", None, registry, tmp_path / "cache/downloads"
    )
    service = Service(source, gallery, cfg, IndexCache(tmp_path / "cache"))
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client(url: str) -> None:
        while not stop.is_set():
            try:
                status, body = get_json(url + "/api/search?q=" + quote("a red square") + "&k=2")
            except Exception as exc:  # a dropped connection is a failed request, not a dead client
                answers.append((0, repr(exc)))
                continue
            answers.append((status, body.get("model", {}).get("version")))

    with running(service, cfg) as url:
        assert get_json(url + "/readyz")[1]["model"]["version"] == first.version
        thread = threading.Thread(target=client, args=(url,), daemon=True)
        thread.start()
        # A second version with other weights: its answers differ from the first's.
        stages.export = tiny_export(tmp_path / "stages/export-v2", seed=1)
        second = stages.register(registry, rsum=60.0)
        assert promote(registry, second.version).promoted
        deadline = time.monotonic() + 60
        while not any(version == second.version for _, version in answers):
            assert time.monotonic() < deadline, "the service never served the new version"
            time.sleep(0.05)
        served_after = len(answers)
        while len(answers) < served_after + 20:
            assert time.monotonic() < deadline + 30, "the client stopped getting answers"
            time.sleep(0.05)
        stop.set()
        thread.join(30)
        _, body = get_json(url + "/readyz")
    assert body["model"]["version"] == second.version
    assert {status for status, _ in answers} == {200}
    versions = [version for _, version in answers]
    switch = versions.index(second.version)
    assert switch > 0 and set(versions[:switch]) == {first.version}
    assert set(versions[switch:]) == {second.version}
    # The old version was queried before the move: the client saw both.
    assert versions[0] == first.version


def test_a_failed_poll_keeps_the_serving_version(tmp_path, registry, caplog):
    stages = Stages(tmp_path / "stages")
    first = stages.register(registry, rsum=50.0)
    promote(registry, first.version)
    gallery = read_gallery(tiny_gallery(tmp_path / "gallery"))
    cfg = serve_config(poll_seconds=0.1)
    source = RegistrySource(
        f"models:/{registry.model_name}@champion", None, registry, tmp_path / "cache/downloads"
    )
    service = Service(source, gallery, cfg, IndexCache(tmp_path / "cache"))
    with running(service, cfg) as url:
        # The registry goes away: polls fail, answers keep coming from the loaded version.
        source.tracking_uri = f"sqlite:///{tmp_path / 'missing' / 'nothing.db'}"
        time.sleep(0.5)
        status, body = get_json(url + "/api/search?q=red")
    assert status == 200 and body["model"]["version"] == first.version
    assert "still serving version" in caplog.text
    # The downloaded files were removed once loaded (ONNX Runtime holds the sessions).
    assert not any((tmp_path / "cache/downloads").iterdir())
    assert load_champion(registry.model_name, tracking_uri=registry.tracking_uri) is not None
