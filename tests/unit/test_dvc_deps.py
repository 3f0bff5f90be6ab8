"""dvc.yaml's ``deps`` cover the code of each stage, so that an edit to it reruns the stage.

A stage's code is the import closure of the modules its command runs, computed from the tree:

* **entry modules**: the stage's ``cmd`` is parsed by the real CLI parser
  (``imtext.cli.build_parser``), which names the function that runs the subcommand
  (``args.func``); the imtext modules imported inside that function, and inside the functions of
  its own module that it calls, are the entry modules (``imtext.data.prepare``,
  ``imtext.config``, ...);
* **closure**: from them, every import of an imtext module, at module level or inside a function
  (a lazy import runs when the stage takes that path), and the ``__init__.py`` of every package on
  the way (Python runs it on import). Imports under ``if TYPE_CHECKING:`` never run: left out.

The CLI package itself (the module of ``args.func`` and its package) is plumbing shared by every
stage: it is not followed, and not required as a dep, or any edit to a command's help text would
rerun every stage. Only imtext's own files count: the pinned libraries are requirements.lock's.
"""

from __future__ import annotations

import ast
import inspect
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

SRC = REPO / "src"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The source file of imtext module ``name`` in this tree, or None when it is not one."""
    if name.split(".")[0] != "imtext":
        return None
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def run_time_nodes(node: ast.AST):
    """The nodes below ``node``, less the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for c in child.orelse for n in [c, *run_time_nodes(c)])
            continue
        yield child
        yield from run_time_nodes(child)


def imported_modules(node: ast.AST, module: str) -> set[str]:
    """The imtext modules that the code of ``node`` (in module ``module``) imports."""
    is_package = module_file(module) is not None and module_file(module).name == "__init__.py"
    names = set()
    for child in run_time_nodes(node):
        if isinstance(child, ast.Import):
            names |= {alias.name for alias in child.names}
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                package = module.split(".")[: len(module.split(".")) - (not is_package)]
                package = package[: len(package) - (child.level - 1)]
                base = ".".join([*package, base] if base else package)
            names.add(base)
            # `from imtext.data import shapes` imports the module imtext.data.shapes.
            names |= {f"{base}.{alias.name}" for alias in child.names}
    return {name for name in names if module_file(name) is not None}


def with_packages(name: str) -> set[str]:
    """``name`` and every package above it (``imtext.data.prepare`` -> ``imtext.data``,
    ``imtext``): importing it runs their ``__init__.py``."""
    parts = name.split(".")
    return {".".join(parts[:n]) for n in range(1, len(parts) + 1)}


def import_closure(roots: set[str], outside: str) -> set[Path]:
    """The files of ``roots`` and of every imtext module they import, transitively; the package
    ``outside`` and its modules are not followed."""
    seen: set[str] = set()
    todo = [m for root in roots for m in with_packages(root)]
    while todo:
        name = todo.pop()
        if name in seen or name == outside or name.startswith(outside + "."):
            continue
        seen.add(name)
        tree = ast.parse(module_file(name).read_text())
        todo += [m for imported in imported_modules(tree, name) for m in with_packages(imported)]
    return {module_file(name) for name in seen}


def entry_modules(cmd: str) -> tuple[set[str], str]:
    """The imtext modules that the function running ``cmd`` imports (see the module docstring),
    and the CLI package it sits in."""
    from imtext.cli import build_parser

    argv = shlex.split(cmd)
    assert argv[0] == "imtext", f"{cmd!r}: a dvc.yaml stage runs `imtext <stage>`"
    run = inspect.unwrap(build_parser().parse_args(argv[1:]).func)
    tree = ast.parse(Path(inspect.getsourcefile(run)).read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    roots: set[str] = set()
    done: set[str] = set()
    todo = [run.__name__]
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        roots |= imported_modules(functions[name], run.__module__)
        todo += [
            call.func.id
            for call in ast.walk(functions[name])
            if isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id in functions
        ]
    cli_package = ".".join(run.__module__.split(".")[:2])
    return roots, cli_package


def stage_code(stage: str) -> set[Path]:
    roots, cli_package = entry_modules(STAGES[stage]["cmd"])
    assert roots, f"{stage}: its command imports no imtext module"
    return import_closure(roots, outside=cli_package)


def source_deps(stage: str) -> list[Path]:
    return [REPO / d for d in STAGES[stage].get("deps", []) if d.startswith("src/")]


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == dep or dep in path.parents for dep in deps)


def test_the_closure_follows_lazy_and_relative_imports_and_packages():
    code = stage_code("prepare")
    assert SRC / "imtext" / "data" / "prepare.py" in code  # the stage module
    assert SRC / "imtext" / "config.py" in code  # imported by the command itself
    assert SRC / "imtext" / "data" / "__init__.py" in code  # the package it sits in
    assert SRC / "imtext" / "__init__.py" in code
    assert not any(p.relative_to(SRC).parts[1] in {"cli", "cli.py"} for p in code)
    tree = ast.parse(
        "from . import text\nfrom .store import x\ndef f():\n    import imtext.losses\n"
    )
    assert imported_modules(tree, "imtext.data.prepare") == {
        "imtext.data",
        "imtext.data.text",
        "imtext.data.store",
        "imtext.losses",
    }
    typed = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import imtext.train\n"
    )
    assert imported_modules(typed, "imtext.serve.app") == set()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_cover_the_stage_import_closure(stage):
    deps = source_deps(stage)
    missing = sorted(str(p.relative_to(REPO)) for p in stage_code(stage) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} lacks deps on: {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_source_dep_exists_and_is_code_of_the_stage(stage):
    code = stage_code(stage)
    for dep in source_deps(stage):
        assert dep.exists(), f"dvc.yaml stage {stage!r}: dep {dep.relative_to(REPO)} is gone"
        used = any(path == dep or dep in path.parents for path in code)
        assert used, f"dvc.yaml stage {stage!r}: the stage never imports {dep.relative_to(REPO)}"
