"""The stage commands: ``imtext data shapes|stats``, ``prepare``, ``pretrain``, ``finetune``,
``evaluate``, ``export`` and ``plots``. Each parses its flags, reads its config from --params and
calls one stage function."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path

from imtext.cli.flags import device_arg, force_arg, log, params_arg, prepared_arg, progress


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """``imtext data {shapes,stats}``."""
    data = sub.add_parser("data", help="built-in datasets", description="Built-in datasets.")
    data_commands = data.add_subparsers(dest="dataset", required=True, metavar="COMMAND")
    _add_shapes(data_commands)
    _add_stats(data_commands)


def add_stage_commands(sub: argparse._SubParsersAction) -> None:
    """``imtext prepare``, ``pretrain``, ``finetune``, ``evaluate`` and ``export``."""
    _add_prepare(sub)
    _add_train(sub, "pretrain")
    _add_train(sub, "finetune")
    _add_evaluate(sub)
    _add_export(sub)


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
    force_arg(p)
    p.set_defaults(func=_run_shapes)


def _run_shapes(args: argparse.Namespace) -> None:
    from imtext._fs import atomic_directory
    from imtext.data.shapes import generate_shapes

    def render_progress(items: Sequence) -> Iterable:
        return progress(items, len(items), "render")

    with atomic_directory(args.out, force=args.force) as tmp:
        sizes = generate_shapes(tmp, args.images, args.seed, args.size, render_progress)
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
    params_arg(p)
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip missing or unreadable images, empty captions and images without captions, "
        "listing each in the log and in OUT/meta.json, instead of stopping at the first",
    )
    force_arg(p)
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
        progress=progress,
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
    prepared_arg(p)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    if not stage_one:
        p.add_argument(
            "--init",
            type=Path,
            required=True,
            help="model file to start from (pretrain's model.pt)",
        )
    params_arg(p)
    device_arg(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt if there is one (same params required)",
    )
    p.set_defaults(func=_run_train, stage=stage)


def _run_train(args: argparse.Namespace) -> None:
    from imtext.config import load_stage_config
    from imtext.metrics_log import jsonl_metrics_log
    from imtext.train.loop import train_stage

    model_cfg = load_stage_config("model", args.params)
    cfg = load_stage_config(args.stage, args.params)
    metrics = train_stage(
        args.stage,
        model_cfg,
        cfg,
        args.prepared,
        args.out,
        init=getattr(args, "init", None),
        resume=args.resume,
        device=args.device,
        log=jsonl_metrics_log(args.out / "log.jsonl", args.stage),
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
    prepared_arg(p)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    params_arg(p)
    device_arg(p)
    force_arg(p)
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
    prepared_arg(p)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    params_arg(p)
    force_arg(p)
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from imtext.config import load_stage_config
    from imtext.export import export

    cfg = load_stage_config("export", args.params)
    export(cfg, args.model, args.prepared, args.out, log=log.info, force=args.force)


def add_plots_command(sub: argparse._SubParsersAction) -> None:
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
