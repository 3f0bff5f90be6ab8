"""The ``imtext`` command line: one subcommand per stage, nothing but plumbing.

Errors caused by input or settings print one line (``imtext: error: ...``) and exit with status 1;
``--debug`` shows the traceback instead. The subcommands are defined by theme: :mod:`.stages`
(data, prepare, training, evaluate, export, plots), :mod:`.register` (register, promote),
:mod:`.serve` (ui, serve), :mod:`.ablate` and :mod:`.pipeline`; nothing below this package sees
an argparse namespace.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from imtext import __version__
from imtext._process import tune_collector_for_a_short_process
from imtext.cli.ablate import add_ablate_command
from imtext.cli.pipeline import add_pipeline_parser
from imtext.cli.register import add_registry_commands
from imtext.cli.serve import add_serving_commands
from imtext.cli.stages import add_data_commands, add_plots_command, add_stage_commands
from imtext.errors import ImtextError, printable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imtext",
        description="Train and ship image-text retrieval models (dual-path CNN, instance loss).",
    )
    parser.add_argument("--version", action="version", version=f"imtext {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(sub)
    add_stage_commands(sub)
    add_registry_commands(sub)
    add_plots_command(sub)
    add_serving_commands(sub)
    add_ablate_command(sub)
    add_pipeline_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    tune_collector_for_a_short_process()
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
