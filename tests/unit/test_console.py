"""The console view of ``imtext pipeline run``: what it reads from a step's log and what it prints."""

from __future__ import annotations

import io
import json
from pathlib import Path

from imtext.console import (
    Console,
    TrainRecord,
    epoch_line,
    format_seconds,
    next_steps,
    open_command,
    parse_train_record,
    shorten,
    steps_per_epoch,
    tail,
)

EPOCH = {
    "stage": "pretrain",
    "step": 12,
    "epoch": 2,
    "lr": 0.001,
    "train_loss": 7.73432,
    "train_samples_per_s": 5.4977,
    "val_rsum": 266.66666,
}


def clock(_format: str) -> str:
    return "10:00:00"


def test_train_records_are_read_from_train_steps_json_lines_as_kfp_indents_them():
    step = parse_train_record('    {"stage": "pretrain", "step": 20, "step_loss": 4.5}')
    assert step == TrainRecord(step=20, loss=4.5)
    epoch = parse_train_record("    " + json.dumps(EPOCH))
    assert epoch == TrainRecord(
        step=12, loss=7.73432, epoch=2, images_per_s=5.4977, val_rsum=266.66666
    )
    without_validation = {k: v for k, v in EPOCH.items() if k != "val_rsum"}
    assert parse_train_record(json.dumps(without_validation)).val_rsum is None


def test_other_lines_are_not_train_records():
    for line in [
        "",
        "[KFP Executor 2026-11-30 INFO]: pretrain epoch 1, loss 8.0",
        '{"parameterValues": {"Output": true}}',  # an executor output: no stage, no step
        '{"stage": "pretrain", "step": ',  # cut short
        "[1, 2]",
    ]:
        assert parse_train_record(line) is None, line


def test_the_epoch_length_comes_from_the_loops_announcement():
    line = "[KFP Executor INFO]: pretrain: 48 training images, 48 instances, 6 steps per epoch, 2"
    assert steps_per_epoch(line) == 6
    assert steps_per_epoch("pretrain epoch 1, loss 8.0225, 4 img/s") is None


def test_wall_times_read_as_seconds_minutes_or_hours():
    assert format_seconds(4.24) == "4.2s"
    assert format_seconds(187.4) == "3m07s"
    assert format_seconds(3725) == "1h02m"


def test_an_epoch_ends_with_loss_throughput_and_validation_rsum():
    record = parse_train_record(json.dumps(EPOCH))
    assert epoch_line("pretrain", record, 4) == (
        "pretrain epoch 2/4, loss 7.7343, 5 img/s, val rsum 266.7"
    )
    assert epoch_line("pretrain", TrainRecord(step=3, loss=1.0, epoch=1), None) == (
        "pretrain epoch 1, loss 1.0000"
    )


def test_a_stage_of_zero_epochs_says_it_trained_nothing():
    # What train_stage logs for ``epochs: 0`` (params.yaml's Stage I): {"epoch": 0} at step 0.
    record = parse_train_record(json.dumps({"stage": "pretrain", "step": 0, "epoch": 0}))
    assert epoch_line("pretrain", record, 0) == (
        "pretrain: 0 epochs, nothing trained; the initial model is passed on"
    )


def test_tail_keeps_the_last_lines_that_say_something(tmp_path):
    log = tmp_path / "prepare.log"
    body = [f"line {i}" for i in range(30)]
    log.write_text("\n".join([*body, "    ^^^^^^^", "", "-" * 80, "   "]) + "\n")
    assert tail(log, 3) == ["line 27", "line 28", "line 29"]


def test_a_long_line_of_a_failed_steps_log_is_cut_with_a_note():
    assert shorten("x" * 10, 10) == "x" * 10
    assert shorten("x" * 25, 10) == "x" * 10 + " ... (15 more characters)"


def test_the_report_opens_with_the_machines_own_command(tmp_path):
    report = tmp_path / "report.html"
    assert open_command(report, "Darwin") == f"open {report}"
    assert open_command(report, "Linux", which=lambda _: "/usr/bin/xdg-open") == (
        f"xdg-open {report}"
    )
    assert open_command(report, "Linux", which=lambda _: None) == (
        f"python3 -m webbrowser {report.as_uri()}"
    )


def test_next_steps_are_commands_each_after_what_it_does(tmp_path):
    report = tmp_path / "report.html"
    lines = next_steps(report, "make ui")
    commands = [line.strip() for line in lines[1:] if not line.strip().startswith("#")]
    assert commands == [open_command(report), "make ui", "make repro"]
    server = next_steps(report, None)
    assert "make ui" not in "\n".join(server) and "make repro" in server[-1]


