"""What an imtext process does about its own exit."""

from __future__ import annotations

import atexit
import gc


def skip_final_collection() -> None:
    """At this process's exit, freeze the heap before the interpreter tears it down, so that the
    garbage collector's last passes skip everything imported (torch, torchvision, MLflow).

    Exit handlers still run and every module is still finalized: only the collector's walk over
    hundreds of thousands of long-lived objects is skipped. A CLI command or pipeline step saves
    about 1 s of its exit (bench/bench_startup.py). Registering twice does no harm."""
    atexit.register(gc.freeze)
