"""Each step's output of a local run into a log file in the step's directory, as events.

KFP's local runner prints everything to this process's stdout: its own records (each step's
executor input and output as JSON) and, line by line, the output of each step's subprocess.
:func:`captured_steps` takes that stream over for one run and sends it where it belongs:

- a step's lines, KFP's records about it included, to ``RUN/<step>/<step>.log``;
- the beginning and end of each step (``succeeded``, ``failed`` or ``cached``), its wall time and
  its log file, and every line of its output, to a :class:`StepEvents` (a console view);
- KFP's warnings and errors outside any step to :meth:`StepEvents.message`; the rest of its
  pipeline-level chatter (start, end, horizontal rules) is dropped.

The step boundaries come from wrapping two functions of ``kfp.local`` for the duration of the run
rather than from the text of its log: ``task_executor.execute_single_task`` (one call per DAG task,
cache hits included) and ``task_dispatcher.run_single_task_implementation`` (one call per
execution of a task, in which its subprocess runs). Both are internal to kfp, which
requirements.lock pins; tests/pipeline/test_console.py runs a real pipeline through them. One step
runs at a time (the imtext DAG is a chain): steps run side by side, as a ``dsl.ParallelFor`` would,
would mix their logs.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from kfp.local import executor_input_utils, status, task_dispatcher
from kfp.local.orchestrator import task_executor

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

SUCCEEDED, FAILED, CACHED, INTERRUPTED = "succeeded", "failed", "cached", "interrupted"


class StepEvents(Protocol):
    """What a console is told about a captured run (all calls come from the main thread)."""

    def step_started(self, step: str) -> None: ...

    def step_output(self, step: str, line: str) -> None:
        """One line (without its newline) of the step's log, as it is written."""

    def step_finished(self, step: str, outcome: str, seconds: float, log: Path | None) -> None:
        """``outcome`` is SUCCEEDED, FAILED, CACHED or INTERRUPTED (Ctrl-C); ``log`` is None when
        the step did not execute in this run (a cache hit)."""

    def message(self, text: str) -> None:
        """A warning or error of the runner outside any step."""


def step_log_path(step_dir: Path) -> Path:
    """Where a step's log goes: next to its outputs, named after the step."""
    return step_dir / f"{step_dir.name}.log"


@dataclass
class _Step:
    name: str
    log: Path | None = None
    file: TextIO | None = None
    partial: str = ""


@dataclass
class _Router:
    """The state of a captured run: which step is running and where its text goes."""

    events: StepEvents
    step: _Step | None = None
    #: Failed steps and their log files, in the order they failed.
    failed: dict[str, Path | None] = field(default_factory=dict)

    def write(self, text: str, *, stderr: bool) -> None:
        step = self.step
        if step is None or step.file is None:
            if stderr and text.strip():
                self.events.message(_ANSI.sub("", text).rstrip())
            return
        text = _ANSI.sub("", text)
        step.file.write(text)
        *lines, step.partial = (step.partial + text).split("\n")
        for line in lines:
            self.events.step_output(step.name, line)

    def run_task(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``execute_single_task``: one DAG task, from a cache hit or executed (with retries)."""
        name = _argument(original, args, kwargs, "task_name")
        step = self.step = _Step(name)
        self.events.step_started(name)
        start = time.perf_counter()
        outcome = FAILED
        try:
            outputs, task_status = original(*args, **kwargs)
            if task_status == status.Status.SUCCESS:
                # Only a cache hit succeeds without executing (and so without a log).
                outcome = CACHED if step.log is None else SUCCEEDED
            return outputs, task_status
        except KeyboardInterrupt:
            outcome = INTERRUPTED
            raise
        finally:
            self.step = None
            if outcome == FAILED:
                self.failed[name] = step.log
            self.events.step_finished(name, outcome, time.perf_counter() - start, step.log)

    def execute(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``run_single_task_implementation``: one execution of the running task's subprocess."""
        step = self.step
        if step is None:  # not inside a task of the DAG: leave it alone
            return original(*args, **kwargs)
        values = inspect.signature(original).bind(*args, **kwargs).arguments
        step_dir = Path(
            executor_input_utils.construct_local_task_root(
                pipeline_root=values["pipeline_root"],
                pipeline_resource_name=values["pipeline_resource_name"],
                task_resource_name=executor_input_utils.get_local_task_resource_name(
                    values["component_name"]
                ),
            )
        )
        step_dir.mkdir(parents=True, exist_ok=True)
        step.log = step_log_path(step_dir)
        # Appending: a retried step keeps the log of every attempt.
        with step.log.open("a", encoding="utf-8", buffering=1) as file:
            step.file = file
            try:
                return original(*args, **kwargs)
            finally:
                if step.partial:
                    self.events.step_output(step.name, step.partial)
                    step.partial = ""
                step.file = None


def _argument(func: Callable[..., Any], args: tuple, kwargs: dict, name: str) -> Any:
    return inspect.signature(func).bind(*args, **kwargs).arguments[name]


class _Stream(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` during a captured run."""

    def __init__(self, router: _Router, *, stderr: bool) -> None:
        self._router, self._stderr = router, stderr

    def write(self, text: str) -> int:
        self._router.write(text, stderr=self._stderr)
        return len(text)

    def isatty(self) -> bool:
        return False


class _RecordHandler(logging.Handler):
    """The root logger's handler during a captured run, outside the steps (KFP swaps in its own,
    which writes to ``sys.stdout``, around each step and around the pipeline's first and last
    records): a step's records go to its log, the runner's warnings and errors to the events."""

    def __init__(self, router: _Router) -> None:
        super().__init__()
        self._router = router
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        stderr = record.levelno >= logging.WARNING
        self._router.write(self.format(record) + "\n", stderr=stderr)


@contextlib.contextmanager
def _patched(owner: Any, name: str, wrapper: Callable[..., Any]) -> Iterator[None]:
    original = getattr(owner, name)

    def call(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    setattr(owner, name, call)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def _root_handlers(handler: logging.Handler) -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [handler]
    try:
        yield
    finally:
        root.handlers[:] = saved


@contextlib.contextmanager
def captured_steps(events: StepEvents) -> Iterator[dict[str, Path | None]]:
    """Capture the output of the local runner's steps while the block runs (see the module).

    Yields the failed steps with their log files (filled in as steps fail)."""
    router = _Router(events)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(task_executor, "execute_single_task", router.run_task))
        stack.enter_context(
            _patched(task_dispatcher, "run_single_task_implementation", router.execute)
        )
        stack.enter_context(_root_handlers(_RecordHandler(router)))
        stack.enter_context(contextlib.redirect_stdout(_Stream(router, stderr=False)))
        stack.enter_context(contextlib.redirect_stderr(_Stream(router, stderr=True)))
        yield router.failed
