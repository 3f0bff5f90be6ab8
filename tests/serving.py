"""Helpers of the serving tests: a tiny gallery, a tiny export, the service on a real uvicorn
server on 127.0.0.1 (in a thread), and a plain HTTP client (urllib, no test client)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imtext.config import ServeConfig, load_stage_config
from tests.conftest import REPO, karpathy_image, write_image
from tests.unit.test_registry import write_onnx_encoders

#: Captions of the tiny gallery: image i of COLOURS has the captions of its row.
COLOURS = {
    "red.png": ((220, 30, 30), ["a red square", "red on grey"]),
    "blue.png": ((30, 30, 220), ["a blue circle"]),
    "grey.png": ((128, 128, 128), ["a grey square on grey"]),
    "sub/green.png": ((30, 200, 30), ["a circle on a square"]),
}


def tiny_gallery(root: Path) -> Path:
    """A Karpathy dataset of four test images (one in a subfolder) and one training image."""
    images = []
    for i, (name, (colour, captions)) in enumerate(COLOURS.items()):
        folder, _, filename = name.rpartition("/")
        entry = karpathy_image(i, "test", captions, folder or None)
        entry["filename"] = filename
        images.append(entry)
        write_image(root / "images" / name, colour, size=(24, 20))
    train = karpathy_image(9, "train", ["a training image"])
    write_image(root / "images" / train["filename"], (1, 2, 3))
    images.append(train)
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    return root


def tiny_export(root: Path, seed: int = 0) -> Path:
    """Stand-in ONNX encoders with the export's inputs, output and preprocess.json
    (tests/unit/test_registry.py); the real :mod:`imtext.export.runtime` runs them."""
    return write_onnx_encoders(root, seed=seed)


def serve_config(**overrides: Any) -> ServeConfig:
    """The repository's ``serve`` settings with ``overrides``."""
    return dataclasses.replace(load_stage_config("serve", REPO / "params.yaml"), **overrides)


@contextmanager
def running(service, cfg: ServeConfig, wait_ready: bool = True) -> Iterator[str]:
    """``service`` behind a real uvicorn server on a free port of 127.0.0.1; yields its URL."""
    import uvicorn

    from imtext.serve.app import create_app
    from imtext.serve.server import bind

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(service, cfg), log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    service.start()
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server.started, 30, "uvicorn did not start")
        if wait_ready:
            wait_until(lambda: service.state is not None or service.failure, 60, "not ready")
        yield url
    finally:
        server.should_exit = True
        thread.join(15)
        service.stop()
        sock.close()


def wait_until(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.05)


def request(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET (or a POST with ``data``); errors are answers too."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str, data: bytes | None = None, **headers: str) -> tuple[int, Any]:
    status, _, body = request(url, data, headers)
    return status, json.loads(body)


def raw_get(base: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` sent exactly as given (no client-side normalisation of ``..``)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
