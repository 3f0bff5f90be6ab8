"""The prepared-data format: per split one image blob and one array file, plus the vocabulary.

``{split}-images.bin`` holds the encoded images back to back; ``{split}.npz`` holds their byte
offsets and every per-image and per-caption array. A few large files stream and version far better
than one file per image, and the blob is memory-mapped so DataLoader workers share the page cache.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def write_split(
    out_dir: Path, split: str, images: Sequence[bytes], arrays: dict[str, np.ndarray]
) -> None:
    """Write one split: ``images`` (encoded bytes, in row order) and its arrays."""
    offsets = np.zeros(len(images) + 1, dtype=np.int64)
    with open(out_dir / images_file(split), "wb") as blob:
        for i, encoded in enumerate(images):
            blob.write(encoded)
            offsets[i + 1] = offsets[i] + len(encoded)
    np.savez_compressed(out_dir / arrays_file(split), image_offsets=offsets, **arrays)


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

    @property
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
