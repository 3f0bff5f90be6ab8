"""data_digest against the real tools: DVC's own hash of a directory, and an S3-compatible server
(moto on 127.0.0.1) whose objects change under a prefix."""

from __future__ import annotations

import boto3
import pytest
import yaml

from imtext.data.digest import data_digest
from imtext.data.shapes import generate_shapes
from imtext.errors import DataError
from tests.pipeline.test_dvc import dvc_repo, run

pytestmark = pytest.mark.slow


def test_a_local_digest_equals_the_md5_dvc_add_records(tmp_path):
    repo = dvc_repo(tmp_path / "repo")
    generate_shapes(repo / "data" / "shapes", n_images=12, size=32)
    run("dvc", "add", "-q", "data", cwd=repo)
    recorded = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert data_digest(repo / "data") == recorded


def test_an_s3_digest_changes_with_one_object_and_only_then(s3_endpoint, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="digest-data")
    for key, body in [("d/a.json", b"{}"), ("d/img/1.png", b"one"), ("other/x", b"x")]:
        s3.put_object(Bucket="digest-data", Key=key, Body=body)
    first = data_digest("s3://digest-data/d")
    assert first.endswith(".s3") and data_digest("s3://digest-data/d/") == first
    s3.put_object(Bucket="digest-data", Key="other/y", Body=b"y")  # outside the prefix
    assert data_digest("s3://digest-data/d") == first
    s3.put_object(Bucket="digest-data", Key="d/img/1.png", Body=b"uno")  # same size, new ETag
    assert data_digest("s3://digest-data/d") != first
    with pytest.raises(DataError, match="s3://digest-data/none: no objects under this prefix"):
        data_digest("s3://digest-data/none")
