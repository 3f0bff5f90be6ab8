"""imtext.data.remote against an S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

import boto3
import pytest

from imtext.data.remote import fetch, split_s3
from imtext.errors import DataError, ImtextError
from tests.pipeline.conftest import free_port

pytestmark = pytest.mark.slow

FILES = {
    "dataset.json": b'{"images": []}',
    "images/a.png": b"\x89PNG a",
    "images/sub/b.png": b"\x89PNG bb",
}


@pytest.fixture
def bucket(s3_endpoint, s3_env, monkeypatch) -> str:
    """A fresh bucket holding FILES under the prefix ``shapes/``; boto3 finds the endpoint in
    AWS_ENDPOINT_URL, as in a pipeline pod."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    name = f"data-{time.monotonic_ns()}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    for key, body in FILES.items():
        client.put_object(Bucket=name, Key=f"shapes/{key}", Body=body)
    client.put_object(Bucket=name, Key="shapes/images/", Body=b"")  # a console's folder marker
    client.put_object(Bucket=name, Key="shapes-other/x.txt", Body=b"not ours")
    return name


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_split_s3():
    assert split_s3("s3://b/some/prefix") == ("b", "some/prefix/")
    assert split_s3("s3://b/some/prefix/") == ("b", "some/prefix/")
    assert split_s3("s3://b") == ("b", "")
    with pytest.raises(DataError, match="no bucket"):
        split_s3("s3:///x")


@pytest.mark.parametrize("suffix", ["", "/"])
def test_fetch_downloads_the_prefix(bucket, tmp_path, suffix):
    messages = []
    out = fetch(f"s3://{bucket}/shapes{suffix}", tmp_path / "raw", log=messages.append)
    assert out == tmp_path / "raw"
    assert tree(out) == FILES
    assert "3 files" in messages[0]


def test_fetch_again_downloads_only_what_changed(bucket, tmp_path):
    fetch(f"s3://{bucket}/shapes", tmp_path, log=lambda m: None)
    (tmp_path / "images" / "a.png").write_bytes(b"truncated")
    (tmp_path / "dataset.json").unlink()
    messages = []
    fetch(f"s3://{bucket}/shapes", tmp_path, log=messages.append)
    assert messages[-1] == f"fetched 2 files from s3://{bucket}/shapes"
    assert tree(tmp_path) == FILES


def test_local_path_is_used_in_place(tmp_path):
    (tmp_path / "data").mkdir()
    assert fetch(str(tmp_path / "data"), tmp_path / "unused") == tmp_path / "data"
    assert fetch(f"file://{tmp_path}/data", tmp_path / "unused") == tmp_path / "data"
    assert not (tmp_path / "unused").exists()
    with pytest.raises(DataError, match="data directory not found"):
        fetch(str(tmp_path / "missing"), tmp_path / "unused")


def test_missing_bucket_is_a_clear_error(bucket, tmp_path):
    with pytest.raises(DataError, match="bucket 'no-such-bucket' does not exist"):
        fetch("s3://no-such-bucket/shapes", tmp_path)


def test_empty_prefix_is_a_clear_error(bucket, tmp_path):
    with pytest.raises(DataError, match="no objects under this prefix"):
        fetch(f"s3://{bucket}/flickr30k", tmp_path)


def test_unreachable_endpoint_fails_after_bounded_retries(s3_env, monkeypatch, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    start = time.monotonic()
    with pytest.raises(ImtextError, match=f"endpoint {dead}.*after 2 attempts") as info:
        fetch("s3://bucket/shapes", tmp_path, retries=2)
    assert time.monotonic() - start < 30
    assert "AWS_ENDPOINT_URL" in str(info.value)


@pytest.mark.parametrize("relative", ["/{tmp}/escaped", "images/../../escaped"])
def test_a_key_leading_out_of_the_destination_fails_with_nothing_written(
    bucket, tmp_path, relative
):
    # "shapes//abs/path" joined the absolute path /abs/path to the destination.
    key = "shapes/" + relative.format(tmp=str(tmp_path).strip("/"))
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"hostile")
    with pytest.raises(DataError, match="object key does not name a file inside") as info:
        fetch(f"s3://{bucket}/shapes", tmp_path / "raw" / "data", log=lambda m: None)
    assert key in str(info.value)
    assert tree(tmp_path) == {}


def test_a_key_that_is_also_a_folder_is_a_clear_error(bucket, tmp_path):
    boto3.client("s3").put_object(Bucket=bucket, Key="shapes/images/a.png/x", Body=b"clash")
    with pytest.raises(DataError, match=r"shapes/images/a\.png.*: cannot be written to"):
        fetch(f"s3://{bucket}/shapes", tmp_path, log=lambda m: None)
