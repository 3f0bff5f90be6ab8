"""The committed DVC remote works as documented: a fresh checkout's .dvc/config plus one per-user
setting (`dvc remote modify --local storage endpointurl ...`) pushes to and pulls from an
S3-compatible store; here the moto server on 127.0.0.1 stands in for MinIO."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
from botocore.exceptions import ClientError

from tests.conftest import REPO

DVC = Path(sys.executable).parent / "dvc"


def committed_remote() -> tuple[str, dict[str, str]]:
    """(default remote name, its settings) as .dvc/config in git has them."""
    config = configparser.ConfigParser()
    config.read_string((REPO / ".dvc" / "config").read_text())
    name = config["core"]["remote"]
    return name, dict(config[f"'remote \"{name}\"'"])


def dvc(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        [str(DVC), *args], cwd=cwd, env=os.environ, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_committed_remote_names_only_bucket_and_prefix():
    name, settings = committed_remote()
    assert name == "storage"
    assert settings["url"].startswith("s3://imtext-data/")  # the bucket k8s/ creates
    # Endpoint and credentials are per user (.dvc/config.local or the environment).
    assert set(settings) == {"url"}, f"per-user settings committed: {sorted(settings)}"
    assert "/config.local" in (REPO / ".dvc" / ".gitignore").read_text().splitlines()


def test_fresh_checkout_pushes_and_pulls_through_the_committed_remote(
    tmp_path, s3_endpoint, s3_env
):
    name, settings = committed_remote()
    bucket, _, prefix = settings["url"].removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    try:
        s3.create_bucket(Bucket=bucket)
    except ClientError as error:  # another test of the session made it
        if error.response["Error"]["Code"] not in {
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        }:
            raise

    def keys() -> set[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {obj["Key"] for page in pages for obj in page.get("Contents", [])}

    # A checkout: the repository's own DVC config, then the one per-user setting. (Without git
    # here, `core.no_scm` goes to the local config, beside the endpoint.)
    repo = tmp_path / "checkout"
    repo.mkdir()
    dvc("init", "--no-scm", "-q", cwd=repo)
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    dvc("config", "--local", "core.no_scm", "true", cwd=repo)
    dvc("remote", "modify", "--local", name, "endpointurl", s3_endpoint, cwd=repo)
    assert s3_endpoint not in (repo / ".dvc" / "config").read_text()

    files = {
        Path("data/small/dataset.json"): b'{"images": []}\n',
        Path("data/small/images/a.bin"): os.urandom(4096),  # unique: new objects every run
        Path("data/small/images/b.bin"): bytes(range(256)) * 8,
    }
    for path, content in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(content)
    dvc("add", "-q", "data/small", cwd=repo)

    before = keys()
    dvc("push", "-q", cwd=repo)
    pushed = keys() - before
    assert pushed and all(key.startswith(f"{prefix}/files/md5/") for key in pushed), pushed
    assert len(pushed) >= 2  # a.bin (random) and the directory listing are new for sure

    shutil.rmtree(repo / "data" / "small")
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc("pull", "-q", cwd=repo)
    for path, content in files.items():
        assert (repo / path).read_bytes() == content, path
    assert "in sync" in dvc("status", "--cloud", cwd=repo)
