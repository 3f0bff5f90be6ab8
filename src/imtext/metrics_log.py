"""The JSON-lines training log, ``log.jsonl``: one record ``{"stage": ..., "step": N, **metrics}``
per logged step and per epoch.

``imtext pretrain``/``finetune``, the ablation's runs and the pipeline's training steps write it
with :func:`jsonl_metrics_log`; :mod:`imtext.console` and :func:`imtext.pytorchjob.replay` read it.
"""

from __future__ import annotations

import json
from pathlib import Path

from imtext.logs import MessageLog, MetricsLog


def jsonl_metrics_log(path: Path, stage: str, *, echo: MessageLog | None = None) -> MetricsLog:
    """The ``log`` callable of ``train_stage`` that appends each record to ``path`` (and passes
    its line to ``echo`` first, when given)."""

    def log(metrics: dict[str, float], step: int) -> None:
        line = json.dumps({"stage": stage, "step": step, **metrics})
        if echo is not None:
            echo(line)
        # Created with the first line, not before: a run refused at the start (no such device,
        # settings that do not fit together) leaves no empty directory behind.
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as file:
            file.write(line + "\n")

    return log
