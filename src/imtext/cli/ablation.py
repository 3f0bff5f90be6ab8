"""The ablation ``imtext ablate`` runs: train a list of configurations on the same prepared data,
over several seeds, evaluate each on the test split, and write one table.

A configuration is a name, the training stages it runs (``pretrain`` and/or ``finetune``, in that
order, each starting from the previous one's ``model.pt``) and ``section.key=value`` overrides of
``params.yaml`` (the configurations file, ``ablation/configs.yaml``, adds overrides common to all).
Each seed sets ``pretrain.seed`` and ``finetune.seed``. Runs go to ``OUT/runs/<name>/seed<k>/``
(one directory per stage, ``evaluate/``, ``result.json``); a run whose ``result.json`` exists is
skipped and an interrupted stage resumes from its checkpoint, so the command can simply be started
again. The table, ``ablation.md`` and ``ablation.csv``, holds R@1/5/10 both ways and rsum as mean
and sample standard deviation over the seeds (the CSV also every seed's row), plus the contrasts
the configurations file asks for: the mean per-seed difference of rsum between two configurations
(the seeds pair them: same data order and initialisation) with its standard deviation.

The module writes files and calls ``log(message)``; MLflow logging is the caller's
(:mod:`imtext.cli.ablate`, through :func:`imtext.registry.ablation.log_ablation`: a parent run, one
nested run per configuration and seed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imtext.config import apply_overrides, check_method, stage_config_from_params
from imtext.errors import ConfigError
from imtext.eval.evaluate import evaluate
from imtext.logs import MessageLog
from imtext.metrics_log import jsonl_metrics_log
from imtext.train.loop import train_stage

STAGES = ("pretrain", "finetune")
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
RESULT_FILE = "result.json"
TABLE_MD = "ablation.md"
TABLE_CSV = "ablation.csv"


def _no_log(message: str) -> None:
    pass


@dataclass(frozen=True)
class Configuration:
    """One row of the ablation: ``stages`` run in order with ``overrides`` over the params."""

    name: str
    description: str
    stages: tuple[str, ...]
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """A configurations file: overrides common to all, the configurations, the contrasts."""

    common: tuple[str, ...]
    configurations: tuple[Configuration, ...]
    #: ``(a, b)``: report ``rsum(a) - rsum(b)`` per seed.
    contrasts: tuple[tuple[str, str], ...]


def read_plan(path: str | Path) -> Plan:
    """Parse a configurations file; errors name the file and the entry."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: configurations file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("configurations"), list):
        raise ConfigError(f"{path}: expected a mapping with a list 'configurations'")
    unknown = sorted(set(raw) - {"common", "configurations", "contrasts"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {unknown[0]!r}; keys: common, configurations, contrasts"
        )
    configs = tuple(
        _configuration(entry, f"{path}: configurations[{i}]")
        for i, entry in enumerate(raw["configurations"])
    )
    names = [c.name for c in configs]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"{path}: configuration names must be present and unique, got {names}")
    contrasts = tuple(tuple(pair) for pair in raw.get("contrasts") or [])
    for pair in contrasts:
        if len(pair) != 2 or not set(pair) <= set(names):
            raise ConfigError(f"{path}: contrast {list(pair)} must name two configurations")
    return Plan(_strings(raw.get("common") or [], f"{path}: common"), configs, contrasts)


def select(plan: Plan, names: Sequence[str] | None) -> Plan:
    """``plan`` with only the configurations ``names`` (all when None) and their contrasts."""
    if not names:
        return plan
    known = [c.name for c in plan.configurations]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(f"--only: no configuration {unknown[0]!r}; they are {', '.join(known)}")
    kept = tuple(c for c in plan.configurations if c.name in names)
    contrasts = tuple(pair for pair in plan.contrasts if set(pair) <= set(names))
    return Plan(plan.common, kept, contrasts)


