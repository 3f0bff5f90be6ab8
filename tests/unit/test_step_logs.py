"""pipelines/step_logs.py on stand-ins for kfp.local's two task functions: where a step's output
goes, what the events say, and that everything is put back afterwards.

tests/pipeline/test_console.py runs the same capture on a real local run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from kfp.local import status, task_dispatcher
from kfp.local.orchestrator import task_executor

from pipelines.step_logs import CACHED, FAILED, INTERRUPTED, SUCCEEDED, captured_steps

RUN = "imtext-2026-11-30-10-00-00-000000"


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def step_started(self, step):
        self.seen.append(("started", step))

    def step_output(self, step, line):
        self.seen.append(("output", step, line))

    def step_finished(self, step, outcome, seconds, log):
        self.seen.append(("finished", step, outcome, log))

    def message(self, text):
        self.seen.append(("message", text))


def fake_execution(
    pipeline_resource_name, component_name, pipeline_root, exit_code=0, **_ignored
) -> tuple[dict, status.Status]:
    """Prints as run_single_task_implementation does: KFP's record, then the subprocess's lines
    indented (a line in two writes, one without its newline)."""
    logging.info("Executing task \x1b[96m'%s'\x1b[0m", component_name[5:])
    print("    ", end="")
    print('{"stage": "pretrain", "step": 4, "step_loss": 8.5}')
    print("    last line", end="")
    ok = exit_code == 0
    return {}, status.Status.SUCCESS if ok else status.Status.FAILURE


def fake_task(task_name, pipeline_root, pipeline_resource_name, cached=False, exit_code=0):
    """Calls the dispatcher as execute_single_task does, unless the task is a cache hit."""
    if cached:
        logging.info("Task %s cache hit; skipping execution.", task_name)
        return {"model": "elsewhere"}, status.Status.SUCCESS
    return task_dispatcher.run_single_task_implementation(
        pipeline_resource_name=pipeline_resource_name,
        component_name=f"comp-{task_name}",
        pipeline_root=pipeline_root,
        exit_code=exit_code,
    )


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(task_dispatcher, "run_single_task_implementation", fake_execution)
    monkeypatch.setattr(task_executor, "execute_single_task", fake_task)
    # The records reach the root logger's handlers only at INFO (pytest leaves it at WARNING).
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)


def run_task(root: Path, name: str, **kwargs):
    return task_executor.execute_single_task(
        task_name=name, pipeline_root=str(root), pipeline_resource_name=RUN, **kwargs
    )


def test_each_steps_output_goes_to_its_log_and_to_the_events_line_by_line(tmp_path, fakes):
    events = Events()
    with captured_steps(events) as failed:
        run_task(tmp_path, "pretrain")
        run_task(tmp_path, "register", exit_code=1)
        run_task(tmp_path, "evaluate", cached=True)
    pretrain = tmp_path / RUN / "pretrain" / "pretrain.log"
    register = tmp_path / RUN / "register" / "register.log"
    record = '    {"stage": "pretrain", "step": 4, "step_loss": 8.5}'
    assert pretrain.read_text().splitlines()[1:] == [record, "    last line"]
    assert "Executing task 'pretrain'" in pretrain.read_text()  # KFP's record, colours removed
    assert [event for event in events.seen if event[1] == "pretrain"][1:] == [
        ("output", "pretrain", pretrain.read_text().splitlines()[0]),
        ("output", "pretrain", record),
        ("output", "pretrain", "    last line"),
        ("finished", "pretrain", SUCCEEDED, pretrain),
    ]
    assert ("finished", "register", FAILED, register) in events.seen
    assert failed == {"register": register}
    # A cache hit executes nothing: no directory in this run, no log, and no text on the console.
    assert events.seen[-2:] == [("started", "evaluate"), ("finished", "evaluate", CACHED, None)]
    assert not (tmp_path / RUN / "evaluate").exists()


def test_ctrl_c_in_a_step_is_an_interruption_not_a_failure(tmp_path, fakes, monkeypatch):
    def interrupted(pipeline_resource_name, component_name, pipeline_root, **_ignored):
        raise KeyboardInterrupt

    monkeypatch.setattr(task_dispatcher, "run_single_task_implementation", interrupted)
    events = Events()
    with pytest.raises(KeyboardInterrupt), captured_steps(events) as failed:
        run_task(tmp_path, "pretrain")
    log = tmp_path / RUN / "pretrain" / "pretrain.log"
    assert events.seen[-1] == ("finished", "pretrain", INTERRUPTED, log)
    assert failed == {}


def test_the_runners_warnings_outside_steps_reach_the_events_and_its_chatter_does_not(fakes):
    events = Events()
    with captured_steps(events):
        print("-" * 80)
        logging.info("Running pipeline: 'imtext'")
        logging.warning("Could not resolve parent input: x")
        print("a warning printed to stderr", file=sys.stderr)
    assert [event[0] for event in events.seen] == ["message", "message"]
    assert "WARNING root: Could not resolve parent input: x" in events.seen[0][1]
    assert events.seen[1] == ("message", "a warning printed to stderr")


def test_everything_is_put_back_even_when_the_run_raises(fakes):
    stdout, stderr, handlers = sys.stdout, sys.stderr, logging.getLogger().handlers[:]
    with pytest.raises(RuntimeError), captured_steps(Events()):
        raise RuntimeError("Pipeline 'imtext' finished with status FAILURE")
    assert task_executor.execute_single_task is fake_task
    assert task_dispatcher.run_single_task_implementation is fake_execution
    assert (sys.stdout, sys.stderr) == (stdout, stderr)
    assert logging.getLogger().handlers == handlers