def step_log(run: Path, step: str) -> Path:
    return run / step / f"{step}.log"


def run_events(console: Console, run: Path) -> None:
    """The events of a run whose prepare succeeds, pretrain trains 2 epochs of 6 steps (a step
    logged every 4) and register fails."""
    console.step_started("prepare")
    console.step_output("prepare", '{"stage": "prepare", "step": 1, "epoch": 1}')  # not training
    console.step_finished("prepare", "succeeded", 0.7, step_log(run, "prepare"))
    console.step_started("pretrain")
    console.step_output(
        "pretrain", "    [KFP Executor INFO]: pretrain: 6 steps per epoch, 2 epochs"
    )
    for record in [
        {"stage": "pretrain", "step": 4, "step_loss": 8.5},
        {**EPOCH, "step": 6, "epoch": 1},
        {"stage": "pretrain", "step": 8, "step_loss": 8.1},
        {**EPOCH, "step": 12, "epoch": 2},
    ]:
        console.step_output("pretrain", "    " + json.dumps(record))
    console.step_finished("pretrain", "succeeded", 187.4, step_log(run, "pretrain"))
    console.step_started("register")
    console.step_finished("register", "failed", 3.0, step_log(run, "register"))


def test_the_console_prints_a_line_per_step_an_epoch_line_and_a_failures_log(tmp_path):
    log = step_log(tmp_path, "register")
    log.parent.mkdir()
    log.write_text("".join(f"line {i}\n" for i in range(40)) + "RegistryError: no server\n")
    out = io.StringIO()
    run_events(Console(out, epochs={"pretrain": 2}, bars=False, clock=clock), tmp_path)
    assert out.getvalue().splitlines() == [
        "[10:00:00] prepare  started",
        "[10:00:00] prepare  succeeded in 0.7s",
        "[10:00:00] pretrain started",
        "    pretrain epoch 1/2, loss 7.7343, 5 img/s, val rsum 266.7",
        "    pretrain epoch 2/2, loss 7.7343, 5 img/s, val rsum 266.7",
        "[10:00:00] pretrain succeeded in 3m07s",
        "[10:00:00] register started",
        "[10:00:00] register FAILED after 3.0s",
        f"    its log: {log}; the last 15 lines:",
        *[f"    | line {i}" for i in range(26, 40)],
        "    | RegistryError: no server",
    ]


def test_on_a_terminal_each_epoch_has_a_bar_that_gives_way_to_its_line(tmp_path):
    out = io.StringIO()
    console = Console(out, epochs={"pretrain": 2}, bars=True, clock=clock)
    run_events(console, tmp_path)
    text = out.getvalue()
    assert "pretrain epoch 1/2:" in text and "pretrain epoch 2/2:" in text  # the bars' labels
    assert "loss=8.5000" in text and "4/6" in text  # logged step 4 of 6, its loss
    finished = [line.split("\r")[-1] for line in text.split("\n")]
    assert "    pretrain epoch 2/2, loss 7.7343, 5 img/s, val rsum 266.7" in finished
    assert console.log_pattern() == str(tmp_path / "<step>" / "<step>.log")


def test_without_the_loops_announcement_the_first_epoch_gives_the_bars_length():
    out = io.StringIO()
    console = Console(out, epochs={"finetune": 3}, bars=True, clock=clock)
    console.step_started("finetune")
    for record in [{**EPOCH, "step": 6, "epoch": 1}, {"stage": "finetune", "step": 9}]:
        console.step_output("finetune", json.dumps(record))
    assert "finetune epoch 2/3:  50%" in out.getvalue()  # step 3 of 6


def test_a_cached_step_a_skipped_one_and_an_interrupted_one_say_so(tmp_path):
    out = io.StringIO()
    console = Console(out, bars=False, clock=clock)
    console.step_started("pretrain")
    console.step_finished("pretrain", "cached", 0.01, None)
    console.step_skipped("promote", "by the gate")
    console.step_finished("export", "interrupted", 61, tmp_path / "export.log")
    assert out.getvalue().splitlines()[1:] == [
        "[10:00:00] pretrain cached: the outputs of an earlier run",
        "[10:00:00] promote  skipped: by the gate",
        f"[10:00:00] export   interrupted after 1m01s; its log: {tmp_path / 'export.log'}",
    ]
    assert console.log_pattern() == str(tmp_path.parent / "<step>" / "<step>.log")
