"""Compile the pipeline for a cluster: ``python -m pipelines.compile [OUT]`` or
``imtext pipeline compile [--out OUT]``."""

import sys
from pathlib import Path

from kfp import compiler

from pipelines.imtext_pipeline import build_pipeline

DEFAULT_OUT = Path("imtext-pipeline.yaml")


def compile_pipeline(
    out: Path = DEFAULT_OUT, *, params: str | None = None, finetune_nodes: int = 1
) -> Path:
    """Write the pipeline's IR YAML to ``out`` and return its path.

    ``params`` is the text of a params.yaml compiled in as the default of the ``params`` argument
    (default: the repository's params.yaml); ``finetune_nodes`` > 1 makes Stage II a PyTorchJob
    of that many pods.
    """
    pipeline = build_pipeline(params, for_cluster=True, finetune_nodes=finetune_nodes)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(out))
    return out


if __name__ == "__main__":
    print(compile_pipeline(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
