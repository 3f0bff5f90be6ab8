"""What data a model was trained on: its location and a digest of its content.

The digest is the md5 of the data's listing, one ``relative key, size, md5`` line per file in key
order. On S3 the md5 is the object's ETag (the md5 of its bytes for a single-part upload), read from
the listing alone, so describing a bucket prefix downloads nothing; a local directory hashes its
files. A directory and its single-part upload therefore have the same digest, and any added,
removed, renamed or changed file changes it. A local directory that DVC tracks also gets the md5
DVC recorded for it (``dvc.lock`` or a ``.dvc`` file of the enclosing DVC project), the hash
``dvc status`` compares against.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from imtext.data.remote import FILE_SCHEME, is_s3, split_s3
from imtext.errors import DataError

#: Written by the pipeline's prepare step next to the prepared data.
SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class DataSource:
    """Where the raw data is and what it holds."""

    uri: str
    #: md5 of the listing (module docstring): 32 hex digits.
    digest: str
    files: int
    bytes: int
    #: DVC's md5 of a DVC-tracked directory (``<md5>.dir``), else ``None``.
    dvc_md5: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def listing_digest(entries: Iterable[tuple[str, int, str]]) -> str:
    """md5 of ``(relative key, size, md5)`` entries, in key order."""
    digest = hashlib.md5(usedforsecurity=False)
    for key, size, md5 in sorted(entries):
        digest.update(f"{key}\t{size}\t{md5}\n".encode())
    return digest.hexdigest()


def describe(location: str, *, retries: int = 4) -> DataSource:
    """The :class:`DataSource` of a local directory or an ``s3://bucket/prefix``."""
    if is_s3(location):
        entries = s3_listing(location, retries)
    else:
        entries = local_listing(Path(location.removeprefix(FILE_SCHEME)))
    if not entries:
        raise DataError(f"{location}: no files here; check the data location")
    dvc_md5 = None if is_s3(location) else dvc_recorded_md5(Path(location))
    return DataSource(
        uri=location,
        digest=listing_digest(entries),
        files=len(entries),
        bytes=sum(size for _, size, _ in entries),
        dvc_md5=dvc_md5,
    )


def local_listing(root: Path) -> list[tuple[str, int, str]]:
    if not root.is_dir():
        raise DataError(f"{root}: data directory not found")
    entries = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            entries.append((path.relative_to(root).as_posix(), path.stat().st_size, file_md5(path)))
    return entries


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def s3_listing(location: str, retries: int) -> list[tuple[str, int, str]]:
    """``(key relative to the prefix, size, ETag)`` of every object under ``location``."""
    from imtext.data.remote import _client, _s3_errors

    bucket, prefix = split_s3(location)
    client = _client(retries)
    entries = []
    with _s3_errors(location, bucket, client.meta.endpoint_url, retries):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    key = item["Key"][len(prefix) :].lstrip("/")
                    entries.append((key, int(item["Size"]), item["ETag"].strip('"')))
    return entries


def dvc_recorded_md5(directory: Path) -> str | None:
    """The md5 DVC recorded for ``directory``: a ``dvc.lock`` dependency or output, or a ``.dvc``
    file's output, of the nearest enclosing DVC project (the folder holding ``.dvc/``)."""
    directory = directory.resolve()
    project = next((p for p in (directory, *directory.parents) if (p / ".dvc").is_dir()), None)
    if project is None:
        return None
    records = [project / "dvc.lock", *sorted(project.glob("*.dvc"))]
    for record in records:
        for base, entry in _entries(record):
            if (base / str(entry.get("path", ""))).resolve() == directory and entry.get("md5"):
                return str(entry["md5"])
    return None


def _entries(record: Path) -> list[tuple[Path, dict]]:
    """``(directory paths are relative to, entry)`` of every out or dep that ``record`` lists."""
    if not record.is_file():
        return []
    try:
        meta = yaml.safe_load(record.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return []  # DVC itself reports a broken file; lineage just finds no md5 in it
    if not isinstance(meta, dict):
        return []
    sections = [meta] if record.suffix == ".dvc" else list((meta.get("stages") or {}).values())
    found = []
    for section in sections:
        if isinstance(section, dict):
            for kind in ("outs", "deps"):
                found += [
                    (record.parent, e) for e in section.get(kind) or [] if isinstance(e, dict)
                ]
    return found


def read_source(prepared: Path) -> DataSource | None:
    """The :class:`DataSource` the prepare step recorded in ``prepared``, if it did."""
    path = Path(prepared) / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        return DataSource(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise DataError(f"{path}: not a data source record ({exc}); run prepare again") from None
