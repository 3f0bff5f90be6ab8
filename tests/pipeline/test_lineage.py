"""Lineage: the commit, data URI and data digest a cluster step records, built the way the step
builds them (in the image: no .git, the commit from the Dockerfile's ENV; the data on S3, moto on
127.0.0.1), and the digests of local and S3 data."""

from __future__ import annotations

import re
import subprocess

import boto3
import pytest

from imtext.data.lineage import describe, dvc_recorded_md5
from imtext.data.shapes import generate_shapes
from imtext.registry.provenance import TAG_DATA_DIGEST, TAG_DATA_URI, TAG_GIT_COMMIT
from imtext.registry.runs import opening_tags
from tests.conftest import REPO
from tests.unit.test_dockerfile import DOCKERFILE, instructions, stages


def image_environment(build_args: dict[str, str]) -> dict[str, str]:
    """The ENV of the Dockerfile's final stage, its ``${ARG}`` references resolved."""
    env = {}
    for keyword, value in stages(instructions(DOCKERFILE.read_text()))[-1]:
        if keyword == "ENV":
            for name, raw in re.findall(r"(\w+)=(\S+)", value):
                env[name] = re.sub(r"\$\{(\w+)\}", lambda m: build_args.get(m.group(1), ""), raw)
    return env


@pytest.fixture
def s3_data(tmp_path, s3_endpoint, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    local = tmp_path / "shapes"
    generate_shapes(local, n_images=12, seed=3, size=32)
    client = boto3.client("s3")
    client.create_bucket(Bucket="lineage")
    for path in local.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "lineage", f"shapes/{path.relative_to(local)}")
    return local, "s3://lineage/shapes"


def test_a_cluster_step_records_commit_data_uri_and_digest(s3_data, tmp_path, monkeypatch):
    local, location = s3_data
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    # docker/build-push.sh passes the commit as GIT_COMMIT; the image has no git and no .git.
    assert '--build-arg "GIT_COMMIT=$revision"' in (REPO / "docker/build-push.sh").read_text()
    env = image_environment({"GIT_COMMIT": head})
    monkeypatch.setenv("IMTEXT_GIT_COMMIT", env["IMTEXT_GIT_COMMIT"])
    monkeypatch.setenv("PATH", str(tmp_path / "no-git"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    source = describe(location)
    tags = opening_tags({"prepare": {"seed": 0}}, source, "0b6c-kfp-run")
    assert tags[TAG_GIT_COMMIT] == head
    assert tags[TAG_DATA_URI] == location and re.fullmatch(r"[0-9a-f]{32}", tags[TAG_DATA_DIGEST])
    assert all(value and "unknown" not in value for value in tags.values()), tags

    # The same files have the same digest locally and on S3 (ETag = md5 of a single-part upload);
    # one changed object changes it.
    assert describe(str(local)).digest == source.digest
    assert (source.files, source.bytes) == (
        len([p for p in local.rglob("*") if p.is_file()]),
        sum(p.stat().st_size for p in local.rglob("*") if p.is_file()),
    )
    boto3.client("s3").put_object(Bucket="lineage", Key="shapes/dataset.json", Body=b"{}")
    assert describe(location).digest != source.digest


def test_a_dvc_tracked_directory_has_the_md5_dvc_recorded(tmp_path):
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    (project / "data" / "shapes").mkdir(parents=True)
    (project / "data" / "shapes" / "a.txt").write_text("a")
    (project / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    deps:\n    - path: data/shapes\n"
        "      md5: 3b0e4499264e2684e46216edba9eaaf6.dir\n"
    )
    (project / "data.dvc").write_text(
        "outs:\n- md5: 91720f6acf9fdd68854db09bf69fde34.dir\n  path: data\n"
    )
    assert dvc_recorded_md5(project / "data" / "shapes") == "3b0e4499264e2684e46216edba9eaaf6.dir"
    assert dvc_recorded_md5(project / "data") == "91720f6acf9fdd68854db09bf69fde34.dir"
    assert describe(str(project / "data" / "shapes")).dvc_md5.startswith("3b0e")
    assert dvc_recorded_md5(tmp_path) is None  # outside any DVC project
