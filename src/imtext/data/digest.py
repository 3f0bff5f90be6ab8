"""A content digest of a data location: what changes exactly when the data does.

:func:`data_digest` names the data a run used, for caching (KFP keys ``prepare`` on it) and for
lineage (the digest recorded with a model version):

- a local directory: DVC's directory hash, the ``md5`` of the sorted ``{"md5", "relpath"}`` list
  with ``.dir`` appended (what ``dvc add`` writes into ``data.dvc``); reads every file.
- a local file: its ``md5``.
- ``s3://bucket/prefix``: the ``md5`` of the sorted ``{"etag", "key", "size"}`` listing, keys
  relative to the prefix, ``.s3`` appended; one listing, no object is read.

An ETag is the MD5 of a single-part upload and a hash of the part hashes of a multipart one, so
a rewritten object changes the digest even when its size does not. The two kinds never compare
equal (``.dir`` and ``.s3`` suffixes): the same files listed in a bucket and hashed on a disk
are different digests, and the URI is recorded next to the digest anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from imtext._fs import MARKER
from imtext.data.remote import FILE_SCHEME, _client, _s3_errors, is_s3, split_s3
from imtext.errors import DataError

CHUNK = 1 << 20
DIR_SUFFIX = ".dir"
S3_SUFFIX = ".s3"


def data_digest(uri: str | Path, *, retries: int = 4) -> str:
    """The content digest of ``uri``: a local directory or file, or ``s3://bucket/prefix``
    (boto3 finds the endpoint and credentials in the environment, as
    :func:`~imtext.data.remote.fetch` does). Raises :class:`DataError` naming ``uri`` when
    there is nothing there."""
    uri = str(uri)
    if is_s3(uri):
        return s3_listing_digest(uri, retries=retries)
    path = Path(uri.removeprefix(FILE_SCHEME))
    if path.is_dir():
        return directory_digest(path)
    if path.is_file():
        return file_md5(path)
    raise DataError(f"{uri}: no such file or directory; pass a local path or s3://bucket/prefix")


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def listing_digest(entries: list[dict[str, object]], suffix: str) -> str:
    """``md5`` of the entries as DVC serialises a directory (sorted by path, keys sorted)."""
    text = json.dumps(entries, sort_keys=True)
    return hashlib.md5(text.encode("utf-8")).hexdigest() + suffix


def directory_digest(root: Path) -> str:
    """DVC's hash of the directory ``root`` (``dvc add`` writes the same value into ``.dvc``):
    every regular file below it, symbolic links to directories not followed, and not the marker
    imtext writes into its outputs (the repository's .dvcignore leaves it out too)."""
    entries = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name == MARKER:
                continue
            path = Path(folder) / name
            if path.is_file():
                relpath = path.relative_to(root).as_posix()
                entries.append({"md5": file_md5(path), "relpath": relpath})
    if not entries:
        raise DataError(f"{root}: empty directory; there is no data to digest")
    return listing_digest(sorted(entries, key=lambda e: e["relpath"]), DIR_SUFFIX)


def s3_listing_entries(objects: list[dict], prefix: str) -> list[dict[str, object]]:
    """``list_objects_v2`` items -> digest entries: keys relative to ``prefix``, folder markers
    left out, sorted by key."""
    entries = [
        {
            "etag": str(item["ETag"]).strip('"'),
            "key": item["Key"][len(prefix) :],
            "size": int(item["Size"]),
        }
        for item in objects
        if not item["Key"].endswith("/")
    ]
    return sorted(entries, key=lambda e: e["key"])


def s3_listing_digest(uri: str, *, retries: int = 4) -> str:
    """The digest of every object's key, size and ETag under ``s3://bucket/prefix``."""
    bucket, prefix = split_s3(uri)
    client = _client(retries)
    with _s3_errors(uri, bucket, client.meta.endpoint_url, retries):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objects = [item for page in pages for item in page.get("Contents", [])]
    entries = s3_listing_entries(objects, prefix)
    if not entries:
        raise DataError(
            f"{uri}: no objects under this prefix at {client.meta.endpoint_url}; check the data "
            f"location (upload a dataset with `aws s3 sync DIR {uri}`)"
        )
    return listing_digest(entries, S3_SUFFIX)
