"""Readers for Karpathy JSON (Flickr30k, COCO, Flickr8k, shapes) and CUHK-PEDES ``reid_raw.json``.

Both return the same :class:`ImageRecord` list, in file order. Structural problems (not JSON, not
UTF-8, wrong top-level shape, a record without a required field, an unknown split, a duplicate image
id) always stop the run: no later step can be trusted. Content problems in one record (an empty
caption, an image left with no captions) stop it too unless ``skip_bad`` is set, in which case the
record or caption is dropped and the reason handed to ``report``. A caption of punctuation alone
counts as empty: it would encode to nothing but padding.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from imtext.data.text import tokenize
from imtext.errors import DataError, printable

Format = Literal["karpathy", "cuhk-pedes"]
FORMATS: tuple[str, ...] = ("karpathy", "cuhk-pedes")
SPLITS = ("train", "val", "test")
KARPATHY_SPLITS = (*SPLITS, "restval")
SKIP_HINT = "or pass --skip-bad to leave it out"


def refuse_or_skip(problem: str, fix: str, skip_bad: bool, report: Callable[[str], None]) -> None:
    """Stop the run on a bad record (:class:`DataError`: the problem, the fix and the
    ``--skip-bad`` hint), or with ``skip_bad`` hand ``report`` the problem and the fix: a record
    that is being left out needs no hint to leave it out."""
    if not skip_bad:
        raise DataError(f"{problem}; {fix} {SKIP_HINT}")
    report(f"{problem}; {fix}")


@dataclass(frozen=True)
class ImageRecord:
    """One image and its captions, as read from an annotation file."""

    #: Where the record is, for messages: "record 12 (imgid 12, 1000268201.jpg)".
    where: str
    #: Image path relative to the images directory.
    relpath: str
    split: str
    captions: tuple[str, ...]
    #: Person identity (CUHK-PEDES); ``None`` where each image is its own instance.
    identity: int | None = None


def load_json(path: Path) -> Any:
    """Parse a JSON annotation file; errors name the file, the position and what to do."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found; check --annotations") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; --annotations takes the JSON file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}, line "
            f"{line}); re-save the annotation file as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        truncated = " (the file looks truncated)" if exc.pos >= len(text.rstrip()) else ""
        raise DataError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}{truncated}; "
            "restore the original annotation file"
        ) from None


def read_annotations(
    path: Path,
    fmt: Format,
    *,
    captions_per_image: int | None,
    use_restval: bool,
    skip_bad: bool,
    report: Callable[[str], None],
) -> list[ImageRecord]:
    """Records of the annotation file at ``path`` in the given format (see module docstring)."""
    data = load_json(path)
    if fmt == "karpathy":
        raw_records = _karpathy_records(data, path, use_restval)
    elif fmt == "cuhk-pedes":
        raw_records = _cuhk_records(data, path)
    else:
        raise DataError(f"--format {fmt!r}: unknown format; use one of {', '.join(FORMATS)}")
    records = []
    for record in raw_records:
        captions = _clean_captions(record, skip_bad, report)
        if captions_per_image is not None:
            captions = captions[:captions_per_image]
        if not captions:
            refuse_or_skip(
                f"{record.where}: the image has no captions", "add captions", skip_bad, report
            )
            continue
        records.append(
            ImageRecord(record.where, record.relpath, record.split, captions, record.identity)
        )
    return records


def _clean_captions(
    record: ImageRecord, skip_bad: bool, report: Callable[[str], None]
) -> tuple[str, ...]:
    kept = []
    for j, caption in enumerate(record.captions):
        if tokenize(caption):
            kept.append(" ".join(caption.split()))
            continue
        what = "is empty" if not caption.strip() else f"has no words ({caption.strip()!r})"
        refuse_or_skip(f"{record.where}: caption {j} {what}", "write the caption", skip_bad, report)
    return tuple(kept)


def _field(entry: dict, name: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    if name not in entry:
        raise DataError(
            f"{path}: {where}: missing field {name!r}; the annotation file is malformed"
        )
    value = entry[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(
            f"{path}: {where}: field {name!r} has type {type(value).__name__}; the annotation "
            "file is malformed"
        )
    return value


def _claim(seen: dict, key: Any, index: int, what: str, where: str, path: Path) -> None:
    """Record that ``key`` belongs to record ``index``; a second claim is a duplicate-image error."""
    if key in seen:
        raise DataError(
            f"{path}: {where}: duplicate {what} (also record {seen[key]}); each image must appear once"
        )
    seen[key] = index


def _split(entry: dict, allowed: tuple[str, ...], where: str, path: Path) -> str:
    split = _field(entry, "split", str, where, path)
    if split not in allowed:
        raise DataError(
            f"{path}: {where}: unknown split {split!r}; expected one of {', '.join(allowed)}"
        )
    return split


def _karpathy_records(data: Any, path: Path, use_restval: bool) -> list[ImageRecord]:
    if isinstance(data, list):
        raise DataError(
            f"{path}: top level is a list, not Karpathy JSON ({{'images': [...]}}); "
            "for reid_raw.json pass --format cuhk-pedes"
        )
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: no 'images' list at the top level; is this Karpathy JSON?")
    records, seen = [], {}
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            raise DataError(
                f"{path}: record {i} is not an object; the annotation file is malformed"
            )
        filename = _field(entry, "filename", str, f"record {i}", path)
        # Any JSON value can stand here; only a number or a string can name an image.
        imgid = _field(entry, "imgid", (int, str), f"record {i}", path) if "imgid" in entry else i
        where = f"record {i} (imgid {printable(str(imgid))}, {printable(filename)})"
        _claim(seen, imgid, i, f"image id {printable(str(imgid))}", where, path)
        split = _split(entry, KARPATHY_SPLITS, where, path)
        if split == "restval":
            if not use_restval:
                continue
            split = "train"
        captions = []
        for j, sentence in enumerate(_field(entry, "sentences", list, where, path)):
            if not isinstance(sentence, dict):
                raise DataError(f"{path}: {where}: sentence {j} is not an object")
            if "raw" in sentence:
                captions.append(_field(sentence, "raw", str, f"{where}, sentence {j}", path))
            else:
                tokens = _field(sentence, "tokens", list, f"{where}, sentence {j}", path)
                captions.append(" ".join(map(str, tokens)))
        filepath = (
            _field(entry, "filepath", str, where, path)
            if entry.get("filepath") is not None
            else None
        )
        relpath = f"{filepath}/{filename}" if filepath else filename
        records.append(ImageRecord(f"{path}: {where}", relpath, split, tuple(captions)))
    return records


def _cuhk_records(data: Any, path: Path) -> list[ImageRecord]:
    if isinstance(data, dict):
        raise DataError(
            f"{path}: top level is an object, not a CUHK-PEDES list; for Karpathy JSON pass "
            "--format karpathy"
        )
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (CUHK-PEDES reid_raw.json)")
    records, seen = [], {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(
                f"{path}: record {i} is not an object; the annotation file is malformed"
            )
        relpath = _field(entry, "file_path", str, f"record {i}", path)
        where = f"record {i} ({printable(relpath)})"
        _claim(seen, relpath, i, f"image {printable(relpath)}", where, path)
        split = _split(entry, SPLITS, where, path)
        identity = _field(entry, "id", int, where, path)
        captions = _field(entry, "captions", list, where, path)
        for j, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise DataError(f"{path}: {where}: caption {j} is not a string")
        records.append(ImageRecord(f"{path}: {where}", relpath, split, tuple(captions), identity))
    return records
