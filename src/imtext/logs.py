"""The two kinds of log a stage function takes, so that no stage knows where its output goes
(the console, a KFP step's log, MLflow, ``log.jsonl``)."""

from __future__ import annotations

from collections.abc import Callable

#: A line for a person: ``log("wrote 5 files to out/")``.
MessageLog = Callable[[str], None]
#: A step's numbers and the step they belong to: ``log({"train_loss": 0.7}, 120)``.
MetricsLog = Callable[[dict[str, float], int], None]
