"""The repository keeps its promises: the README's two commands, CI, required entries, pins."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import REPO


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make run", "make test"]


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_required_top_level_entries_exist():
    for entry in (
        "pipelines",
        "components",
        "data.dvc",
        "mlflow",
        "k8s",
        "tests",
        "pyproject.toml",
    ):
        assert (REPO / entry).exists(), entry


def test_data_dvc_tracks_the_raw_data_directory():
    (out,) = yaml.safe_load((REPO / "data.dvc").read_text())["outs"]
    assert out["path"] == "data" and out["md5"].endswith(".dir")


def test_every_dependency_is_pinned_and_locked():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = {
        line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line
    }
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    for requirement in requirements:
        name, version = re.fullmatch(
            r"([A-Za-z0-9_.-]+)(?:\[[a-z0-9,]+\])?==(\S+)", requirement
        ).groups()
        assert lock[name.lower().replace("_", "-")] == version, requirement
    gpu = project["optional-dependencies"]["gpu"]
    assert gpu == ["onnxruntime-gpu==" + lock["onnxruntime"]]
    assert "onnxruntime-gpu" not in lock  # never installed beside onnxruntime
