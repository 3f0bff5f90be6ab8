"""Opening untrusted images: bounded pixel counts, reduced-size decoding, paths kept inside."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from PIL import Image

from imtext.data.images import MAX_PIXELS, open_rgb, path_inside, reduced_request
from imtext.errors import DataError

#: Prints how many MB the peak memory of a fresh process grew while it prepared one image.
PEAK_GROWTH = """
import resource, sys
from imtext.data.prepare import encode_image
from imtext.errors import DataError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    encode_image(sys.argv[1], 256, "png")
except DataError as exc:
    print(exc, file=sys.stderr)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def peak_growth_mb(path) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-c", PEAK_GROWTH, str(path)], capture_output=True, text=True, check=True
    )
    return int(done.stdout), done.stderr


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A real 10000 x 10000 PNG of 1-bit pixels: a few kB on disk, 300 MB decoded as RGB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(path)
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_huge_png_is_refused_from_its_header_without_decoding(bomb):
    with pytest.raises(DataError, match=r"bomb\.png: image of 10000 x 10000 pixels is too large"):
        open_rgb(bomb, short_side=256)
    growth, error = peak_growth_mb(bomb)
    assert "100,000,000 pixels, more than the 25,000,000" in error
    assert growth < 40, f"peak memory grew by {growth} MB"


def test_a_large_jpeg_is_decoded_at_reduced_size(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("L", (8000, 6000), 90).save(path, quality=90)  # 48 MP: over the limit at full size
    image = open_rgb(path, short_side=256)
    assert image.mode == "RGB" and image.size == (500, 375)  # decoded at 1/8, then halved
    growth, error = peak_growth_mb(path)
    assert error == "" and growth < 40, f"peak memory grew by {growth} MB"
    with pytest.raises(DataError, match="too large"):
        open_rgb(path)  # without a target size it would be decoded whole


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "RGB"])
def test_large_images_are_box_reduced_to_at_least_the_short_side(mode):
    buffer = io.BytesIO()
    Image.new(mode, (1200, 900)).save(buffer, format="PNG")
    buffer.seek(0)
    image = open_rgb(buffer, short_side=256, name="upload")
    assert image.mode == "RGB" and image.size == (400, 300)  # 900 // 256 = 3


def test_reduced_request_keeps_the_shorter_side():
    assert reduced_request((8000, 6000), 256) == (342, 256)
    assert reduced_request((100, 50), 256) == (100, 50)


def test_the_limit_is_a_parameter_and_errors_name_the_source(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (100, 100)).save(path)
    assert open_rgb(path, max_pixels=10_000).size == (100, 100)
    with pytest.raises(DataError, match=r"upload\\n: image of 100 x 100 pixels is too large"):
        open_rgb(path, max_pixels=9_999, name="upload\n")
    assert MAX_PIXELS < Image.MAX_IMAGE_PIXELS  # stricter than Pillow, which only warns there


def test_path_inside(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    (images / "in.png").write_bytes(b"x")
    (images / "link-in.png").symlink_to(images / "in.png")
    (images / "link-out.png").symlink_to(tmp_path / "secret.png")
    (images / "dangling-out.png").symlink_to(tmp_path / "no-such-file")
    assert path_inside(images, "in.png") == images / "in.png"
    assert path_inside(images, "sub/../in.png") == images / "in.png"
    assert path_inside(images, "link-in.png") == images / "in.png"
    assert path_inside(images, "missing.png") == images / "missing.png"
    for relpath in (
        "../secret.png", "../no-such-file", str(tmp_path / "secret.png"), "link-out.png",
        "dangling-out.png", "sub/../../secret.png", "missing/../../secret.png", ".", "",
    ):  # fmt: skip
        assert path_inside(images, relpath) is None, relpath
