"""The prepared-data format: per split one image blob and one array file, plus the vocabulary.

``{split}-images.bin`` holds the encoded images back to back; ``{split}.npz`` holds their byte
offsets and every per-image and per-caption array. A few large files stream and version far better
than one file per image, and the blob is memory-mapped so DataLoader workers share the page cache.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from imtext.data.text import Vocabulary
from imtext.errors import DataError

VOCAB_FILE = "vocab.json"
META_FILE = "meta.json"


def images_file(split: str) -> str:
    return f"{split}-images.bin"


def arrays_file(split: str) -> str:
    return f"{split}.npz"


class ImageBlobWriter:
    """Appends encoded images to ``{split}-images.bin`` files as they are produced, so that
    preparing a large dataset never holds its images in memory; remembers each split's offsets."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self._files: dict[str, BinaryIO] = {}
        self._offsets: dict[str, list[int]] = {}

    def append(self, split: str, encoded: bytes) -> None:
        if split not in self._files:
            self._files[split] = open(self.out_dir / images_file(split), "wb")
            self._offsets[split] = [0]
        self._files[split].write(encoded)
        self._offsets[split].append(self._offsets[split][-1] + len(encoded))

    def offsets(self, split: str) -> np.ndarray:
        """int64 (n + 1,): image ``i`` of ``split`` is bytes ``[offsets[i], offsets[i + 1])``."""
        return np.array(self._offsets.get(split, [0]), dtype=np.int64)

    def close(self) -> None:
        for file in self._files.values():
            file.close()

    def __enter__(self) -> ImageBlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_split_arrays(
    out_dir: Path, split: str, image_offsets: np.ndarray, arrays: dict[str, np.ndarray]
) -> None:
    """Write ``{split}.npz``; an empty split also gets its (empty) image file."""
    if len(image_offsets) == 1:
        (out_dir / images_file(split)).touch()
    np.savez_compressed(out_dir / arrays_file(split), image_offsets=image_offsets, **arrays)


@dataclass
class PreparedSplit:
    """One split of prepared data.

    Arrays (n images, m captions, L = max_len):
    ``tokens`` int32 (m, L) left-aligned word ids, 0 = padding; ``lengths`` int32 (m,);
    ``caption_image`` int64 (m,) row of the caption's image; ``image_labels`` int64 (n,) instance
    label (the image's row, or its person identity for CUHK-PEDES, densely renumbered);
    ``filenames`` str (n,); ``captions`` str (m,) the cleaned raw captions.
    """

    directory: Path
    split: str
    tokens: np.ndarray
    lengths: np.ndarray
    caption_image: np.ndarray
    image_labels: np.ndarray
    image_offsets: np.ndarray
    filenames: np.ndarray
    captions: np.ndarray
    _blob: np.memmap | None = None

    @classmethod
    def load(cls, directory: Path, split: str) -> PreparedSplit:
        directory = Path(directory)
        path = directory / arrays_file(split)
        if not path.exists():
            raise DataError(f"{path}: prepared split not found; run `imtext prepare` first")
        with np.load(path, allow_pickle=False) as arrays:
            fields = {name: arrays[name] for name in arrays.files}
        return cls(directory=directory, split=split, **fields)

    @property
    def n_images(self) -> int:
        return len(self.image_offsets) - 1

    @property
    def n_captions(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def caption_labels(self) -> np.ndarray:
        """Instance label of each caption (int64 (m,))."""
        return self.image_labels[self.caption_image]

    def captions_of_image(self) -> list[np.ndarray]:
        """For each image row, the indices of its captions."""
        order = np.argsort(self.caption_image, kind="stable")
        bounds = np.searchsorted(self.caption_image[order], np.arange(self.n_images + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(self.n_images)]

    def image_bytes(self, row: int) -> bytes:
        if self._blob is None:
            # Opened lazily so that each DataLoader worker maps the file itself.
            self._blob = np.memmap(self.directory / images_file(self.split), mode="r")
        return self._blob[self.image_offsets[row] : self.image_offsets[row + 1]].tobytes()

    def image(self, row: int) -> Image.Image:
        return Image.open(io.BytesIO(self.image_bytes(row))).convert("RGB")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_blob": None}


def read_vocabulary(directory: Path) -> Vocabulary:
    path = Path(directory) / VOCAB_FILE
    if not path.exists():
        raise DataError(f"{path}: vocabulary not found; run `imtext prepare` first")
    return Vocabulary.from_json(path)


def read_meta(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text(encoding="utf-8"))
