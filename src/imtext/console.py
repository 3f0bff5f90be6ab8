"""What ``imtext pipeline run`` shows a person: a line as each step starts and ends, training
progress per epoch, and at the end the results and what to try next.

:class:`Console` receives the events of a captured local run (``pipelines/step_logs.py``: each
step's full log is in a file; the console is told of every line and reads only a few):

- from ``pretrain`` and ``finetune``, the JSON records :func:`imtext.pipeline_steps.train_step`
  prints (one per logged step, one per epoch) and the training loop's "N steps per epoch" line;
- when a step fails, the last lines of its log file.

On a terminal each epoch has a progress bar (tqdm) until it ends; on a pipe (CI, a test) only the
line each epoch ends with is printed. This module knows nothing of kfp.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

#: Steps whose output carries training progress.
TRAINING_STEPS = ("pretrain", "finetune")
#: Lines of a failed step's log shown on the console, and the characters shown of each (a JSON
#: record of the executor or of training can run to thousands).
TAIL_LINES = 15
TAIL_WIDTH = 300
#: The training loop's announcement of an epoch's length (``imtext.train.loop``).
_STEPS_PER_EPOCH = re.compile(r"\b(\d+) steps per epoch\b")
_WIDTH = 9  # the longest step name, "finetune", "evaluate" or "register", and a space


@dataclass(frozen=True)
class TrainRecord:
    """One record of ``train_step``'s log: a logged step, or the end of an epoch."""

    step: int
    loss: float | None
    #: Set on the record of an epoch's end, with the metrics below.
    epoch: int | None = None
    images_per_s: float | None = None
    val_rsum: float | None = None


def parse_train_record(line: str) -> TrainRecord | None:
    """The record in a line of a training step's log, or None for any other line.

    ``train_step`` prints ``{"stage": ..., "step": N, ...}``: ``step_loss`` on a logged step,
    ``epoch``, ``train_loss``, ``train_samples_per_s`` and ``val_rsum`` (when it validated) at the
    end of an epoch. KFP indents a step's lines.
    """
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or "stage" not in record or "step" not in record:
        return None
    if "epoch" in record:
        return TrainRecord(
            step=int(record["step"]),
            loss=_number(record.get("train_loss")),
            epoch=int(record["epoch"]),
            images_per_s=_number(record.get("train_samples_per_s")),
            val_rsum=_number(record.get("val_rsum")),
        )
    return TrainRecord(step=int(record["step"]), loss=_number(record.get("step_loss")))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def steps_per_epoch(line: str) -> int | None:
    """The epoch length the training loop announces before its first epoch, if ``line`` is it."""
    match = _STEPS_PER_EPOCH.search(line)
    return int(match.group(1)) if match else None


def format_seconds(seconds: float) -> str:
    """``4.2s``, ``3m07s`` or ``1h02m``: wall times as a person reads them."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def epoch_line(stage: str, record: TrainRecord, epochs: int | None) -> str:
    """The line an epoch ends with: loss, throughput and validation rsum. Epoch 0 is the report
    of a stage configured with ``epochs: 0`` (Stage I off by default): it trained nothing."""
    if record.epoch == 0:
        return f"{stage}: 0 epochs, nothing trained; the initial model is passed on"
    of = f"/{epochs}" if epochs else ""
    parts = [f"{stage} epoch {record.epoch}{of}"]
    if record.loss is not None:
        parts.append(f"loss {record.loss:.4f}")
    if record.images_per_s is not None:
        parts.append(f"{record.images_per_s:.0f} img/s")
    if record.val_rsum is not None:
        parts.append(f"val rsum {record.val_rsum:.1f}")
    return ", ".join(parts)


def tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    """The last ``n`` lines of ``path`` that say something: not blank, not a rule of dashes, not
    the carets under a traceback's line."""
    last: deque[str] = deque(maxlen=n)
    with Path(path).open(encoding="utf-8", errors="replace") as file:
        for line in file:
            line = line.rstrip()
            if line.strip(" -^~"):
                last.append(line)
    return list(last)


def shorten(line: str, width: int = TAIL_WIDTH) -> str:
    """``line``, cut to ``width`` characters with a note of how many more there were."""
    if len(line) <= width:
        return line
    return f"{line[:width]} ... ({len(line) - width} more characters)"


def open_command(path: Path, system: str | None = None, which=shutil.which) -> str:
    """A command that opens ``path`` in a browser on this kind of machine."""
    system = system or platform.system()
    if system == "Darwin":
        return f"open {path}"
    if system == "Windows":
        return f"start {path}"
    if which("xdg-open"):
        return f"xdg-open {path}"
    return f"python3 -m webbrowser {Path(path).resolve().as_uri()}"