def _configuration(entry: Any, where: str) -> Configuration:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"{where}: expected a mapping with a 'name'")
    unknown = sorted(set(entry) - {"name", "description", "stages", "overrides"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    stages = tuple(entry.get("stages") or ())
    if not stages or list(stages) != [s for s in STAGES if s in stages]:
        raise ConfigError(
            f"{where} ({entry['name']}): stages must be pretrain and/or finetune, in that order; "
            f"got {list(stages)}"
        )
    return Configuration(
        entry["name"],
        str(entry.get("description", "")),
        stages,
        _strings(entry.get("overrides") or [], f"{where}.overrides"),
    )


def _strings(values: Any, where: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}: expected a list of section.key=value strings")
    return tuple(values)


def run_params(params: dict[str, Any], plan: Plan, config: Configuration, seed: int) -> dict:
    """The parameters of one run: ``params`` + common + the configuration's overrides + seed."""
    seeds = [f"{stage}.seed={seed}" for stage in STAGES]
    return apply_overrides(params, [*plan.common, *config.overrides, *seeds])


def check_plan(params: dict[str, Any], plan: Plan) -> None:
    """Build every run's stage configs before anything trains, so a typo fails at once."""
    for config in plan.configurations:
        values = run_params(params, plan, config, 0)
        where = f"configuration {config.name}"
        model = stage_config_from_params("model", values, where)
        for stage in config.stages:
            check_method(model, stage_config_from_params(stage, values, where), where)
        stage_config_from_params("evaluate", values, where)


def run_one(
    params: dict[str, Any],
    plan: Plan,
    config: Configuration,
    seed: int,
    prepared: Path,
    run_dir: Path,
    *,
    device: str = "auto",
    log: MessageLog = _no_log,
) -> dict[str, Any]:
    """Train and evaluate one (configuration, seed) into ``run_dir``; returns its result row.

    Resumable: a finished run returns its stored result; a finished stage is not run again; an
    interrupted one continues from its checkpoint.
    """
    result_path = run_dir / RESULT_FILE
    if result_path.is_file():
        return json.loads(result_path.read_text())
    values = run_params(params, plan, config, seed)
    model_cfg = stage_config_from_params("model", values, config.name)
    started = time.perf_counter()
    init, best_epochs = None, {}
    for stage in config.stages:
        out = run_dir / stage
        if not (out / "metrics.json").is_file():
            cfg = stage_config_from_params(stage, values, config.name)
            log(f"ablate: {config.name} seed {seed}: {stage}")
            train_stage(
                stage, model_cfg, cfg, prepared, out, init=init, resume=True, device=device,
                log=jsonl_metrics_log(out / "log.jsonl", stage), progress=False,
            )  # fmt: skip
        best_epochs[stage] = json.loads((out / "metrics.json").read_text())["best_epoch"]
        init = out / "model.pt"
    train_seconds = time.perf_counter() - started
    eval_cfg = stage_config_from_params("evaluate", values, config.name)
    metrics = evaluate(eval_cfg, init, prepared, run_dir / "evaluate", device=device)
    result = {
        "config": config.name,
        "seed": seed,
        **{k: metrics[k] for k in METRICS},
        "best_epochs": best_epochs,
        "seconds": round(time.perf_counter() - started, 1),
        "train_seconds": round(train_seconds, 1),
        "split": eval_cfg.split,
    }
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_directory(out: Path, name: str, seed: int) -> Path:
    """Where the run of configuration ``name`` at ``seed`` lives under the ablation's ``out``."""
    return Path(out) / "runs" / name / f"seed{seed}"


def finished_rows(plan: Plan, out: Path, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The stored result of every (configuration, seed) of ``plan`` that has finished under
    ``out``, in plan order; unfinished ones are left out (a table of what exists so far)."""
    rows = []
    for config in plan.configurations:
        for seed in seeds:
            path = run_directory(out, config.name, seed) / RESULT_FILE
            if path.is_file():
                rows.append(json.loads(path.read_text()))
    return rows


def run_ablation(
    params: dict[str, Any],
    plan: Plan,
    prepared: Path,
    out: Path,
    seeds: Sequence[int],
    *,
    table_dir: Path | None = None,
    device: str = "auto",
    log: MessageLog = _no_log,
    table_only: bool = False,
) -> list[dict[str, Any]]:
    """Every (configuration, seed), configurations outermost; then the tables. Returns the rows.
    ``table_only``: train nothing, tabulate the runs that have finished."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: give distinct seeds, got {list(seeds)}")
    if table_only:
        rows = finished_rows(plan, Path(out), seeds)
        if not rows:
            raise ConfigError(f"--table-only: no finished run under {Path(out) / 'runs'}")
        write_tables(rows, plan, Path(table_dir or out), seeds)
        return rows
    check_plan(params, plan)
    rows = []
    for config in plan.configurations:
        for seed in seeds:
            run_dir = run_directory(out, config.name, seed)
            row = run_one(
                params, plan, config, seed, Path(prepared), run_dir, device=device, log=log
            )
            log(
                f"ablate: {config.name} seed {seed}: rsum {row['rsum']:.1f} "
                f"({row['train_seconds']:.0f} s training)"
            )
            rows.append(row)
    write_tables(rows, plan, Path(table_dir or out), seeds)
    return rows


# ----------------------------------------------------------------------------------- the table


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarise(rows: Sequence[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """Per configuration, in plan order: ``{config, seeds, <metric>: (mean, std)}`` for each
    metric and ``train_seconds``."""
    summary = []
    for config in plan.configurations:
        mine = [r for r in rows if r["config"] == config.name]
        if not mine:
            continue
        entry: dict[str, Any] = {"config": config.name, "seeds": len(mine)}
        for key in (*METRICS, "train_seconds"):
            entry[key] = mean_std([r[key] for r in mine])
        summary.append(entry)
    return summary


def contrast(rows: Sequence[dict[str, Any]], a: str, b: str, key: str = "rsum") -> dict[str, Any]:
    """``key(a) - key(b)`` over the seeds both have: per-seed differences, their mean and std."""
    by_seed = {name: {r["seed"]: r[key] for r in rows if r["config"] == name} for name in (a, b)}
    seeds = sorted(by_seed[a].keys() & by_seed[b].keys())
    diffs = [by_seed[a][s] - by_seed[b][s] for s in seeds]
    mean, std = mean_std(diffs) if diffs else (math.nan, math.nan)
    return {"a": a, "b": b, "key": key, "seeds": seeds, "diffs": diffs, "mean": mean, "std": std}


def table_csv(rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]]) -> str:
    """Every seed's row, then a ``mean`` and a ``std`` row per configuration."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["config", "seed", *METRICS, "train_seconds"])
    for r in rows:
        writer.writerow([r["config"], r["seed"], *(f"{r[k]:.2f}" for k in METRICS),
                         f"{r['train_seconds']:.0f}"])  # fmt: skip
    for s in summary:
        for i, label in enumerate(("mean", "std")):
            values = [f"{s[k][i]:.2f}" for k in METRICS]
            writer.writerow([s["config"], label, *values, f"{s['train_seconds'][i]:.0f}"])
    return buffer.getvalue()


def table_markdown(
    summary: Sequence[dict[str, Any]],
    plan: Plan,
    rows: Sequence[dict[str, Any]],
    seeds: Sequence[int],
) -> str:
    """The markdown table (mean ± std over seeds) with each configuration's description and the
    requested contrasts."""
    head = ["configuration", "stages", "seeds", *(k.replace("_r", " R@") for k in METRICS),
            "wall min"]  # fmt: skip
    lines = [
        f"# Ablation (test split, mean ± std over the seeds of {', '.join(map(str, seeds))} "
        "that finished)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    configs = {c.name: c for c in plan.configurations}
    for s in summary:
        cells = [f"{s[k][0]:.1f} ± {s[k][1]:.1f}" for k in METRICS]
        stages = " → ".join(configs[s["config"]].stages)
        minutes = f"{s['train_seconds'][0] / 60:.1f}"
        lines.append(f"| {s['config']} | {stages} | {s['seeds']} | " + " | ".join(cells)
                     + f" | {minutes} |")  # fmt: skip
    lines += ["", "R@K in percent; rsum = sum of the six. Seeds per row: "
              + ", ".join(f"{s['config']} {s['seeds']}" for s in summary) + ". wall min: mean "
              "wall-clock minutes of training, as measured (on a shared machine it includes "
              "waiting for the CPU).", ""]  # fmt: skip
    if plan.contrasts:
        lines += ["## Contrasts (per-seed difference of rsum, same seeds)", ""]
        for a, b in plan.contrasts:
            c = contrast(rows, a, b)
            if not c["seeds"]:
                continue
            diffs = ", ".join(f"{d:+.1f}" for d in c["diffs"])
            spread = max(mean_std([r["rsum"] for r in rows if r["config"] == n])[1] for n in (a, b))
            lines.append(
                f"- {a} − {b}: {c['mean']:+.1f} ± {c['std']:.1f} rsum (seeds {c['seeds']}: "
                f"{diffs}); the larger seed std of the two is {spread:.1f}"
            )
        lines.append("")
    lines += ["## Configurations", ""]
    for config in plan.configurations:
        overrides = " ".join(f"`{o}`" for o in config.overrides) or "none"
        lines.append(f"- **{config.name}**: {config.description} Overrides: {overrides}")
    if plan.common:
        lines += ["", "Common overrides: " + " ".join(f"`{o}`" for o in plan.common)]
    return "\n".join(lines) + "\n"


def write_tables(
    rows: Sequence[dict[str, Any]], plan: Plan, table_dir: Path, seeds: Sequence[int]
) -> tuple[Path, Path]:
    """Write ``ablation.md`` and ``ablation.csv`` into ``table_dir``."""
    summary = summarise(rows, plan)
    table_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = table_dir / TABLE_MD, table_dir / TABLE_CSV
    md.write_text(table_markdown(summary, plan, rows, seeds), encoding="utf-8")
    csv_path.write_text(table_csv(rows, summary), encoding="utf-8")
    return md, csv_path
