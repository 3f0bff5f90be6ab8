"""The HTTP routes of the search service (FastAPI), built around a :class:`Service`.

| route | answers |
|---|---|
| ``GET /healthz`` | 200 while the process runs |
| ``GET /readyz`` | 200 with the model, gallery and index once a version is loaded; 503 before |
| ``GET /api/search?q=TEXT&k=10`` | the ``k`` gallery images nearest to the text |
| ``POST /api/search/image?k=10`` | the ``k`` captions nearest to the image in the body |
| ``GET /api/search/image?image=NAME&k=10`` | the same for a gallery image (the page's click) |
| ``POST /v2/models/{text_encoder,image_encoder}/infer`` | Open Inference Protocol v2 |
| ``GET /v2/models/{name}`` (``/ready``), ``GET /v2/health/{live,ready}`` | v2 metadata, health |
| ``GET /`` | the search page |
| ``GET /images/NAME`` | a gallery image, looked up by name among the gallery's files only |

Every error is JSON ``{"error": "..."}``: 4xx naming what to change for a bad request, 500 without
any detail of the failure for a bug (the trace goes to the server log). Every search and infer
response names the model version that answered it.
"""

from __future__ import annotations

import json
import logging
import math
from importlib import resources
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from imtext.config import ServeConfig
from imtext.errors import printable
from imtext.export.runtime import InputError
from imtext.serve.service import Service
from imtext.serve.state import Hit, ServingState

log = logging.getLogger("imtext.serve")

TEXT_MODEL, IMAGE_MODEL = "text_encoder", "image_encoder"
V2_MODELS = (TEXT_MODEL, IMAGE_MODEL)
#: The page loads nothing from anywhere else; the browser enforces it.
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'"
)
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


class RequestError(Exception):
    """A request the client must change: the status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": printable(message)}, status_code=status)


def create_app(service: Service, cfg: ServeConfig) -> FastAPI:
    """The FastAPI application serving ``service`` under the limits of ``cfg``."""
    app = FastAPI(title="imtext search", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    add_health_routes(app, service)
    add_search_routes(app, service, cfg)
    add_v2_routes(app, service, cfg)
    add_page_routes(app, service)
    return app


def ready_state(service: Service) -> ServingState:
    """The version being served; a 503 naming why while there is none."""
    state = service.state
    if state is None:
        reason = service.failure or "the model and its index are still loading; try again"
        raise RequestError(503, reason)
    return state


def add_health_routes(app: FastAPI, service: Service) -> None:
    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, Any]:
        state = ready_state(service)
        return {
            "status": "ready",
            "model": state.model_info,
            "gallery": {"images": len(state.gallery), "captions": len(state.gallery.captions)},
            "index": {
                "kind": state.index_kind,
                "bytes": state.index_bytes,
                "source": state.index_source,
            },
        }


def add_search_routes(app: FastAPI, service: Service, cfg: ServeConfig) -> None:
    @app.get("/api/search")
    def search_text(request: Request) -> dict[str, Any]:
        query = text_query(request.query_params.get("q"), cfg)
        k = top_k(request.query_params.get("k"), cfg)
        state = ready_state(service)
        try:
            hits = state.search_text(query, k)
        except InputError as exc:
            raise RequestError(400, f"q: {exc}") from None
        return {"model": state.model_info, "results": [image_result(state, h) for h in hits]}

    @app.post("/api/search/image")
    async def search_image(request: Request) -> dict[str, Any]:
        k = top_k(request.query_params.get("k"), cfg)
        data = await read_body(request, cfg.max_body_bytes)
        if not data:
            raise RequestError(400, "empty body; send the bytes of a PNG or JPEG file")
        state = ready_state(service)
        try:
            hits = await run_in_threadpool(state.search_image_bytes, data, k, cfg.max_image_pixels)
        except InputError as exc:
            raise RequestError(400, f"body: {exc}") from None
        return {"model": state.model_info, "results": [caption_result(state, h) for h in hits]}

    @app.get("/api/search/image")
    def search_gallery_image(request: Request) -> dict[str, Any]:
        k = top_k(request.query_params.get("k"), cfg)
        name = request.query_params.get("image")
        if not name:
            raise RequestError(400, "image: missing; give the name of a gallery image")
        state = ready_state(service)
        position = state.gallery.positions.get(name)
        if position is None:
            raise RequestError(404, f"image: no image {name!r} in the gallery")
        hits = state.captions_near(state.image_embeddings[position : position + 1], k)
        return {"model": state.model_info, "results": [caption_result(state, h) for h in hits]}


def add_v2_routes(app: FastAPI, service: Service, cfg: ServeConfig) -> None:
    @app.get("/v2/health/live")
    def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    def v2_ready() -> dict[str, bool]:
        ready_state(service)
        return {"ready": True}

    @app.get("/v2/models/{name}")
    def v2_metadata(name: str) -> dict[str, Any]:
        return model_metadata(ready_state(service), known_model(name))

    @app.get("/v2/models/{name}/ready")
    def v2_model_ready(name: str) -> dict[str, Any]:
        known_model(name)
        state = ready_state(service)
        return {"name": name, "version": state.model.version, "ready": True}

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, request: Request) -> dict[str, Any]:
        known_model(name)
        body = parse_json(await read_body(request, cfg.max_body_bytes))
        state = ready_state(service)
        return await run_in_threadpool(infer, state, name, body, cfg)


def add_page_routes(app: FastAPI, service: Service) -> None:
    """The search page and the gallery's images it shows."""
    page = resources.files("imtext.serve").joinpath("static/index.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/images/{name:path}")
    def gallery_image(name: str) -> FileResponse:
        # Looked up among the gallery's own files: a name is never joined onto a folder.
        path = service.gallery.paths.get(name)
        if path is None:
            raise RequestError(404, f"no image {name!r} in the gallery")
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix.lower()))


