"""`imtext pipeline run`: the whole KFP DAG with the local SubprocessRunner on tiny data read from
an S3-compatible server (moto) on 127.0.0.1, registered and promoted in a local MLflow store."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import boto3
import pytest
import yaml

from imtext.cli.pipeline import add_pipeline_parser
from imtext.data.shapes import generate_shapes
from imtext.errors import ImtextError
from tests.conftest import REPO, tiny_params

pytestmark = pytest.mark.slow

STEPS = ("digest", "prepare", "pretrain", "finetune", "evaluate", "export", "register", "promote")
#: Shrinks the work past training as well (the tiny sizes of tiny_params cover training).
FAST = ["--set", "evaluate.report_queries=2", "--set", "export.quantize=none"]


@pytest.fixture
def s3_shapes(tmp_path, s3_endpoint, s3_env, monkeypatch) -> str:
    """The built-in dataset at 72 images of 32 px, uploaded to s3://imtext-data/shapes; the steps
    find the endpoint in AWS_ENDPOINT_URL, which their subprocesses inherit."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    local = tmp_path / "shapes"
    generate_shapes(local, n_images=72, seed=3, size=32)
    client = boto3.client("s3")
    client.create_bucket(Bucket="imtext-data")
    for path in local.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "imtext-data", f"shapes/{path.relative_to(local)}")
    return "s3://imtext-data/shapes"


def small_params(path: Path) -> Path:
    """``tiny_params``, with the repository's model settings that TINY_MODEL does not name."""
    tiny_params(path)
    params = yaml.safe_load(path.read_text())
    repo = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"] = {**repo["model"], **params["model"]}
    path.write_text(yaml.safe_dump(params))
    return path


def pipeline_run(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="imtext")
    add_pipeline_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pipeline", "run", "--repo", str(REPO), *argv])
    args.func(args)


def summary(out: str) -> str:
    """The summary printed after KFP's log: from the recall table on."""
    return out[out.rindex("\nrecall on the test split:") :]


@pytest.mark.timeout(1800)  # three pipeline runs
def test_local_run_registers_promotes_and_then_gates(tmp_path, s3_shapes, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    params = small_params(tmp_path / "params.yaml")
    # As on a cluster, where the secret sets it: the steps' subprocesses inherit the variable.
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    argv = [
        "--data",
        s3_shapes,
        "--params",
        str(params),
        "--out",
        str(tmp_path / "kfp"),
        "--cache",
        *FAST,
    ]
    pipeline_run(*argv)
    first = summary(capsys.readouterr().out)
    assert re.search(r"\| image -> text \|\s+[\d.]+ \|", first)
    assert "| rsum " in first
    report = Path(re.search(r"^report: (.+)$", first, re.M).group(1))
    assert report.name == "report.html" and "<html" in report.read_text().lower()
    run_dir = report.parents[2]
    assert {p.name for p in run_dir.iterdir()} == set(STEPS)
    assert f"registered: imtext-dual-path version 1 (MLflow {tracking})" in first
    assert "promotion: version 1 is now @champion: no version holds alias 'champion' yet" in first

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    assert str(client.get_model_version_by_alias("imtext-dual-path", "champion").version) == "1"
    check_the_mlflow_store(client, s3_shapes)

    # Again, with every step from prepare to export taken from KFP's local cache (the data's
    # digest is the same): register gets the MLflow run it registered already and adds no
    # version; the version keeps the alias.
    pipeline_run(*argv)
    log = capsys.readouterr().out
    second = summary(log)
    assert "registered: imtext-dual-path version 1 " in second
    assert "promotion: version 1 is now @champion: version 1 already holds alias" in second
    assert len(client.search_model_versions("name = 'imtext-dual-path'")) == 1
    assert str(client.get_model_version_by_alias("imtext-dual-path", "champion").version) == "1"
    newest = max((tmp_path / "kfp").glob("imtext-*"))
    assert {p.name for p in newest.iterdir()} == {"digest", "register", "promote"}

    # One object under the same prefix changes (an image, its colours inverted, same key):
    # the digest changes, so prepare and every step after it run again, none from the cache.
    rewrite_one_image(s3_shapes)
    pipeline_run(*argv)
    capsys.readouterr()
    newest = max((tmp_path / "kfp").glob("imtext-*"))
    assert set(STEPS) - {"promote"} <= {p.name for p in newest.iterdir()}
    digests = [
        (run / "digest" / "executor_output.json").read_text()
        for run in sorted((tmp_path / "kfp").glob("imtext-*"))
    ]
    assert digests[0] == digests[1] != digests[2]


def check_the_mlflow_store(client, data: str) -> None:
    """What issue 16 asks of the store a pipeline run leaves: the run of the registered version
    has per-epoch metrics with distinct timestamps, system metrics, the dataset input and the KFP
    run id; the version's commit and data digest are known."""
    from imtext.data.lineage import describe

    version = client.get_model_version("imtext-dual-path", "1")
    run = client.get_run(version.run_id)
    for stage in ("pretrain", "finetune"):
        history = client.get_metric_history(run.info.run_id, f"{stage}.val_rsum")
        assert [m.step for m in history] == [1, 2], stage
        assert len({m.timestamp for m in history}) == 2, stage
    assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)
    (dataset,) = run.inputs.dataset_inputs
    digest = describe(data).digest
    assert dataset.dataset.digest == digest and data in dataset.dataset.source
    kfp_run_id = run.data.tags["imtext.kfp_run_id"]
    assert kfp_run_id and "{{" not in kfp_run_id
    tags = version.tags
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["imtext.git_commit"]), tags
    assert tags["imtext.data_digest"] == digest and tags["imtext.data_uri"] == data
    assert tags["imtext.run_id"] == run.info.run_id
    assert run.data.tags["imtext.stage.register"] == "finished"


