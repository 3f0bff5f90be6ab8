"""Where ``imtext ui`` serves MLflow's UI for an embedded store, and the address of a run's page in
that UI. Shared by ``imtext ui`` (which serves it) and the registry (which prints run links), and
free of MLflow: the CLI reads the port while it builds its parser."""

from __future__ import annotations

HOST = "127.0.0.1"
DEFAULT_PORT = 5000


def run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """The page of a run in MLflow's UI."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
