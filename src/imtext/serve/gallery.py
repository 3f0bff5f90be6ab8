"""The gallery a service searches: the images and captions of one split of a Karpathy-format
dataset (``dataset.json`` and an ``images/`` folder, as ``imtext data shapes`` writes them).

Every image path is resolved once, here, and must lie inside the images folder: the service later
serves a file only by looking its name up in :attr:`Gallery.paths`, never by joining a name a client
sent onto a folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imtext.data.readers import read_annotations
from imtext.errors import DataError, printable

SPLITS = ("train", "val", "test", "all")


@dataclass(frozen=True, eq=False)
class Gallery:
    """Images (by name: their path relative to the images folder) and their captions."""

    names: tuple[str, ...]
    #: name -> file; empty for a synthetic gallery (benchmarks), whose images cannot be fetched.
    paths: dict[str, Path] = field(repr=False)
    captions: tuple[str, ...]
    #: The image (index into ``names``) of each caption.
    caption_images: np.ndarray = field(repr=False)
    #: sha256 of the names, captions and image bytes: a changed gallery never reuses an old index.
    digest: str
    #: name -> index into ``names``.
    positions: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", {name: i for i, name in enumerate(self.names)})

    def __len__(self) -> int:
        return len(self.names)


def read_gallery(dataset_dir: Path, split: str = "test") -> Gallery:
    """The images of ``split`` (or ``all``) of ``dataset_dir/dataset.json``, files in
    ``dataset_dir/images``; a :class:`DataError` names a record whose file is missing or lies
    outside that folder."""
    dataset_dir = Path(dataset_dir)
    if split not in SPLITS:
        raise DataError(f"gallery split {split!r}: expected one of {', '.join(SPLITS)}")
    annotations, images_dir = dataset_dir / "dataset.json", dataset_dir / "images"
    if not annotations.is_file() or not images_dir.is_dir():
        raise DataError(
            f"{dataset_dir}: expected a Karpathy-format dataset (dataset.json and images/); "
            "render the built-in one with `make data` or pass --gallery DIR"
        )
    records = read_annotations(
        annotations,
        "karpathy",
        captions_per_image=None,
        use_restval=True,
        skip_bad=False,
        report=lambda message: None,
    )
    chosen = [r for r in records if split == "all" or r.split == split]
    if not chosen:
        raise DataError(f"{annotations}: no images in split {split!r}; choose another split")
    root = images_dir.resolve()
    paths: dict[str, Path] = {}
    captions: list[str] = []
    owners: list[int] = []
    for i, record in enumerate(chosen):
        path = (root / record.relpath).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            where = "lies outside" if not path.is_relative_to(root) else "is not a file in"
            raise DataError(
                f"{record.where}: {printable(record.relpath)} {where} {images_dir}; a gallery "
                "serves only files inside its images folder, fix the record"
            )
        paths[record.relpath] = path
        captions.extend(record.captions)
        owners.extend([i] * len(record.captions))
    names = tuple(r.relpath for r in chosen)
    return Gallery(
        names=names,
        paths=paths,
        captions=tuple(captions),
        caption_images=np.asarray(owners, dtype=np.int64),
        digest=gallery_digest(names, captions, owners, [paths[n] for n in names]),
    )


def synthetic_gallery(size: int, recipe: str) -> Gallery:
    """A gallery of ``size`` named images without files or captions, for embeddings made up by a
    benchmark; ``recipe`` names how they were made (seed, settings), and the digest depends on
    ``size`` and ``recipe`` only."""
    names = tuple(f"synthetic/{i:07d}.png" for i in range(size))
    digest = hashlib.sha256(f"synthetic:{size}:{recipe}".encode()).hexdigest()
    return Gallery(names, {}, (), np.zeros(0, np.int64), digest)


def gallery_digest(
    names: tuple[str, ...], captions: list[str], owners: list[int], files: list[Path]
) -> str:
    """sha256 over the gallery's names, captions (with their images) and every file's bytes."""
    digest = hashlib.sha256(json.dumps([names, captions, owners]).encode())
    for path in files:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
