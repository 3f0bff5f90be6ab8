"""Opening image files that came from outside: inside their folder, bounded in size, decoded small.

An annotation file names its images, so whoever writes it chooses what ``prepare`` reads and
decodes: :func:`path_inside` keeps every read inside the image folder, and :func:`open_rgb` never
decodes more than :data:`MAX_PIXELS` pixels and decodes large images at a reduced size. Serving
decodes untrusted uploads and can use :func:`open_rgb` the same way, with a file-like object.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from imtext.errors import DataError, printable

#: Most pixels decoded from one image (after JPEG's reduced-size decoding): 25 MP, e.g. 6100 x 4100,
#: 75 MB as RGB. Pillow's own limit (89 MP only warns, 179 MP fails) lets a 10000 x 10000 PNG
#: through at half a gigabyte per decoding thread; image-text datasets hold far smaller images.
MAX_PIXELS = 25_000_000


def path_inside(folder: Path, relpath: str) -> Path | None:
    """The file ``relpath`` names below ``folder``, with symbolic links resolved; ``None`` when it
    is anywhere else (``..``, an absolute path, or a link leading out).

    The answer depends only on the path and the links along it, never on whether the file it
    leads to exists, so a refusal says nothing about files outside ``folder``.
    """
    root = Path(folder).resolve()
    path = (root / relpath).resolve()
    return path if path != root and path.is_relative_to(root) else None


def reduced_request(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """The smallest size of the image's shape whose shorter side is at least ``short_side``
    (the size itself when it is not larger)."""
    width, height = size
    scale = min(1.0, short_side / min(width, height))
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def open_rgb(
    source: Path | BinaryIO,
    *,
    short_side: int | None = None,
    max_pixels: int = MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode the image ``source`` (a path or a binary file object) to an RGB image.

    The pixel count to decode is checked from the header before anything is decoded. With
    ``short_side``,
    the image is decoded and box-reduced to the smallest size whose shorter side is still at least
    ``short_side`` (JPEG decodes at 1/2, 1/4 or 1/8 scale directly), so a caller resizes the
    result to its exact size. Raises :class:`DataError` naming ``name`` (default: the path) when
    the file is missing, not an image, truncated or too large.
    """
    shown = printable(str(name if name is not None else source))
    try:
        with Image.open(source) as image:
            stored = image.size
            if short_side is not None:  # only sets up JPEG's scaled decoding; decodes nothing
                image.draft("RGB", reduced_request(image.size, short_side))
            _check_pixels(stored, image.size, max_pixels, shown)
            image.load()  # a truncated file fails here, not later in training
            return _reduce(image, short_side).convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{shown}: image file not found") from None
    except UnidentifiedImageError:
        raise DataError(
            f"{shown}: image cannot be decoded (not an image format Pillow reads)"
        ) from None
    except Image.DecompressionBombError:
        # Pillow's own limit, above MAX_PIXELS: a caller's larger max_pixels cannot pass it.
        raise DataError(
            f"{shown}: image is larger than Pillow decodes ({2 * Image.MAX_IMAGE_PIXELS:,} "
            "pixels); downscale it"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{shown}: image cannot be decoded ({printable(str(exc))})") from None


def _check_pixels(
    stored: tuple[int, int], decoded: tuple[int, int], max_pixels: int, shown: str
) -> None:
    """Refuse an image whose decoding (at size ``decoded``) would exceed ``max_pixels``."""
    pixels = decoded[0] * decoded[1]
    if pixels > max_pixels:
        raise DataError(
            f"{shown}: image of {stored[0]} x {stored[1]} pixels is too large: decoding it takes "
            f"{pixels:,} pixels, more than the {max_pixels:,} imtext decodes; downscale it"
        )


def _reduce(image: Image.Image, short_side: int | None) -> Image.Image:
    """``image`` box-reduced by the largest integer factor that keeps its shorter side at least
    ``short_side``, in a mode no wider than needed (reduce cannot work on 1-bit or palette)."""
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    factor = min(image.size) // short_side if short_side else 1
    return image.reduce(factor) if factor >= 2 else image
