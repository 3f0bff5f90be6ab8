"""Fetch a data location, a local directory or ``s3://bucket/prefix``, into a local directory.

Pipeline steps run in containers that see the raw data only through object storage, while a
workstation run points at a local directory; :func:`fetch` turns either into a local directory.

boto3 finds everything else where it always does: the endpoint of MinIO or another S3-compatible
store in ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), credentials in ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY`` (or a profile, or the pod's role). Each request is retried a bounded number
of times with exponential backoff; what still fails becomes one :class:`ImtextError` that names the
location and says what to check.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from imtext.errors import DataError, ImtextError, printable
from imtext.logs import MessageLog

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"


def is_s3(location: str) -> bool:
    """Whether ``location`` names object storage (``s3://bucket/prefix``) rather than a path."""
    return location.startswith(S3_SCHEME)


def split_s3(location: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix/")`` (prefix empty or ending in /)."""
    bucket, _, prefix = location[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise DataError(f"{location}: no bucket name; expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def fetch(
    location: str | Path,
    dest: Path,
    *,
    retries: int = 4,
    workers: int = 8,
    log: MessageLog = print,
) -> Path:
    """A local directory holding the data at ``location``.

    A local path (or ``file://`` URL) is checked and returned as it is: nothing is copied and
    ``dest`` is not used. ``s3://bucket/prefix`` is downloaded into ``dest``, every object under the
    prefix to its path relative to the prefix, with ``workers`` parallel downloads; files already
    in ``dest`` with the object's size are kept, so a rerun fetches only what is missing. Returns
    the directory to read (``dest`` for object storage).
    """
    location = str(location)
    if not is_s3(location):
        path = Path(location.removeprefix(FILE_SCHEME))
        if not path.is_dir():
            raise DataError(
                f"{location}: data directory not found; pass a local directory or s3://bucket/prefix"
            )
        return path
    return _fetch_s3(location, Path(dest), retries=retries, workers=workers, log=log)


def _client(retries: int):
    import boto3
    from botocore.config import Config

    if retries < 1:
        raise ValueError(f"retries must be at least 1, got {retries}")
    # "standard" retries connection errors, throttling and 5xx with exponential backoff and jitter;
    # short connect timeouts keep an unreachable endpoint from hanging a pipeline step for minutes.
    config = Config(
        retries={"total_max_attempts": retries, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.client("s3", config=config)


def _fetch_s3(location: str, dest: Path, *, retries: int, workers: int, log: MessageLog) -> Path:
    bucket, prefix = split_s3(location)
    client = _client(retries)
    endpoint = client.meta.endpoint_url
    with _s3_errors(location, bucket, endpoint, retries):
        objects = _list_objects(client, bucket, prefix)
    if not objects:
        raise DataError(
            f"{location}: no objects under this prefix at {endpoint}; check the data location "
            f"(upload a dataset with `aws s3 sync DIR {location}`)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    # Every key is mapped and checked before the first download: a hostile key fails the fetch
    # with nothing written.
    targets = [(key, size, local_path(dest, bucket, prefix, key)) for key, size in objects]
    todo = []
    for key, size, target in targets:
        if not target.is_file() or target.stat().st_size != size:
            todo.append((key, target))
    total = sum(size for _, size in objects)
    log(
        f"fetching {location} ({len(objects)} files, {total / 1e6:.1f} MB; "
        f"{len(objects) - len(todo)} already present) -> {dest}"
    )

    def download(item: tuple[str, Path]) -> None:
        key, target = item
        part = target.with_name(f".{target.name}.part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(part))
            os.replace(part, target)
        except OSError as exc:  # e.g. keys "a" and "a/b": one path cannot be a file and a folder
            raise DataError(
                f"{printable(f's3://{bucket}/{key}')}: cannot be written to {target} "
                f"({exc.strerror or exc}); rename the object or free the path"
            ) from None

    with _s3_errors(location, bucket, endpoint, retries), ThreadPoolExecutor(workers) as pool:
        for done, _ in enumerate(pool.map(download, todo), start=1):
            if done % 1000 == 0:
                log(f"fetched {done}/{len(todo)} files")
    log(f"fetched {len(todo)} files from {location}")
    return dest


def key_problem(relative_key: str) -> str | None:
    """Why an object key, relative to the fetched prefix, names no file below the destination;
    ``None`` when it is a plain relative path.

    S3 keys are arbitrary strings: ``a//b`` joins to the absolute path ``/b``, ``..`` climbs out,
    and ``.`` or a NUL cannot be a file name, so only non-empty segments other than these pass.
    """
    if not relative_key:
        return "it is the prefix itself"
    if "\0" in relative_key:
        return "it holds a NUL character"
    if relative_key.startswith("/"):
        return "it would be an absolute path"
    segments = relative_key.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return "it has an empty, '.' or '..' path segment"
    return None


def local_path(dest: Path, bucket: str, prefix: str, key: str) -> Path:
    """Where the object ``key`` (under ``prefix``) goes below ``dest``.

    Raises :class:`DataError` naming the key when it would land anywhere else, through its own
    segments or through a symbolic link already in ``dest``.
    """
    relative_key = key[len(prefix) :]
    problem = key_problem(relative_key)
    target = dest.joinpath(*relative_key.split("/"))
    if problem is None and not target.resolve().is_relative_to(dest.resolve()):
        problem = "a symbolic link in the destination leads out of it"
    if problem is not None:
        shown = printable(f"s3://{bucket}/{key}")
        raise DataError(
            f"{shown}: object key does not name a file inside {dest} ({problem}); rename the "
            "object or fetch another prefix"
        )
    return target


def _list_objects(client, bucket: str, prefix: str) -> list[tuple[str, int]]:
    """``(key, size)`` of every object under ``prefix``, folder markers left out."""
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key.endswith("/"):
                continue
            objects.append((key, int(item["Size"])))
    return objects


@contextmanager
def _s3_errors(location: str, bucket: str, endpoint: str, retries: int) -> Iterator[None]:
    """Turn boto3's exceptions into one-line :class:`ImtextError` messages that say what to check."""
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, NoCredentialsError

    where = f"{location} (endpoint {endpoint})"
    try:
        yield
    except NoCredentialsError as exc:
        raise ImtextError(
            f"{where}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(in Kubeflow: the imtext-credentials secret)"
        ) from exc
    except ConnectionError as exc:
        raise ImtextError(
            f"{where}: cannot reach the S3 endpoint after {retries} attempts ({exc}); "
            "check AWS_ENDPOINT_URL and the network"
        ) from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise DataError(
                f"{where}: bucket {bucket!r} does not exist; check the data location"
            ) from exc
        if code in ("NoSuchKey", "404"):
            raise DataError(f"{where}: an object vanished while fetching ({exc})") from exc
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise ImtextError(
                f"{where}: access denied ({code}); check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY and the bucket policy"
            ) from exc
        raise ImtextError(f"{where}: S3 request failed ({code}: {exc})") from exc
    except BotoCoreError as exc:
        raise ImtextError(f"{where}: S3 request failed ({exc})") from exc