def next_steps(report: Path, ui_command: str | None) -> list[str]:
    """The things to try once a run has finished, each a command that works from the repository
    root (after a comment saying what it does), to paste as they are; ``ui_command`` is None when
    the run's MLflow store is a server, whose address is its UI."""
    commands = [("the HTML report of this run", open_command(report))]
    if ui_command:
        commands.append(("MLflow's UI on the run's store, at the latest run", ui_command))
    commands.append(("the same stages with DVC (dvc repro), outputs in artifacts/", "make repro"))
    lines = ["next:"]
    for what, command in commands:
        lines += [f"  # {what}", f"  {command}"]
    return lines


class Console:
    """The events of a captured run (``pipelines.step_logs.StepEvents``), as lines on ``out``."""

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        epochs: dict[str, int] | None = None,
        bars: bool | None = None,
        clock=time.strftime,
    ) -> None:
        # The stream of this moment: while the run is captured, sys.stdout is the capture.
        self.out = out if out is not None else sys.stdout
        self.epochs = dict(epochs or {})
        self.bars = _is_terminal(self.out) if bars is None else bars
        self.clock = clock
        #: Each executed step's log file, in the order they finished.
        self.logs: dict[str, Path] = {}
        self._epoch_length: int | None = None
        self._epoch_start = 0
        self._bar: Any = None

    # --- events ---------------------------------------------------------------------------

    def step_started(self, step: str) -> None:
        self._epoch_length, self._epoch_start = None, 0
        self._print(f"[{self.clock('%H:%M:%S')}] {step:<{_WIDTH}}started")

    def step_output(self, step: str, line: str) -> None:
        if step not in TRAINING_STEPS:
            return
        length = steps_per_epoch(line)
        if length is not None and self._epoch_length is None:
            self._epoch_length = length
            self._open_bar(step, 1)
            return
        record = parse_train_record(line)
        if record is None:
            return
        if record.epoch is None:
            self._advance(step, record)
            return
        self._close_bar()
        self._print("    " + epoch_line(step, record, self.epochs.get(step)))
        if self._epoch_length is None:  # the loop did not announce it: the last epoch's
            self._epoch_length = record.step - self._epoch_start
        self._epoch_start = record.step
        if record.epoch < self.epochs.get(step, 0):
            self._open_bar(step, record.epoch + 1)

    def step_finished(self, step: str, outcome: str, seconds: float, log: Path | None) -> None:
        """``outcome``: succeeded, failed, cached or interrupted (``pipelines.step_logs``)."""
        self._close_bar()
        if log is not None:
            self.logs[step] = log
        stamp = f"[{self.clock('%H:%M:%S')}] {step:<{_WIDTH}}"
        if outcome == "cached":
            self._print(f"{stamp}cached: the outputs of an earlier run")
        elif outcome == "interrupted":
            self._print(f"{stamp}interrupted after {format_seconds(seconds)}; its log: {log}")
        elif outcome == "failed":
            self._print(f"{stamp}FAILED after {format_seconds(seconds)}")
            self._print_failure(log)
        else:
            self._print(f"{stamp}{outcome} in {format_seconds(seconds)}")

    def message(self, text: str) -> None:
        self._print(text)

    # --- the rest --------------------------------------------------------------------------

    def step_skipped(self, step: str, why: str) -> None:
        """A step the DAG did not run (``promote`` behind its gate)."""
        self._print(f"[{self.clock('%H:%M:%S')}] {step:<{_WIDTH}}skipped: {why}")

    def log_pattern(self) -> str | None:
        """``RUN/<step>/<step>.log`` for the logs of this run, or None when no step executed."""
        if not self.logs:
            return None
        return str(next(iter(self.logs.values())).parents[1] / "<step>" / "<step>.log")

    def _print_failure(self, log: Path | None) -> None:
        if log is None or not log.is_file():
            self._print("    (no log: it failed before its subprocess started)")
            return
        lines = tail(log)
        self._print(f"    its log: {log}; the last {len(lines)} lines:")
        for line in lines:
            self._print(f"    | {shorten(line)}")

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _open_bar(self, step: str, epoch: int) -> None:
        if not self.bars:
            return
        from tqdm import tqdm

        of = self.epochs.get(step)
        self._bar = tqdm(
            total=self._epoch_length,
            desc=f"    {step} epoch {epoch}{f'/{of}' if of else ''}",
            unit="step",
            file=self.out,
            leave=False,
            dynamic_ncols=True,
            mininterval=0,  # it hears of a step only every 20 (LOG_EVERY): show each one
        )

    def _advance(self, step: str, record: TrainRecord) -> None:
        if self._bar is None:
            return
        self._bar.update(record.step - self._epoch_start - self._bar.n)
        if record.loss is not None:
            self._bar.set_postfix(loss=f"{record.loss:.4f}")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
