"""``imtext serve`` (the search service) and ``imtext ui`` (MLflow's UI on the local store)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from imtext.cli.flags import log, params_arg, tracking_arg


def add_serving_commands(sub: argparse._SubParsersAction) -> None:
    """``imtext ui`` and ``imtext serve``."""
    _add_ui(sub)
    _add_serve(sub)


def _add_ui(sub: argparse._SubParsersAction) -> None:
    from imtext.mlflow_ui import DEFAULT_PORT

    p = sub.add_parser(
        "ui",
        help="MLflow's UI on the local store `make run` logged to (`make ui`)",
        description=(
            "Start `mlflow server` on the embedded store (sqlite:///mlflow.db, artifacts in "
            "./mlartifacts, unless --tracking-uri, register.tracking_uri or $MLFLOW_TRACKING_URI "
            "name another SQLite store) on 127.0.0.1 and print the address of the latest run; "
            "Ctrl-C stops it. For a tracking server (http://...), print the address only. "
            "`imtext plots` shows the DVC plots."
        ),
    )
    params_arg(p)
    tracking_arg(p)
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default: %(default)s)")
    p.set_defaults(func=_run_ui)


def _run_ui(args: argparse.Namespace) -> None:
    from imtext.ui import serve, store_uri

    serve(store_uri(args.params, args.tracking_uri), args.port)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a registered model: search page, search API, Open Inference Protocol v2",
        description=(
            "Serve text-to-image and image-to-text search over a gallery with a registered "
            "model's ONNX encoders (ONNX Runtime, FAISS). By default the champion "
            "(models:/<register.model_name>@<register.alias>) over the test split of "
            "data/shapes, on http://127.0.0.1:8080: the search page at /, GET /api/search?q=TEXT, "
            "POST /api/search/image, the v2 routes /v2/models/{text_encoder,image_encoder}/infer, "
            "/healthz and /readyz. The gallery's embeddings and index are cached under "
            "--cache-dir, keyed by the model's files and the gallery's content. With an alias, "
            "the registry is checked every --poll-seconds: when the alias moves, the new version "
            "is loaded beside the serving one and replaces it without dropping a request. "
            "Settings come from the 'serve' section of --params; the flags override them."
        ),
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        metavar="URI",
        default=None,
        help="models:/NAME@ALIAS (followed as the alias moves) or models:/NAME/VERSION "
        "(default: models:/<register.model_name>@<register.alias> of --params)",
    )
    source.add_argument(
        "--export-dir",
        type=Path,
        default=None,
        help="serve this export directory (imtext export's output) instead of a registered model",
    )
    p.add_argument(
        "--gallery",
        type=Path,
        default=Path("data/shapes"),
        help="Karpathy-format dataset directory: dataset.json and images/ (default: %(default)s)",
    )
    p.add_argument(
        "--gallery-split",
        choices=("train", "val", "test", "all"),
        default="test",
        help="which images of --gallery to search (default: %(default)s)",
    )
    p.add_argument("--host", default=None, help="address to listen on (default: serve.host)")
    p.add_argument("--port", type=int, default=None, help="(default: serve.port)")
    p.add_argument(
        "--index",
        choices=("exact", "ivf", "hnsw"),
        default=None,
        help="FAISS index: exact inner product, or approximate ivf / hnsw for large galleries "
        "(default: serve.index)",
    )
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=None,
        help="seconds between checks of the alias; 0 never checks (default: serve.poll_seconds)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="downloaded models and built indexes (default: serve.cache_dir, artifacts/serve)",
    )
    params_arg(p)
    tracking_arg(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    # FAISS reports at INFO which of its builds it tried; only its failures matter here.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    # MLflow draws a progress bar per downloaded file, which floods a server's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import dataclasses
    import time

    from imtext.config import load_stage_config
    from imtext.serve.gallery import read_gallery
    from imtext.serve.index import IndexCache
    from imtext.serve.model import ExportDirSource, RegistrySource
    from imtext.serve.server import run_server
    from imtext.serve.service import Service

    flags = {
        "host": args.host,
        "port": args.port,
        "index": args.index,
        "poll_seconds": args.poll_seconds,
        "cache_dir": None if args.cache_dir is None else str(args.cache_dir),
    }
    cfg = dataclasses.replace(
        load_stage_config("serve", args.params),
        **{key: value for key, value in flags.items() if value is not None},
    )
    cache_root = Path(cfg.cache_dir)
    if args.export_dir is not None:
        source = ExportDirSource(args.export_dir)
    else:
        register_cfg = load_stage_config("register", args.params)
        uri = args.model or f"models:/{register_cfg.model_name}@{register_cfg.alias}"
        source = RegistrySource(uri, args.tracking_uri, register_cfg, cache_root / "downloads")
    start = time.monotonic()
    gallery = read_gallery(args.gallery, args.gallery_split)
    log.info(
        "gallery %s (split %s): %d images, %d captions, content sha256 %s… (read in %.1f s)",
        args.gallery,
        args.gallery_split,
        len(gallery),
        len(gallery.captions),
        gallery.digest[:12],
        time.monotonic() - start,
    )
    service = Service(source, gallery, cfg, IndexCache(cache_root))
    run_server(service, cfg, cfg.host, cfg.port)
