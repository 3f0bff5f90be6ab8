"""Flags and helpers several ``imtext`` subcommands share, defined once so that their help reads
the same everywhere."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from pathlib import Path

#: The logger every command reports to (``main`` configures it).
log = logging.getLogger("imtext")


def progress(items: Iterable, total: int, desc: str, unit: str = "img") -> Iterable:
    """A progress bar over ``items`` on a terminal, nothing on a pipe."""
    from tqdm import tqdm

    # tqdm hides itself when stderr is not a terminal (CI logs stay readable).
    return tqdm(items, total=total, desc=desc, unit=unit, disable=None, leave=False)


def force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out even if it is a non-empty directory imtext did not write "
        "(everything in it is deleted); an --out that is or holds an input is always refused",
    )


def params_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="(default: %(default)s)"
    )


def device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)",
    )


def tracking_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI; overrides register.tracking_uri and $MLFLOW_TRACKING_URI "
        "(default when all are unset: sqlite:///mlflow.db with artifacts in ./mlartifacts)",
    )


def prepared_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prepared", type=Path, required=True, help="output directory of `imtext prepare`"
    )
