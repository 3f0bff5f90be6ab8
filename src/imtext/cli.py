"""The ``imtext`` command line: one subcommand per stage, nothing but plumbing.

Errors caused by input or settings print one line (``imtext: error: ...``) and exit with status 1;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from imtext import __version__
from imtext.errors import ImtextError

log = logging.getLogger("imtext")


def _progress(items: Iterable, total: int, desc: str) -> Iterable:
    from tqdm import tqdm

    # tqdm hides itself when stderr is not a terminal (CI logs stay readable).
    return tqdm(items, total=total, desc=desc, unit="img", disable=None, leave=False)


def _add_shapes(sub: argparse._SubParsersAction) -> None:
    from imtext.data import shapes

    p = sub.add_parser(
        "shapes",
        help="render the built-in 'shapes' dataset in Karpathy format",
        description=(
            "Render scenes of coloured shapes with five paraphrased captions each and write them "
            "as OUT/dataset.json (Karpathy format, train/val/test splits) and OUT/images/*.png. "
            "The output is byte-for-byte the same for the same --images, --seed and --size; "
            "an existing OUT is replaced only once the new dataset is complete."
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
    p.set_defaults(func=_run_shapes)


def _run_shapes(args: argparse.Namespace) -> None:
    from imtext._fs import atomic_directory
    from imtext.data.shapes import generate_shapes

    def progress(items: Sequence) -> Iterable:
        return _progress(items, len(items), "render")

    with atomic_directory(args.out) as tmp:
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
            "'prepare' section of --params. OUT is replaced only when everything succeeded."
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
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "log.jsonl"

    def log_metrics(metrics: dict[str, float], step: int) -> None:
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args.func(args)
    except ImtextError as exc:
        if args.debug:
            raise
        print(f"imtext: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imtext: interrupted; outputs were left as they were", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
