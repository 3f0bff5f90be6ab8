"""Functions short enough to read at once (DESIGN.md, style 2): none in src/ over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

MAX_LINES = 80


def function_lengths(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines from ``def`` to the last line of the body) of every function and
    method in ``path``, nested ones included."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                found.append((name, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text()), "")
    return found


def test_function_lengths_are_measured_from_def_to_last_line(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "class A:\n"
        "    @staticmethod\n"
        "    def f():\n"
        "        def g():\n"
        "            return 1\n"
        "\n"
        "        return g\n"
    )
    assert function_lengths(source) == [("A.f", 5), ("A.f.g", 2)]


def test_no_function_in_src_is_over_80_lines():
    too_long = [
        f"{path.relative_to(REPO)}:{name} ({lines} lines)"
        for path in sorted((REPO / "src").rglob("*.py"))
        for name, lines in function_lengths(path)
        if lines > MAX_LINES
    ]
    assert not too_long, "over 80 lines:\n" + "\n".join(too_long)