def install_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": ...}``; a bug as a 500 that says nothing of its cause."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return error(exc.status_code, f"{message}: {request.method} {request.url.path}")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error(500, "internal error while answering this request; the server log has it")


# ---------------------------------------------------------------- request parts


def text_query(raw: str | None, cfg: ServeConfig) -> str:
    """The query ``q``, stripped; :class:`RequestError` when missing, empty or too long."""
    if raw is None:
        raise RequestError(400, "q: missing; pass the text to search for, e.g. ?q=a+red+circle")
    query = raw.strip()
    if not query:
        raise RequestError(400, "q: empty; pass the text to search for")
    if len(query) > cfg.max_query_chars:
        raise RequestError(
            400, f"q: {len(query)} characters, more than the {cfg.max_query_chars} accepted"
        )
    return query


def top_k(raw: str | None, cfg: ServeConfig) -> int:
    """``k`` (default ``cfg.default_k``); :class:`RequestError` unless an integer in
    [1, ``cfg.max_k``]."""
    if raw is None or raw == "":
        return cfg.default_k
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if not 1 <= k <= cfg.max_k or str(raw).strip() != str(k):
        raise RequestError(400, f"k: expected an integer from 1 to {cfg.max_k}, got {raw!r}")
    return k


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; a 413 as soon as the declared or the received length passes ``limit``
    (the rest is never read into memory)."""
    declared = request.headers.get("content-length")
    too_large = f"body: more than {limit:,} bytes; send a smaller file"
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise RequestError(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"body: not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "body: expected a JSON object with an 'inputs' list")
    return body


def image_url(name: str) -> str:
    return "/images/" + quote(name)


def image_result(state: ServingState, hit: Hit) -> dict[str, Any]:
    name = state.gallery.names[hit.image]
    return {"image": name, "score": hit.score, "url": image_url(name)}


def caption_result(state: ServingState, hit: Hit) -> dict[str, Any]:
    name = state.gallery.names[hit.image]
    caption = state.gallery.captions[hit.caption] if hit.caption is not None else None
    return {"caption": caption, "image": name, "score": hit.score, "url": image_url(name)}


# ---------------------------------------------------------------- Open Inference Protocol v2


def known_model(name: str) -> str:
    if name not in V2_MODELS:
        raise RequestError(
            404, f"unknown model {name!r}; this server has {' and '.join(V2_MODELS)}"
        )
    return name


def input_signature(state: ServingState, name: str) -> tuple[str, str, list[int]]:
    """(input name, v2 datatype, shape with -1 for the batch) of model ``name``."""
    spec = state.model.encoders.spec
    if name == TEXT_MODEL:
        return spec.text.input, "INT64", [-1, spec.text.max_len]
    return spec.image.input, "FP32", [-1, 3, spec.image.size, spec.image.size]


def model_metadata(state: ServingState, name: str) -> dict[str, Any]:
    input_name, datatype, shape = input_signature(state, name)
    return {
        "name": name,
        "versions": [state.model.version],
        "platform": "onnxruntime_onnx",
        "parameters": {"registered_model": state.model.name},
        "inputs": [{"name": input_name, "datatype": datatype, "shape": shape}],
        "outputs": [
            {
                "name": state.model.encoders.spec.output,
                "datatype": "FP32",
                "shape": [-1, state.model.encoders.spec.embed_dim],
            }
        ],
    }


def infer(state: ServingState, name: str, body: dict[str, Any], cfg: ServeConfig) -> dict:
    """A v2 infer response: the embeddings of the one input tensor of ``body``."""
    tensor = v2_input(state, name, body, cfg)
    encoders = state.model.encoders
    if name == TEXT_MODEL:
        embeddings = encoders.embed_token_array(tensor)
    else:
        embeddings = encoders.embed_image_array(tensor)
    response = {
        "model_name": name,
        "model_version": state.model.version,
        "outputs": [
            {
                "name": encoders.spec.output,
                "datatype": "FP32",
                "shape": list(embeddings.shape),
                "data": embeddings.ravel().tolist(),
            }
        ],
        "parameters": {"registered_model": state.model.name},
    }
    if "id" in body:
        response["id"] = body["id"]
    return response


def v2_input(state: ServingState, name: str, body: dict[str, Any], cfg: ServeConfig) -> np.ndarray:
    """The checked input array of a v2 request; :class:`RequestError` naming what is wrong."""
    input_name, datatype, shape = input_signature(state, name)
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, f"inputs: expected a list of one tensor named {input_name!r}")
    tensor = inputs[0]
    if tensor.get("name") != input_name:
        raise RequestError(
            400, f"inputs[0].name: expected {input_name!r}, got {tensor.get('name')!r}"
        )
    if tensor.get("datatype") != datatype:
        raise RequestError(
            400, f"inputs[0].datatype: expected {datatype!r}, got {tensor.get('datatype')!r}"
        )
    given = tensor.get("shape")
    if (
        not isinstance(given, list)
        or len(given) != len(shape)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in given)
        or given[1:] != shape[1:]
        or not 1 <= given[0] <= cfg.max_batch
    ):
        raise RequestError(
            400,
            f"inputs[0].shape: expected {shape} with a batch of 1 to {cfg.max_batch}, got {given!r}",
        )
    dtype = np.int64 if datatype == "INT64" else np.float32
    try:
        array = np.asarray(tensor.get("data"), dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(400, f"inputs[0].data: expected {datatype} numbers") from None
    if array.size != math.prod(given):
        raise RequestError(
            400, f"inputs[0].data: {array.size} values, but shape {given} needs {math.prod(given)}"
        )
    array = array.reshape(given)
    if dtype == np.int64:
        vocab = len(state.model.encoders.vocab)
        if array.min() < 0 or array.max() >= vocab:
            raise RequestError(400, f"inputs[0].data: token ids must be in [0, {vocab})")
    elif not np.isfinite(array).all():
        raise RequestError(400, "inputs[0].data: values must be finite")
    return array
