"""The one writer of the JSON-lines training log (``log.jsonl``)."""

from __future__ import annotations

import json

from imtext.console import parse_train_record
from imtext.metrics_log import jsonl_metrics_log


def test_each_record_is_one_line_with_stage_and_step_and_echoed_first(tmp_path):
    path = tmp_path / "out" / "log.jsonl"
    echoed = []
    log = jsonl_metrics_log(path, "finetune", echo=echoed.append)
    assert not path.parent.exists()  # a run refused before its first step leaves no directory
    log({"step_loss": 0.5}, 1)
    log({"epoch": 0, "train_loss": 0.25}, 2)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"stage": "finetune", "step": 1, "step_loss": 0.5},
        {"stage": "finetune", "step": 2, "epoch": 0, "train_loss": 0.25},
    ]
    assert echoed == lines
    assert parse_train_record(lines[0]).loss == 0.5  # what the console of a local run reads


def test_a_resumed_run_appends(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"stage": "pretrain", "step": 1}\n', encoding="utf-8")
    jsonl_metrics_log(path, "pretrain")({"step_loss": 1.0}, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
