"""DVC on the real data: data.dvc reproduces, dvc.yaml runs, the S3 remote pushes and pulls."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import boto3
import pytest
import yaml

from imtext.data.shapes import generate_shapes
from tests.conftest import REPO, tiny_params
from tests.pipeline.conftest import BIN

pytestmark = pytest.mark.slow


def run(*args, cwd: Path, env: dict | None = None) -> str:
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def dvc_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    run("dvc", "init", "--no-scm", "-q", cwd=path)
    run("dvc", "config", "core.analytics", "false", cwd=path)
    return path


def test_default_shapes_dataset_reproduces_data_dvc(tmp_path):
    repo = dvc_repo(tmp_path / "repo")
    generate_shapes(repo / "data" / "shapes")  # the defaults, as `make run` calls it
    run("dvc", "add", "-q", "data", cwd=repo)
    tracked = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    regenerated = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]
    assert regenerated == tracked


def test_dvc_yaml_stages_run_and_rerun_only_on_change(tmp_path):
    repo = dvc_repo(tmp_path / "repo")
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    tiny_params(repo / "params.yaml")
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    generate_shapes(repo / "data" / "shapes", n_images=72, size=32)
    run("dvc", "repro", cwd=repo)
    assert (repo / "artifacts" / "prepared" / "train.npz").is_file()
    assert (repo / "artifacts" / "finetune" / "model.pt").is_file()
    metrics = json.loads(run("dvc", "metrics", "show", "--json", cwd=repo))
    assert "val_rsum" in json.dumps(metrics)
    assert "rsum" in metrics[""]["data"]["artifacts/evaluate/metrics.json"]["data"]
    assert (repo / "artifacts" / "export" / "text_encoder.onnx").is_file()
    assert "up to date" in run("dvc", "status", cwd=repo)
    # The plots render with Vega inlined: nothing is fetched when the page opens.
    run("imtext", "plots", "--out", "plots", cwd=repo)
    page = (repo / "plots" / "index.html").read_text()
    assert "<script src" not in page
    assert "vegaEmbed('#recall_at_k'" in page and "vegaEmbed('#artifacts_finetune_history" in page
    # Changing a parameter of the stage makes DVC rerun it.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["min_count"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert "prepare" in run("dvc", "status", cwd=repo)


def test_s3_remote_push_and_pull(tmp_path, s3_endpoint, s3_env):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="imtext-data")
    repo = dvc_repo(tmp_path / "repo")
    # The project's remote, pointed at the local endpoint the way a user points it at MinIO.
    url = run("dvc", "config", "remote.storage.url", cwd=REPO).strip()
    assert url.startswith("s3://")
    run("dvc", "remote", "add", "-d", "storage", url, cwd=repo)
    run("dvc", "remote", "modify", "--local", "storage", "endpointurl", s3_endpoint, cwd=repo)
    generate_shapes(repo / "data" / "shapes", n_images=12, size=32)
    before = sorted((p.relative_to(repo), p.read_bytes()) for p in (repo / "data").rglob("*.*"))
    run("dvc", "add", "-q", "data", cwd=repo)
    run("dvc", "push", "-q", cwd=repo)
    objects = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="imtext-data")
    assert objects["KeyCount"] >= 13  # 12 images, dataset.json and the directory listing

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    run("dvc", "pull", "-q", cwd=repo)
    after = sorted((p.relative_to(repo), p.read_bytes()) for p in (repo / "data").rglob("*.*"))
    assert after == before


def find_experiment(node, name: str) -> dict | None:
    """The entry named ``name`` anywhere in ``dvc exp show --json``'s output."""
    if isinstance(node, dict):
        if node.get("name") == name and "data" in node:
            return node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            found = find_experiment(item, name)
            if found is not None:
                return found
    return None


def test_an_experiment_sets_params_without_editing_dvc_yaml(tmp_path):
    """`dvc exp run -S` on tiny data in a git repository: fewer epochs and no INT8 encoders,
    dvc.yaml as it is, and the experiment in `dvc exp show` with its params and metrics."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    run("git", "init", "-q", cwd=repo)
    run("dvc", "init", "-q", cwd=repo)
    run("dvc", "config", "core.analytics", "false", cwd=repo)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    tiny_params(repo / "params.yaml")
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    generate_shapes(repo / "data" / "shapes", n_images=72, size=32)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-q", "-m", "baseline", cwd=repo, env=git)

    run(
        "dvc", "exp", "run", "-n", "short-fp32",
        "-S", "finetune.epochs=1", "-S", "export.quantize=none",
        cwd=repo, env=git,
    )  # fmt: skip
    assert (repo / "artifacts" / "export" / "text_encoder.onnx").is_file()
    assert not any((repo / "artifacts" / "export" / "int8").iterdir())
    history = json.loads((repo / "artifacts" / "finetune" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]

    shown = json.loads(run("dvc", "exp", "show", "--json", cwd=repo))
    experiment = find_experiment(shown, "short-fp32")
    assert experiment is not None, json.dumps(shown)[:2000]
    params = experiment["data"]["params"]["params.yaml"]["data"]
    assert params["finetune"]["epochs"] == 1 and params["export"]["quantize"] == "none"
    metrics = experiment["data"]["metrics"]
    assert "rsum" in metrics["artifacts/evaluate/metrics.json"]["data"]
    # The workspace's params.yaml holds the experiment's values; dvc.yaml is untouched.
    assert (repo / "dvc.yaml").read_text() == (REPO / "dvc.yaml").read_text()
