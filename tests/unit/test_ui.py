"""``imtext ui``: which store it serves, how, and the addresses it prints (no server started)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from imtext.errors import ImtextError
from imtext.mlflow_ui import run_url
from imtext.ui import (
    MAKE_UI,
    check_port_free,
    server_command,
    sqlite_path,
    store_uri,
    ui_command,
)
from tests.conftest import REPO


def test_only_sqlite_stores_have_a_database_file():
    assert sqlite_path("sqlite:///mlflow.db") == Path("mlflow.db")
    assert sqlite_path("sqlite:////tmp/x/mlflow.db") == Path("/tmp/x/mlflow.db")
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("http://127.0.0.1:5000") is None


def test_the_ui_command_for_a_store():
    assert ui_command("sqlite:///mlflow.db") == MAKE_UI == "make ui"
    assert ui_command("sqlite:////tmp/m.db") == "imtext ui --tracking-uri sqlite:////tmp/m.db"
    assert ui_command("http://mlflow:5000") is None  # a server is its own UI


def test_the_store_is_the_one_imtext_pipeline_run_logs_to(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = REPO / "params.yaml"  # register.tracking_uri: null
    assert store_uri(params) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/m.db")
    assert store_uri(params) == "sqlite:////srv/m.db"
    assert store_uri(params, "sqlite:///other.db") == "sqlite:///other.db"
    values = yaml.safe_load(params.read_text())
    values["register"]["tracking_uri"] = "sqlite:///from-params.db"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(values))
    assert store_uri(tmp_path / "params.yaml") == "sqlite:///from-params.db"
    assert store_uri(tmp_path / "missing.yaml") == "sqlite:////srv/m.db"


def test_the_server_runs_on_the_store_and_its_artifact_folder_on_localhost(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = server_command(uri, 5001)
    assert command[1:4] == ["-m", "mlflow", "server"]

    def option(name: str) -> str:
        return command[command.index(name) + 1]

    assert option("--backend-store-uri") == uri
    assert option("--default-artifact-root") == (tmp_path / "mlartifacts").as_uri()
    assert (option("--host"), option("--port")) == ("127.0.0.1", "5001")


def test_a_run_has_a_page_in_the_ui():
    assert run_url("http://127.0.0.1:5000/", "1", "abc") == (
        "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    )


def test_a_port_in_use_is_refused_with_what_to_do():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ImtextError, match=f"127.0.0.1:{port} is in use.*--port"):
            check_port_free("127.0.0.1", port)
