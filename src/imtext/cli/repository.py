"""The part of ``imtext pipeline`` that imports the repository's ``pipelines/`` and
``components/``: they live outside the package (they import kfp at module level, and the package
must not import them), so they are loaded here with :mod:`importlib` from the repository root when
a subcommand runs.

This is the only module in ``src/`` that loads them, and it sits in the cli layer on purpose: the
import contracts (pyproject.toml, ``[tool.importlinter]``) cannot see an ``importlib`` call, so
they keep every layer below ``imtext.cli`` from importing this module instead.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from imtext.errors import ImtextError


def load_pipelines(repo: Path) -> ModuleType:
    """The ``pipelines`` package of the repository at ``repo`` (which also holds ``components``)."""
    repo = Path(repo).resolve()
    for package in ("pipelines", "components"):
        if not (repo / package / "__init__.py").is_file():
            raise ImtextError(
                f"{repo}: no {package}/ package here; run from the root of the imtext repository "
                "or pass --repo with its path"
            )
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    package = importlib.import_module("pipelines")
    where = Path(package.__file__).resolve().parent
    if where != repo / "pipelines":
        raise ImtextError(
            f"the module 'pipelines' was loaded from {where}, not from {repo}; "
            "run in a fresh process or pass --repo with the repository that holds it"
        )
    return package


def pipelines_module(repo: Path, name: str) -> ModuleType:
    """``pipelines.<name>`` of the repository at ``repo``."""
    load_pipelines(repo)
    return importlib.import_module(f"pipelines.{name}")


def call_pipelines(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call into ``pipelines/``, whose errors a user can act on are ``PipelineError``s."""
    errors = importlib.import_module("pipelines.errors")
    try:
        return func(*args, **kwargs)
    except errors.PipelineError as exc:
        raise ImtextError(str(exc)) from exc


def component_image() -> str:
    """The image the components run in (``components/image.py``; load the pipelines first)."""
    return importlib.import_module("components.image").IMAGE
