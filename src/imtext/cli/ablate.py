"""``imtext ablate``: the ablation of :mod:`imtext.cli.ablation` from the command line, logged to
MLflow through :mod:`imtext.registry.ablation` with --mlflow."""

from __future__ import annotations

import argparse
from pathlib import Path

from imtext.cli.flags import device_arg, log, params_arg, prepared_arg, tracking_arg


def add_ablate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        help="train and evaluate a list of configurations over seeds; write one table",
        description=(
            "For every configuration of --configs (a name, its stages and params overrides) and "
            "every seed: train its stages (pretrain and/or finetune) on --prepared and evaluate "
            "the result on the 'evaluate' section's split, into OUT/runs/NAME/seedK/. Then write "
            "ablation.md and ablation.csv (R@1/5/10 both ways and rsum, mean and std over the "
            "seeds; the CSV also per seed) into --table-dir. Finished runs are skipped and "
            "interrupted stages resume, so an interrupted ablation continues when run again."
        ),
    )
    prepared_arg(p)
    p.add_argument("--out", type=Path, required=True, help="directory of the runs")
    p.add_argument(
        "--configs",
        type=Path,
        default=Path("ablation/configs.yaml"),
        help="configurations file (default: %(default)s)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: %(default)s)")
    p.add_argument(
        "--table-dir", type=Path, default=None, help="where the table goes (default: OUT)"
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these configurations (e.g. to share them out among processes)",
    )
    p.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: write the tables from the runs of --seeds that have finished "
        "under --out (a row shows how many seeds it has)",
    )
    params_arg(p)
    device_arg(p)
    p.add_argument(
        "--mlflow",
        action="store_true",
        help="also log to MLflow (experiment register.experiment): a parent run 'ablation' with "
        "the table, and a nested run per configuration and seed (MLflow's compare view)",
    )
    tracking_arg(p)
    p.set_defaults(func=_run_ablate)


def _run_ablate(args: argparse.Namespace) -> None:
    from imtext.cli.ablation import METRICS, read_plan, run_ablation, select, summarise
    from imtext.config import read_params, stage_config_from_params

    params = read_params(args.params)
    plan = select(read_plan(args.configs), args.only)
    table_dir = args.table_dir or args.out
    rows = run_ablation(
        params, plan, args.prepared, args.out, args.seeds, table_dir=table_dir,
        device=args.device, log=log.info, table_only=args.table_only,
    )  # fmt: skip
    log.info("ablation table: %s", table_dir / "ablation.md")
    if not args.mlflow:
        return
    from imtext.registry.ablation import log_ablation

    log_ablation(
        stage_config_from_params("register", params, str(args.params)),
        configurations=[(c.name, (*plan.common, *c.overrides)) for c in plan.configurations],
        rows=rows,
        summary=summarise(rows, plan),
        metrics=METRICS,
        tables=[table_dir / "ablation.md", table_dir / "ablation.csv"],
        tracking_uri=args.tracking_uri,
        log=log.info,
    )
