"""The import rules of DESIGN.md ("who may import what"), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

SRC = REPO / "src" / "imtext"

#: module prefix -> top-level names (or imtext subpackages) it must not import.
FORBIDDEN = {
    "imtext.config": {
        "torch",
        "numpy",
        "mlflow",
        "kfp",
        "imtext.data",
        "imtext.models",
        "imtext.train",
    },
    "imtext.errors": {"torch", "numpy", "yaml", "mlflow", "kfp"},
    "imtext.data": {"mlflow", "kfp", "imtext.models", "imtext.losses", "imtext.train"},
    "imtext.losses": {"mlflow", "kfp", "imtext.data", "imtext.models", "imtext.train"},
    "imtext.eval.metrics": {"mlflow", "kfp", "imtext.data", "imtext.models", "imtext.train"},
    "imtext.eval.protocols": {"mlflow", "kfp", "imtext.data", "imtext.models", "imtext.train"},
    "imtext.models": {"mlflow", "kfp", "imtext.data", "imtext.losses", "imtext.train"},
    "imtext.train": {"mlflow", "kfp", "imtext.registry", "imtext.export"},
    "imtext.eval": {"mlflow", "kfp", "imtext.registry", "imtext.export", "imtext.train.loop"},
    # Export may rebuild a model (checkpoint) and embed splits (features), never train.
    "imtext.export": {"mlflow", "kfp", "imtext.registry", "imtext.train.loop"},
    "imtext.export.runtime": {"torch", "torchvision", "imtext.train", "imtext.models"},
    "imtext.registry": {"kfp", "imtext.train.loop", "imtext.eval.evaluate"},
}


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: module_name(p))
def test_module_respects_its_layer(path):
    module = module_name(path)
    names = imported_names(path)
    for prefix, forbidden in FORBIDDEN.items():
        if module == prefix or module.startswith(prefix + "."):
            bad = {n for n in names for f in forbidden if n == f or n.startswith(f + ".")}
            assert not bad, f"{module} imports {sorted(bad)}"
    assert not any(n.split(".")[0] in {"components", "pipelines"} for n in names)
