"""``imtext ui`` (``make ui``): MLflow's UI on the local store that ``make run`` logs to.

An embedded store is a SQLite database (``sqlite:///mlflow.db``) with its artifacts in the
``mlartifacts`` folder next to it (:func:`imtext.registry.tracking.local_artifact_root`); nothing
serves it, so this starts ``mlflow server`` on it, bound to 127.0.0.1, after printing the address
of the latest run. A tracking server has a UI of its own: for one, this only prints that address.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

from imtext.errors import ImtextError
from imtext.mlflow_ui import DEFAULT_PORT, HOST, run_url

#: What ``make ui`` runs: ``imtext ui`` on the default store of ``make run``.
MAKE_UI = "make ui"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, or None for any other store."""
    if urlparse(tracking_uri).scheme != "sqlite":
        return None
    path = unquote(tracking_uri[len("sqlite:///") :])
    return Path(path) if path and path != ":memory:" else None


def store_uri(params: Path, override: str | None = None) -> str:
    """The store ``imtext pipeline run`` logs to with the same ``--tracking-uri`` and parameter
    file: the override, else ``register.tracking_uri``, else $MLFLOW_TRACKING_URI, else
    ``sqlite:///mlflow.db``."""
    from imtext.config import load_stage_config
    from imtext.registry.tracking import DEFAULT_TRACKING_URI, resolve_tracking_uri

    if Path(params).is_file():
        return resolve_tracking_uri(load_stage_config("register", params), override)
    return override or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def ui_command(tracking_uri: str) -> str | None:
    """The command that shows the UI of ``tracking_uri``'s store, or None when the store is a
    server (whose address is its UI)."""
    from imtext.registry.tracking import DEFAULT_TRACKING_URI

    if tracking_uri == DEFAULT_TRACKING_URI:
        return MAKE_UI
    if sqlite_path(tracking_uri) is not None:
        return f"imtext ui --tracking-uri {tracking_uri}"
    return None


def latest_run_url(tracking_uri: str, base_url: str) -> str | None:
    """The UI page of the run that started last in any experiment of the store, or None when the
    store has no run."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    if not experiments:
        return None
    runs = client.search_runs(
        [e.experiment_id for e in experiments],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    return run_url(base_url, runs[0].info.experiment_id, runs[0].info.run_id)


def server_command(tracking_uri: str, port: int, host: str = HOST) -> list[str]:
    """``mlflow server`` on an embedded store, from this Python environment."""
    from imtext.registry.tracking import local_artifact_root

    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri]
    artifacts = local_artifact_root(tracking_uri)
    if artifacts:  # where an experiment created in the UI keeps its artifacts, as `register` does
        command += ["--default-artifact-root", artifacts]
    return command + ["--host", host, "--port", str(port), "--workers", "1"]


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            raise ImtextError(
                f"{host}:{port} is in use (another `make ui`?); pass --port with a free one"
            ) from None


def serve(tracking_uri: str, port: int = DEFAULT_PORT, print_=print) -> None:
    """Print the address of the latest run and become ``mlflow server`` on the store (it runs
    in the foreground; Ctrl-C stops it). For a tracking server, only print the address."""
    database = sqlite_path(tracking_uri)
    if database is None:
        url = latest_run_url(tracking_uri, tracking_uri)
        print_(f"{tracking_uri} is a tracking server with its own UI: {url or tracking_uri}")
        return
    if not database.is_file():
        raise ImtextError(
            f"{database}: no MLflow store here; `make run` creates it (or pass --tracking-uri)"
        )
    check_port_free(HOST, port)
    base_url = f"http://{HOST}:{port}"
    url = latest_run_url(tracking_uri, base_url)
    print_(f"MLflow UI on {tracking_uri}: {base_url}")
    print_(f"latest run: {url}" if url else "no runs yet: `make run` logs one")
    print_("Ctrl-C stops it.")
    sys.stdout.flush()
    sys.stderr.flush()
    command = server_command(tracking_uri, port)
    # MLflow's job runner (GenAI scorers) starts 7 processes that imtext never uses.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # Becoming the server (rather than waiting on it) leaves Ctrl-C and kill to it alone.
    os.execve(command[0], command, env)
