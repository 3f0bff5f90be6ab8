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
