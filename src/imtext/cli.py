"""The ``imtext`` command line: one subcommand per stage, nothing but plumbing.

Errors caused by input or settings print one line (``imtext: error: ...``) and exit with status 1;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from imtext import __version__
from imtext.errors import ImtextError, printable
from imtext.orchestrate import add_pipeline_parser

log = logging.getLogger("imtext")


def _progress(items: Iterable, total: int, desc: str, unit: str = "img") -> Iterable:
    from tqdm import tqdm

    # tqdm hides itself when stderr is not a terminal (CI logs stay readable).
    return tqdm(items, total=total, desc=desc, unit=unit, disable=None, leave=False)


def _step_progress(items: Iterable, total: int, desc: str) -> Iterable:
    return _progress(items, total, desc, unit="step")


def _add_shapes(sub: argparse._SubParsersAction) -> None:
    from imtext.data import shapes

    p = sub.add_parser(
        "shapes",
        help="render the built-in 'shapes' dataset in Karpathy format",
        description=(
            "Render scenes of coloured shapes with five paraphrased captions each and write them "
            "as OUT/dataset.json (Karpathy format, train/val/test splits) and OUT/images/*.png. "
            "The output is byte-for-byte the same for the same --images, --seed and --size; "
            "an existing OUT is replaced only once the new dataset is complete, and only if "
            "imtext wrote it (or it is empty, or --force is given)."
        ),
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--images",
        type=int,
        default=shapes.DEFAULT_IMAGES,
        help="number of images; val and test get min(1000, N/6) each (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=shapes.DEFAULT_SEED, help="(default: %(default)s)")
    p.add_argument(
        "--size",
        type=int,
        default=shapes.DEFAULT_SIZE,
        help="image side in pixels (default: %(default)s)",
    )
    _force_arg(p)
    p.set_defaults(func=_run_shapes)


def _run_shapes(args: argparse.Namespace) -> None:
    from imtext._fs import atomic_directory
    from imtext.data.shapes import generate_shapes

    def progress(items: Sequence) -> Iterable:
        return _progress(items, len(items), "render")

    with atomic_directory(args.out, force=args.force) as tmp:
        sizes = generate_shapes(tmp, args.images, args.seed, args.size, progress)
    log.info(
        "wrote shapes dataset (seed %d): %s -> %s",
        args.seed,
        ", ".join(f"{k} {v}" for k, v in sizes.items()),
        args.out,
    )


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="print dataset-card numbers of a Karpathy JSON file as JSON",
        description="Split sizes, caption lengths, training vocabulary and, for shapes, scene facts.",
    )
    p.add_argument("--annotations", type=Path, required=True, help="Karpathy JSON file")
    p.set_defaults(func=_run_stats)


def _run_stats(args: argparse.Namespace) -> None:
    import json

    from imtext.data.stats import karpathy_stats

    print(json.dumps(karpathy_stats(args.annotations), indent=1))


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from imtext.data.readers import FORMATS

    p = sub.add_parser(
        "prepare",
        help="read annotations and images, build the vocabulary, write prepared splits",
        description=(
            "Read a Karpathy JSON (Flickr30k, COCO, shapes) or CUHK-PEDES reid_raw.json file, "
            "check and re-encode every image, build the vocabulary from the training split only, "
            "encode captions to fixed length and write OUT/{train,val,test}.npz, "
            "OUT/{split}-images.bin, OUT/vocab.json and OUT/meta.json. Settings come from the "
            "'prepare' section of --params. OUT is replaced only when everything succeeded, and "
            "only if imtext wrote it (or it is empty, or --force is given)."
        ),
    )
    p.add_argument("--annotations", type=Path, required=True, help="annotation JSON file")
    p.add_argument(
        "--images", type=Path, required=True, help="directory the image paths are relative to"
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="karpathy",
        help="annotation format (default: %(default)s)",
    )
    p.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="(default: %(default)s)"
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip missing or unreadable images, empty captions and images without captions, "
        "listing each in the log and in OUT/meta.json, instead of stopping at the first",
    )
    _force_arg(p)
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> None:
    from imtext.config import load_stage_config
    from imtext.data.prepare import prepare

    cfg = load_stage_config("prepare", args.params)
    prepare(
        cfg,
        args.annotations,
        args.images,
        args.out,
        fmt=args.format,
        skip_bad=args.skip_bad,
        log=log.info,
        progress=_progress,
        force=args.force,
    )


def _add_train(sub: argparse._SubParsersAction, stage: str) -> None:
    stage_one = stage == "pretrain"
    p = sub.add_parser(
        stage,
        help=(
            "Stage I: train both branches with the instance loss"
            if stage_one
            else "Stage II: fine-tune end to end with ranking + instance loss"
        ),
        description=(
            (
                "Stage I of the dual-path method: one classifier over all training instances, "
                "shared by the image and the text branch, trains both with the instance loss. "
                if stage_one
                else "Stage II of the dual-path method: starting from Stage I's model (--init), "
                "train end to end with the bidirectional ranking loss plus the instance loss. "
            )
            + f"Settings come from the 'model' and '{stage}' sections of --params. "
            "Writes OUT/checkpoint.pt after every epoch (--resume continues from it), "
            "OUT/model.pt (the epoch with the best validation rsum), OUT/history.json, "
            "OUT/metrics.json and OUT/log.jsonl. For data-parallel training run it under "
            "torchrun (gloo on CPUs, NCCL on GPUs); batch_size is per process."
        ),
    )
    p.add_argument(
        "--prepared", type=Path, required=True, help="output directory of `imtext prepare`"
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    if not stage_one:
        p.add_argument(
            "--init",
            type=Path,
            required=True,
            help="model file to start from (pretrain's model.pt)",
        )
    p.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="(default: %(default)s)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt if there is one (same params required)",
    )
    p.set_defaults(func=_run_train, stage=stage)


def _run_train(args: argparse.Namespace) -> None:
    import json

    from imtext.config import load_stage_config
    from imtext.train.loop import train_stage

    model_cfg = load_stage_config("model", args.params)
    cfg = load_stage_config(args.stage, args.params)
    log_path = args.out / "log.jsonl"

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        # Created with the first line, not before: a run refused at the start (no such device,
        # settings that do not fit together) leaves no empty directory behind.
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"stage": args.stage, "step": step, **metrics}) + "\n")

    metrics = train_stage(
        args.stage,
        model_cfg,
        cfg,
        args.prepared,
        args.out,
        init=getattr(args, "init", None),
        resume=args.resume,
        device=args.device,
        log=log_metrics,
    )
    if "val_rsum" in metrics:
        log.info(
            "%s done: best epoch %d, val rsum %.1f (R@1 i2t %.1f, t2i %.1f) -> %s",
            args.stage,
            metrics["best_epoch"],
            metrics["val_rsum"],
            metrics["val_i2t_r1"],
            metrics["val_t2i_r1"],
            args.out,
        )


def _force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out even if it is a non-empty directory imtext did not write "
        "(everything in it is deleted); an --out that is or holds an input is always refused",
    )


def _params_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="(default: %(default)s)"
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="retrieval metrics and a visual report of a trained model",
        description=(
            "Embed every image and caption of a prepared split with a trained model and rank them "
            "both ways (image -> captions, caption -> images). Writes OUT/metrics.json (R@1/5/10, "
            "median and mean rank of both directions, rsum), OUT/recall_curve.json and .png, and "
            "a report for people: OUT/report.html (sample queries with their top results, ground "
            "truth marked) and OUT/report.png. Settings come from the 'evaluate' section of "
            "--params (split, protocol: full, coco_1k or cuhk)."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="model file (finetune's model.pt)")
    p.add_argument(
        "--prepared", type=Path, required=True, help="output directory of `imtext prepare`"
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    _params_arg(p)
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)",
    )
    _force_arg(p)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from imtext.config import load_stage_config
    from imtext.eval.evaluate import evaluate, format_recall_table

    cfg = load_stage_config("evaluate", args.params)
    metrics = evaluate(
        cfg, args.model, args.prepared, args.out, device=args.device, log=log.info, force=args.force
    )
    print(format_recall_table(metrics))
    log.info("report: %s", args.out / "report.html")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="ONNX encoders for serving, checked against PyTorch",
        description=(
            "Write OUT/image_encoder.onnx (input 'images', float32 [N,3,H,W]) and "
            "OUT/text_encoder.onnx (input 'tokens', int64 [N,L]), each with output 'embeddings' "
            "[N,D] (L2-normalised) and a dynamic batch axis, plus OUT/preprocess.json and "
            "OUT/vocab.json so a client can embed raw images and sentences without imtext. Both "
            "encoders are run in ONNX Runtime against PyTorch: the largest difference and the "
            "recall from either embedding go to OUT/parity.json, and the export fails when they "
            "disagree beyond the 'export' section's tolerances. With export.quantize static or dynamic, INT8 "
            "encoders are written too and their recall is measured."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="model file (finetune's model.pt)")
    p.add_argument(
        "--prepared", type=Path, required=True, help="output directory of `imtext prepare`"
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    _params_arg(p)
    _force_arg(p)
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from imtext.config import load_stage_config
    from imtext.export import export

    cfg = load_stage_config("export", args.params)
    export(cfg, args.model, args.prepared, args.out, log=log.info, force=args.force)


def _tracking_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI; overrides register.tracking_uri and $MLFLOW_TRACKING_URI "
        "(default when all are unset: sqlite:///mlflow.db with artifacts in ./mlartifacts)",
    )


def _add_register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register",
        help="log a trained, evaluated and exported model to MLflow as a new model version",
        description=(
            "Create an MLflow run with the parameters, the training history, the evaluation "
            "metrics and report, the PyTorch model file and the ONNX encoders, tagged with the git "
            "commit, the data hash (data.dvc) and a hash of the parameters; register the ONNX "
            "encoders as a new version of register.model_name. Nothing on disk is changed, so a "
            "failed registration (unreachable server) can simply be run again. With --promote, "
            "the version then goes through the same gate as `imtext promote`."
        ),
    )
    p.add_argument(
        "--train-dir", type=Path, required=True, help="finetune's output (model.pt, history)"
    )
    p.add_argument(
        "--eval-dir", type=Path, required=True, help="evaluate's output (metrics, report)"
    )
    p.add_argument("--export-dir", type=Path, required=True, help="export's output (ONNX encoders)")
    _params_arg(p)
    p.add_argument(
        "--data-dvc",
        type=Path,
        default=Path("data.dvc"),
        help="DVC file of the raw data, for the data-hash tag (default: %(default)s)",
    )
    _tracking_arg(p)
    p.add_argument(
        "--promote",
        action="store_true",
        help="then move the serving alias to the new version if it beats the champion "
        "(a refusal is reported, not an error)",
    )
    p.set_defaults(func=_run_register)


def _run_register(args: argparse.Namespace) -> None:
    from imtext.config import load_stage_config, read_params
    from imtext.registry import register

    cfg = load_stage_config("register", args.params)
    version = register(
        cfg,
        params=read_params(args.params),
        train_dir=args.train_dir,
        eval_dir=args.eval_dir,
        export_dir=args.export_dir,
        data_dvc=args.data_dvc if args.data_dvc.exists() else None,
        tracking_uri=args.tracking_uri,
        log=log.info,
    )
    print(f"registered {version.name} version {version.version} (run {version.run_id})")
    if args.promote:
        _report_decision(_promote(cfg, version.version, args.tracking_uri, None), cfg)


def _promote(cfg, version, tracking_uri, force_reason):
    from imtext.registry import promote

    return promote(cfg, version, tracking_uri=tracking_uri, force_reason=force_reason, log=log.info)


def _report_decision(decision, cfg) -> None:
    target = f"models:/{cfg.model_name}@{cfg.alias}"
    if decision.promoted:
        print(f"promoted version {decision.version} to {target}: {decision.reason}")
    else:
        print(f"not promoted: version {decision.version} stays out of {target}: {decision.reason}")


def _add_promote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote",
        help="move the serving alias to a model version, gated on its evaluation metric",
        description=(
            "Move the alias register.alias (champion) of register.model_name to VERSION only if "
            "its register.gate_metric (rsum) beats the current champion's by more than "
            "register.gate_min_delta. The evidence (both values, the previous champion, the time) "
            "is recorded as tags of the version. A refusal exits with status 3. --force REASON "
            "promotes regardless and records the reason."
        ),
    )
    p.add_argument("--version", required=True, help="model version number to promote")
    p.add_argument(
        "--force",
        metavar="REASON",
        default=None,
        help="promote even if the gate refuses; REASON is recorded on the version",
    )
    _params_arg(p)
    _tracking_arg(p)
    p.set_defaults(func=_run_promote)


#: Exit status of `imtext promote` when the gate refuses (1 is for errors).
REFUSED = 3


def _run_promote(args: argparse.Namespace) -> int:
    from imtext.config import load_stage_config

    cfg = load_stage_config("register", args.params)
    decision = _promote(cfg, args.version, args.tracking_uri, args.force)
    _report_decision(decision, cfg)
    return 0 if decision.promoted else REFUSED


def _add_plots(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plots",
        help="`dvc plots show` that works offline",
        description=(
            "Render the plots of dvc.yaml (training curves, recall curve) to OUT/index.html with "
            "the Vega libraries inlined, so the page needs no internet access (DVC's own page "
            "loads them from a CDN)."
        ),
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("dvc_plots"),
        help="output directory (default: %(default)s)",
    )
    p.add_argument("targets", nargs="*", help="plot files or dvc.yaml plot ids (default: all)")
    p.set_defaults(func=_run_plots)


def _run_plots(args: argparse.Namespace) -> None:
    from imtext.plots import show_plots

    log.info("plots: %s", show_plots(args.out, args.targets))


def _add_ui(sub: argparse._SubParsersAction) -> None:
    from imtext.ui import DEFAULT_PORT

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
    _params_arg(p)
    _tracking_arg(p)
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
    _params_arg(p)
    _tracking_arg(p)
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


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        help="train and evaluate a list of configurations over seeds; write one table",
        description=(
            "For every configuration of --configs (a name, its stages and params overrides) and "
            "every seed: train its stages (pretrain and/or finetune) on --prepared and evaluate "
            "the result on the 'evaluate' section's split, into OUT/runs/NAME/seedK/. Then write "
            "ablation.md and ablation.csv (R@1/5/10 both ways and rsum, mean and std over the "
            "seeds; the CSV also per seed) into --table-dir. Finished runs are skipped and "
            "interrupted stages resume, so an interrupted ablation continues when run again."
        ),
    )
    p.add_argument(
        "--prepared", type=Path, required=True, help="output directory of `imtext prepare`"
    )
    p.add_argument("--out", type=Path, required=True, help="directory of the runs")
    p.add_argument(
        "--configs",
        type=Path,
        default=Path("ablation/configs.yaml"),
        help="configurations file (default: %(default)s)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: %(default)s)")
    p.add_argument(
        "--table-dir", type=Path, default=None, help="where the table goes (default: OUT)"
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these configurations (e.g. to share them out among processes)",
    )
    _params_arg(p)
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)",
    )
    p.add_argument(
        "--mlflow",
        action="store_true",
        help="also log to MLflow (experiment register.experiment): a parent run 'ablation' with "
        "the table, and a nested run per configuration and seed (MLflow's compare view)",
    )
    _tracking_arg(p)
    p.set_defaults(func=_run_ablate)


def _run_ablate(args: argparse.Namespace) -> None:
    from imtext.ablate import METRICS, read_plan, run_ablation, select, summarise
    from imtext.config import read_params, stage_config_from_params

    params = read_params(args.params)
    plan = select(read_plan(args.configs), args.only)
    table_dir = args.table_dir or args.out
    rows = run_ablation(
        params, plan, args.prepared, args.out, args.seeds, table_dir=table_dir,
        device=args.device, log=log.info,
    )  # fmt: skip
    log.info("ablation table: %s", table_dir / "ablation.md")
    if not args.mlflow:
        return
    from imtext.registry.ablation import log_ablation

    log_ablation(
        stage_config_from_params("register", params, str(args.params)),
        configurations=[(c.name, (*plan.common, *c.overrides)) for c in plan.configurations],
        rows=rows,
        summary=summarise(rows, plan),
        metrics=METRICS,
        tables=[table_dir / "ablation.md", table_dir / "ablation.csv"],
        tracking_uri=args.tracking_uri,
        log=log.info,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imtext",
        description="Train and ship image-text retrieval models (dual-path CNN, instance loss).",
    )
    parser.add_argument("--version", action="version", version=f"imtext {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = sub.add_parser("data", help="built-in datasets", description="Built-in datasets.")
    data_commands = data.add_subparsers(dest="dataset", required=True, metavar="COMMAND")
    _add_shapes(data_commands)
    _add_stats(data_commands)
    _add_prepare(sub)
    _add_train(sub, "pretrain")
    _add_train(sub, "finetune")
    _add_evaluate(sub)
    _add_export(sub)
    _add_register(sub)
    _add_promote(sub)
    _add_plots(sub)
    _add_ui(sub)
    _add_serve(sub)
    _add_ablate(sub)
    add_pipeline_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        status = args.func(args)
    except ImtextError as exc:
        if args.debug:
            raise
        # One line, whatever file names or keys the message quotes.
        print(f"imtext: error: {printable(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imtext: interrupted; outputs were left as they were", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
