"""How an imtext process that runs one command or one pipeline step treats the garbage collector."""

from __future__ import annotations

import atexit
import gc

#: Collection thresholds for a short process: the youngest generation every 10,000 allocations
#: (CPython's default: 700), the older ones less often in turn.
SHORT_PROCESS_THRESHOLDS = (10_000, 50, 50)


def tune_collector_for_a_short_process() -> None:
    """Make the collector cheap for a process that imports torch, torchvision and MLflow, does one
    thing and exits (bench/bench_startup.py measures both effects):

    - collect less often: while those imports build the heap, the default thresholds walk it
      again and again, about 0.7 s of the 4 s the imports take;
    - at exit, freeze the heap before the interpreter tears it down, so that the last collections
      skip everything imported (1.3 s of a step's exit). Exit handlers still run and every module
      is still finalized.

    Values computed are the same; only when cyclic garbage is freed changes. Calling it twice does
    no harm."""
    gc.set_threshold(*SHORT_PROCESS_THRESHOLDS)
    atexit.register(gc.freeze)
