"""Compile the pipeline for a cluster: ``python -m pipelines.compile [OUT]`` or
``imtext pipeline compile [--out OUT]``."""

import sys
from pathlib import Path

from kfp import compiler

from pipelines.imtext_pipeline import build_pipeline

DEFAULT_OUT = Path("imtext-pipeline.yaml")


def compile_pipeline(out: Path = DEFAULT_OUT, *, params: str | None = None) -> Path:
    """Write the pipeline's IR YAML to ``out`` and return its path.

    ``params`` is the text of a params.yaml compiled in as the default of the ``params`` argument
    (default: the repository's params.yaml).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(params, for_cluster=True), str(out))
    return out


if __name__ == "__main__":
    print(compile_pipeline(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