def rewrite_one_image(location: str) -> None:
    """Invert the colours of the first image under ``location``, in place (same key)."""
    import io

    from PIL import Image, ImageOps

    bucket, prefix = location.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3")
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/images/")
    key = sorted(item["Key"] for item in listing["Contents"])[0]
    image = Image.open(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read()))
    out = io.BytesIO()
    ImageOps.invert(image.convert("RGB")).save(out, format="PNG")
    client.put_object(Bucket=bucket, Key=key, Body=out.getvalue())


def test_a_failing_step_is_named(tmp_path, s3_endpoint, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    boto3.client("s3").create_bucket(Bucket="empty-bucket")
    # The first step to read the data is digest: it names the step and its log, which says why.
    with pytest.raises(ImtextError, match=r"local pipeline run failed: .*'digest'") as info:
        pipeline_run(
            "--data",
            "s3://empty-bucket/flickr30k",
            "--params",
            str(small_params(tmp_path / "params.yaml")),
            "--out",
            str(tmp_path / "kfp"),
        )
    log = Path(re.search(r"its log: (\S+)", str(info.value)).group(1))
    assert "s3://empty-bucket/flickr30k: no objects under this prefix" in log.read_text()


def test_bad_settings_fail_before_any_step_runs(tmp_path):
    common = [
        "--params",
        str(small_params(tmp_path / "params.yaml")),
        "--out",
        str(tmp_path / "kfp"),
    ]
    with pytest.raises(ImtextError, match="no key 'epoch' in section 'finetune'"):
        pipeline_run("--set", "finetune.epoch=1", *common)
    with pytest.raises(ImtextError, match="data directory not found"):
        pipeline_run("--data", str(tmp_path / "missing"), *common)
    assert not (tmp_path / "kfp").exists()


@pytest.mark.timeout(1200)  # a whole pipeline run, and a second finetune
def test_a_killed_training_step_is_retried_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """finetune is killed (SIGKILL, as a preempted node) after its first epoch's checkpoint;
    the runner's retry resumes after that epoch, and the model equals an uninterrupted run's."""
    import json
    import signal
    import threading
    import time

    import psutil

    from pipelines.run_local import run_local
    from tests.smoke.test_cli import imtext
    from tests.smoke.test_train import assert_same_weights

    data = tmp_path / "shapes"
    generate_shapes(data, n_images=72, seed=3, size=32)
    params = small_params(tmp_path / "params.yaml")
    tiny = yaml.safe_load(params.read_text())
    tiny["pretrain"]["epochs"] = 0  # Stage I passes its initial model on: finetune is the subject
    tiny["finetune"].update(epochs=3, ranking="paired_hard")
    params.write_text(yaml.safe_dump(tiny))
    root = tmp_path / "kfp"
    killed: list[int] = []

    def kill_finetune_after_its_first_checkpoint() -> None:
        deadline = time.monotonic() + 900
        while not killed and time.monotonic() < deadline:
            if list(root.glob("imtext-*/finetune/model/checkpoint.pt")):
                for child in psutil.Process().children(recursive=True):
                    try:
                        # The step's processes: `... --function_to_execute finetune`.
                        if "finetune" in child.cmdline():
                            child.send_signal(signal.SIGKILL)
                            killed.append(child.pid)
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(0.005)

    killer = threading.Thread(target=kill_finetune_after_its_first_checkpoint, daemon=True)
    killer.start()
    monkeypatch.chdir(tmp_path)  # MLflow's local artifacts
    arguments = {
        "data": str(data),
        "params": params.read_text(),
        "overrides": FAST[1::2],
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    run = run_local(arguments, root, params=params.read_text(), retries=1)
    killer.join(timeout=1)
    assert killed, "finetune was never killed"

    model = run.run_dir / "finetune" / "model"
    history = json.loads((model / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # Each epoch logged once: the retry did not start again from epoch 1.
    epochs = [
        line["epoch"] for line in map(json.loads, (model / "log.jsonl").open()) if "epoch" in line
    ]
    assert epochs == [1, 2, 3]

    whole = tmp_path / "whole"
    result = imtext(
        "finetune", "--prepared", run.run_dir / "prepare" / "prepared",
        "--init", run.run_dir / "pretrain" / "model" / "model.pt",
        "--out", whole, "--params", params, "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_same_weights(whole / "model.pt", model / "model.pt")
    assert_same_weights(whole / "checkpoint.pt", model / "checkpoint.pt")
