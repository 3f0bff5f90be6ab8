"""The served model's image decoding: pixel count checked before decoding, large images decoded at
reduced size, and every failure sent to the client as a message, never a stack trace.

``served`` is the real pyfunc (saved and loaded by MLflow) of the unit tests' stand-in export;
``invoke`` goes through MLflow's scoring-server request handler, the code ``mlflow models serve``
runs per request.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from PIL import Image

from imtext.export.runtime import MAX_IMAGE_PIXELS, InputError, OnnxEncoders, open_image
from imtext.registry.pyfunc import save_encoders_model
from tests.unit.test_registry import IMAGE_SIZE, png_bytes, write_onnx_encoders


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def blank_1bit_png(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit PNG: kilobytes on the wire, ``width x height`` pixels decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND", b"")
    )


def noise_file(width: int, height: int, fmt: str) -> bytes:
    rng = np.random.default_rng(1)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_onnx_encoders(tmp_path_factory.mktemp("pyfunc") / "export")


@pytest.fixture(scope="module")
def served(export, tmp_path_factory):
    import mlflow.pyfunc

    path = tmp_path_factory.mktemp("pyfunc") / "model"
    save_encoders_model(export, path, Model())
    return mlflow.pyfunc.load_model(str(path))


def invoke(model, images: list[bytes]) -> tuple[int, str]:
    """What a client of ``mlflow models serve`` receives: (HTTP status, body)."""
    from mlflow.pyfunc.scoring_server import invocations

    body = json.dumps(
        {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(b).decode()] for b in images],
            }
        }
    )
    try:
        response = invocations(body, "application/json", model, model.metadata.get_input_schema())
    except MlflowException as exc:
        return exc.get_http_status_code(), exc.serialize_as_json()
    return response.status, response.response


def test_a_decompression_bomb_is_a_message_not_a_stack_trace(served):
    bomb = blank_1bit_png(20000, 20000)  # 400 million pixels: Pillow's own bomb limit
    assert len(bomb) < 100_000
    status, body = invoke(served, [png_bytes((1, 2, 3)), bomb])
    assert status == 400
    assert "image row 1: more than 40,000,000 pixels" in body
    assert "Traceback" not in body and "stack_trace" not in body


def test_pixels_are_counted_from_the_header_before_decoding(served):
    # 144 million pixels in 18 KB: under Pillow's bomb limit, 432 MB once decoded as RGB.
    large = blank_1bit_png(12000, 12000)
    status, body = invoke(served, [large])
    assert status == 400
    assert f"image row 0: 12000 x 12000 pixels is more than the {MAX_IMAGE_PIXELS:,}" in body
    assert "Traceback" not in body and "stack_trace" not in body
    with pytest.raises(InputError, match="12000 x 12000 pixels"):
        open_image(large, IMAGE_SIZE)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_images_are_decoded_at_reduced_size(fmt, export):
    data = noise_file(1600, 1200, fmt)
    image = open_image(data, IMAGE_SIZE)
    assert image.mode == "RGB"
    # Shorter side at least 2 x the encoder's input, and far below the file's 1200.
    assert 2 * IMAGE_SIZE <= min(image.size) < 4 * IMAGE_SIZE
    assert image.size[0] > image.size[1]
    # The reduced decode keeps the picture: the encoder's input nearly equals the full decode's.
    encoders = OnnxEncoders.load(export)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    reduced, exact = encoders.image_array([image]), encoders.image_array([full])
    assert np.abs(reduced - exact).mean() < 0.05


def test_small_images_decode_exactly_as_before():
    data = png_bytes((10, 200, 30), (40, 30))
    image = open_image(data, IMAGE_SIZE)
    assert image.size == (40, 30)
    assert np.array_equal(
        np.asarray(image), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    )


def test_bad_files_and_other_formats_are_one_line_messages(served):
    png = noise_file(40, 30, "PNG")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    for data, reason in (
        (png[: len(png) // 2], "image row 0: a PNG file that cannot be decoded"),
        (gif.getvalue(), "image row 0: not a PNG or JPEG file"),
        (b"\x00" * 10, "image row 0: not a PNG or JPEG file"),
    ):
        status, body = invoke(served, [data])
        assert status == 400 and reason in body, body
        assert "Traceback" not in body and "stack_trace" not in body


def test_an_unexpected_failure_inside_the_model_is_a_message(served, monkeypatch):
    encoders = served.unwrap_python_model().encoders

    def broken(*args, **kwargs):
        raise RuntimeError("something deep inside")

    monkeypatch.setattr(encoders, "embed_images", broken)
    status, body = invoke(served, [png_bytes((1, 2, 3))])
    assert status == 500
    assert "the model failed on this request (RuntimeError)" in body
    assert "Traceback" not in body and "stack_trace" not in body
    assert "something deep inside" not in body
    frame = pd.DataFrame({"text": ["a red square"]})
    assert served.predict(frame).shape == (1, 8)  # other requests still work
