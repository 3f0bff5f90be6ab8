"""Every route of the search service and every bad request, over HTTP against a real uvicorn
server on 127.0.0.1, serving stand-in ONNX encoders (tests/serving.py) through the real ONNX
Runtime client over a four-image gallery."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from imtext.errors import ImtextError
from imtext.export.runtime import OnnxEncoders
from imtext.serve.gallery import read_gallery
from imtext.serve.index import IndexCache
from imtext.serve.model import ExportDirSource
from imtext.serve.service import Service
from tests.serving import (
    get_json,
    raw_get,
    request,
    running,
    serve_config,
    tiny_export,
    tiny_gallery,
)

LIMITS = dict(max_query_chars=50, max_k=20, max_body_bytes=200_000, max_image_pixels=1_000_000)
LIMITS |= dict(max_batch=4, poll_seconds=0.0)


class Served:
    def __init__(self, url: str, root: Path, export: Path) -> None:
        self.url, self.root = url, root
        self.encoders = OnnxEncoders.load(export)
        self.gallery = read_gallery(root / "gallery")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    gallery = read_gallery(tiny_gallery(root / "gallery"))
    export = tiny_export(root / "export")
    cfg = serve_config(**LIMITS)
    service = Service(ExportDirSource(export), gallery, cfg, IndexCache(root / "cache"))
    with running(service, cfg) as url:
        yield Served(url, root, export)


def png(colour=(220, 30, 30), size=(20, 16), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 1).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- routes


def test_health_and_readiness(served):
    assert get_json(served.url + "/healthz") == (200, {"status": "ok"})
    status, body = get_json(served.url + "/readyz")
    assert status == 200
    assert body["model"] == {"name": "export", "version": body["model"]["version"]}
    assert body["model"]["version"].startswith("sha256-")
    assert body["gallery"] == {"images": 4, "captions": 5}
    assert body["index"]["kind"] == "exact" and body["index"]["bytes"] > 0


def test_text_search_ranks_the_gallery_by_the_models_score(served):
    status, body = get_json(served.url + "/api/search?q=" + quote("a red square") + "&k=3")
    assert status == 200 and body["model"]["name"] == "export"
    query = served.encoders.embed_texts(["a red square"])[0]
    images = served.encoders.embed_images(
        [Image.open(served.gallery.paths[name]) for name in served.gallery.names]
    )
    expected = np.argsort(-(images @ query), kind="stable")[:3]
    assert [r["image"] for r in body["results"]] == [served.gallery.names[i] for i in expected]
    assert np.allclose([r["score"] for r in body["results"]], (images @ query)[expected], atol=1e-5)
    assert [r["url"] for r in body["results"]] == ["/images/" + r["image"] for r in body["results"]]


def test_default_k_and_k_larger_than_the_gallery(served):
    _, body = get_json(served.url + "/api/search?q=circle&k=20")
    assert len(body["results"]) == 4


def test_image_search_returns_the_nearest_captions(served):
    status, body = get_json(served.url + "/api/search/image?k=5", data=png((30, 30, 220)))
    assert status == 200 and len(body["results"]) == 5
    image = served.encoders.embed_images([Image.open(io.BytesIO(png((30, 30, 220))))])[0]
    captions = served.encoders.embed_texts(list(served.gallery.captions))
    order = np.argsort(-(captions @ image), kind="stable")
    assert [r["caption"] for r in body["results"]] == [served.gallery.captions[i] for i in order]
    owners = served.gallery.caption_images
    assert [r["image"] for r in body["results"]] == [served.gallery.names[owners[i]] for i in order]


def test_image_search_by_gallery_name_matches_sending_the_file(served):
    name = "sub/green.png"
    _, by_name = get_json(served.url + "/api/search/image?k=3&image=" + quote(name))
    data = (served.root / "gallery/images" / name).read_bytes()
    _, by_bytes = get_json(served.url + "/api/search/image?k=3", data=data)
    assert [r["caption"] for r in by_name["results"]] == [r["caption"] for r in by_bytes["results"]]


def test_v2_metadata_and_infer_match_the_encoders(served):
    spec = served.encoders.spec
    status, meta = get_json(served.url + "/v2/models/text_encoder")
    assert status == 200
    assert meta["inputs"] == [{"name": "tokens", "datatype": "INT64", "shape": [-1, 6]}]
    assert meta["outputs"] == [{"name": "embeddings", "datatype": "FP32", "shape": [-1, 8]}]
    tokens = served.encoders.token_array(["a red square", "blue circle on grey"])
    request_body = {
        "id": "q1",
        "inputs": [{"name": "tokens", "shape": [2, 6], "datatype": "INT64", "data": tokens.ravel().tolist()}],
    }  # fmt: skip
    status, body = get_json(
        served.url + "/v2/models/text_encoder/infer", data=json.dumps(request_body).encode()
    )
    assert status == 200 and body["id"] == "q1" and body["model_version"] == meta["versions"][0]
    (output,) = body["outputs"]
    assert output["name"] == "embeddings" and output["shape"] == [2, 8]
    expected = served.encoders.embed_token_array(tokens)
    assert np.allclose(np.reshape(output["data"], (2, 8)), expected, atol=1e-6)
    pixels = np.random.default_rng(0).standard_normal((1, 3, spec.image.size, spec.image.size))
    image_body = {"inputs": [{"name": "images", "shape": list(pixels.shape), "datatype": "FP32", "data": pixels.tolist()}]}  # fmt: skip
    status, body = get_json(
        served.url + "/v2/models/image_encoder/infer", data=json.dumps(image_body).encode()
    )
    assert status == 200
    expected = served.encoders.embed_image_array(pixels.astype(np.float32))
    assert np.allclose(np.reshape(body["outputs"][0]["data"], (1, 8)), expected, atol=1e-5)
    assert get_json(served.url + "/v2/models/image_encoder/ready")[1]["ready"] is True
    assert get_json(served.url + "/v2/health/ready") == (200, {"ready": True})


def test_search_page_is_served_and_loads_nothing_from_elsewhere(served):
    status, headers, body = request(served.url + "/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in headers["content-security-policy"]
    for marker in ('id="q"', 'id="grid"', 'id="model"', 'id="captions"', "/api/search"):
        assert marker in page
    assert "http:" not in page and "https:" not in page and "//" not in page.replace("// ", "")


def test_gallery_images_are_served_by_name(served):
    for name in ("red.png", "sub/green.png"):
        status, headers, body = request(served.url + "/images/" + quote(name))
        assert status == 200 and headers["content-type"] == "image/png"
        assert body == (served.root / "gallery/images" / name).read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/images/../dataset.json",
        "/images/%2e%2e/dataset.json",
        "/images/sub/../../dataset.json",
        "/images/..%2fdataset.json",
        "/images//etc/passwd",
        "/images/%2Fetc%2Fpasswd",
        "/images/img9.png",  # a file of the dataset, but not of the served split
        "/images/sub",
    ],
)
def test_only_gallery_files_are_served(served, path):
    status, body = raw_get(served.url, path)
    assert status == 404
    assert set(json.loads(body)) == {"error"} and b"root:" not in body


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "q: missing"),
        ("q=", "q: empty"),
        ("q=%20%20", "q: empty"),
        ("q=" + "a" * 51, "q: 51 characters, more than the 50"),
        ("q=%21%3F%21", "q: text 0: no words"),
        ("q=red&k=0", "k: expected an integer from 1 to 20, got '0'"),
        ("q=red&k=21", "k: expected an integer from 1 to 20"),
        ("q=red&k=-3", "k: expected an integer"),
        ("q=red&k=ten", "k: expected an integer"),
        ("q=red&k=2.5", "k: expected an integer"),
    ],
)
def test_bad_text_queries_are_400_with_a_message(served, query, message):
    status, body = get_json(served.url + "/api/search?" + query)
    assert status == 400 and message in body["error"] and set(body) == {"error"}


def test_bytes_that_are_not_an_image_are_400(served):
    status, body = get_json(served.url + "/api/search/image", data=b"%PDF-1.4 not an image")
    assert status == 400 and "not a PNG or JPEG file" in body["error"]
    assert "0x" not in body["error"], body  # no object repr of the server's buffer


def test_an_empty_body_is_400(served):
    status, body = get_json(served.url + "/api/search/image", data=b"")
    assert status == 400 and "empty body" in body["error"]


def test_a_decompression_bomb_is_refused_from_its_header(served):
    bomb = png(size=(2000, 2000), mode="1")  # 4 M pixels in a few hundred bytes
    assert len(bomb) < 5_000
    status, body = get_json(served.url + "/api/search/image", data=bomb)
    assert status == 400 and "2000 x 2000 pixels is more than the 1,000,000" in body["error"]


def test_a_body_over_the_limit_is_413_by_its_declared_length(served):
    status, body = get_json(served.url + "/api/search/image", data=b"\0" * 200_001)
    assert status == 413 and "more than 200,000 bytes" in body["error"]


def test_a_chunked_body_over_the_limit_is_413_while_reading(served):
    host, port = served.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (b"\0" * 50_000 for _ in range(5))  # no Content-Length: counted as it arrives
    try:
        conn.request("POST", "/api/search/image", body=chunks, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413
        assert "more than 200,000 bytes" in json.loads(response.read())["error"]
    finally:
        conn.close()


@pytest.mark.parametrize("route", ["/v2/models/resnet", "/v2/models/resnet/ready"])
def test_unknown_v2_model_is_404(served, route):
    status, body = get_json(served.url + route)
    assert status == 404 and "unknown model 'resnet'" in body["error"]


def test_unknown_v2_model_infer_is_404(served):
    body = {"inputs": [{"name": "tokens", "shape": [1, 6], "datatype": "INT64", "data": [2] * 6}]}
    status, answer = get_json(served.url + "/v2/models/bert/infer", data=json.dumps(body).encode())
    assert status == 404 and "unknown model 'bert'" in answer["error"]


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"name": "ids", "shape": [1, 6], "datatype": "INT64", "data": [2] * 6}, "name: expected 'tokens'"),
        ({"name": "tokens", "shape": [1, 6], "datatype": "FP32", "data": [2] * 6}, "datatype: expected 'INT64'"),
        ({"name": "tokens", "shape": [1, 7], "datatype": "INT64", "data": [2] * 7}, "shape: expected [-1, 6]"),
        ({"name": "tokens", "shape": [5, 6], "datatype": "INT64", "data": [2] * 30}, "batch of 1 to 4"),
        ({"name": "tokens", "shape": [1, 6], "datatype": "INT64", "data": [2] * 5}, "5 values, but shape"),
        ({"name": "tokens", "shape": [1, 6], "datatype": "INT64", "data": [99] * 6}, "token ids must be in [0, 9)"),
        ({"name": "tokens", "shape": [1, 6], "datatype": "INT64", "data": ["x"] * 6}, "expected INT64 numbers"),
    ],
)  # fmt: skip
def test_bad_v2_tensors_are_400(served, tensor, message):
    status, body = get_json(
        served.url + "/v2/models/text_encoder/infer", data=json.dumps({"inputs": [tensor]}).encode()
    )
    assert status == 400 and message in body["error"]


def test_v2_body_that_is_not_json_is_400(served):
    status, body = get_json(served.url + "/v2/models/text_encoder/infer", data=b"{not json")
    assert status == 400 and "body: not JSON" in body["error"]


def test_unknown_route_and_method_are_json(served):
    assert get_json(served.url + "/nope")[0] == 404
    status, body = get_json(served.url + "/api/search?q=x", data=b"x")
    assert status == 405 and set(body) == {"error"}


# ---------------------------------------------------------------- readiness and failures


class BlockingSource:
    """An export directory whose loading waits for ``release``."""

    polls = False

    def __init__(self, export: Path) -> None:
        self.inner, self.release = ExportDirSource(export), threading.Event()

    def describe(self) -> str:
        return "a slow source"

    def current_version(self) -> str:
        return self.inner.current_version()

    def load(self, version: str):
        self.release.wait(30)
        return self.inner.load(version)


def test_not_ready_until_the_index_is_loaded(tmp_path):
    gallery = read_gallery(tiny_gallery(tmp_path / "gallery"))
    source = BlockingSource(tiny_export(tmp_path / "export"))
    cfg = serve_config(**LIMITS)
    service = Service(source, gallery, cfg, IndexCache(tmp_path / "cache"))
    with running(service, cfg, wait_ready=False) as url:
        assert get_json(url + "/healthz")[0] == 200
        status, body = get_json(url + "/readyz")
        assert status == 503 and "still loading" in body["error"]
        assert get_json(url + "/api/search?q=red")[0] == 503
        assert get_json(url + "/v2/health/ready")[0] == 503
        source.release.set()
        deadline = time.monotonic() + 30
        while get_json(url + "/readyz")[0] != 200:
            assert time.monotonic() < deadline
        assert get_json(url + "/api/search?q=red")[0] == 200


class FailingSource(BlockingSource):
    def load(self, version: str):
        raise ImtextError("no version of 'm' holds alias 'champion'; promote one")


def test_a_model_that_cannot_load_is_never_ready_and_says_why(tmp_path):
    gallery = read_gallery(tiny_gallery(tmp_path / "gallery"))
    cfg = serve_config(**LIMITS)
    service = Service(
        FailingSource(tiny_export(tmp_path / "export")), gallery, cfg, IndexCache(tmp_path)
    )
    with running(service, cfg) as url:
        status, body = get_json(url + "/readyz")
        assert status == 503 and "holds alias 'champion'" in body["error"]


class BrokenService:
    """A service whose state cannot be read: a bug inside a request."""

    failure = None

    def __init__(self, gallery) -> None:
        self.gallery = gallery

    @property
    def state(self):
        raise RuntimeError("secret internal detail /etc/shadow")


def test_a_bug_is_a_500_without_its_details(tmp_path):
    import uvicorn

    from imtext.serve.app import create_app
    from imtext.serve.server import bind
    from tests.serving import wait_until

    cfg = serve_config(**LIMITS)
    app = create_app(BrokenService(read_gallery(tiny_gallery(tmp_path))), cfg)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "uvicorn did not start")
        status, _, body = request(f"http://127.0.0.1:{sock.getsockname()[1]}/api/search?q=red")
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
    assert status == 500
    assert json.loads(body) == {
        "error": "internal error while answering this request; the server log has it"
    }
