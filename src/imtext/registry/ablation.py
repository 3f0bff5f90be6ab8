"""``imtext ablate --mlflow``: the ablation as one parent MLflow run with a nested run per
configuration and seed, so that MLflow's compare view of the nested runs is the table.

Each nested run (``<config>/seed<k>``) holds the configuration's overrides and the seed as params,
its test metrics, and tags ``imtext.ablation.config`` / ``imtext.ablation.seed``; the parent
holds the configurations, the seeds, each configuration's mean and standard deviation
(``<config>.<metric>`` / ``<config>.<metric>_std``) and the tables as artifacts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow

from imtext.config import RegisterConfig
from imtext.logs import MessageLog
from imtext.registry.retry import no_log, retry_settings, translated
from imtext.registry.runs import (
    connect,
    ensure_experiment,
    resolve_tracking_uri,
    tracking_uri_in_force,
)

TAG_CONFIG = "imtext.ablation.config"
TAG_SEED = "imtext.ablation.seed"


def log_ablation(
    cfg: RegisterConfig,
    *,
    configurations: Sequence[tuple[str, Sequence[str]]],
    rows: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    tables: Sequence[Path],
    tracking_uri: str | None = None,
    log: MessageLog = no_log,
) -> str:
    """Log the ablation (``configurations``: name and overrides; ``rows``: one per configuration
    and seed, as :func:`imtext.cli.ablation.run_ablation` returns them; ``summary``: its
    :func:`~imtext.cli.ablation.summarise`) to experiment ``cfg.experiment``; returns the parent
    run's id."""
    uri = resolve_tracking_uri(cfg, tracking_uri)
    server = connect(uri, cfg, log)
    overrides = dict(configurations)
    seeds = sorted({row["seed"] for row in rows})
    with retry_settings(cfg), tracking_uri_in_force(uri), translated("log the ablation", uri):
        experiment_id = ensure_experiment(server, cfg.experiment)
        with mlflow.start_run(experiment_id=experiment_id, run_name="ablation") as parent:
            mlflow.log_params({"configs": ",".join(overrides), "seeds": ",".join(map(str, seeds))})
            for row in rows:
                with mlflow.start_run(
                    experiment_id=experiment_id,
                    run_name=f"{row['config']}/seed{row['seed']}",
                    nested=True,
                    tags={TAG_CONFIG: row["config"], TAG_SEED: str(row["seed"])},
                ):
                    mlflow.log_params(
                        {
                            "config": row["config"],
                            "seed": row["seed"],
                            "overrides": " ".join(overrides.get(row["config"], ())) or "none",
                        }
                    )
                    mlflow.log_metrics({key: float(row[key]) for key in metrics})
                    mlflow.log_metric("train_seconds", float(row["train_seconds"]))
            for entry in summary:
                for key in metrics:
                    mlflow.log_metric(f"{entry['config']}.{key}", entry[key][0])
                    mlflow.log_metric(f"{entry['config']}.{key}_std", entry[key][1])
            for table in tables:
                mlflow.log_artifact(str(table))
    log(f"ablation logged to MLflow run {parent.info.run_id} ({len(rows)} nested runs) at {uri}")
    return parent.info.run_id
