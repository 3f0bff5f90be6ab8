"""Where a benchmark's table goes: shared by the ``bench_*.py`` scripts. Not a benchmark itself."""

from __future__ import annotations

from pathlib import Path

#: Default home of the tables: artifacts/bench/NAME.md.
TABLES = Path(__file__).resolve().parents[1] / "artifacts" / "bench"


def print_and_write_table(table: str, name: str, out: Path | None, smoke: bool) -> Path | None:
    """Print ``table`` and write it to ``out``, by default ``artifacts/bench/NAME.md``. A smoke run
    writes only where ``out`` says, so it never replaces the last real table. Returns the file."""
    print(table)
    path = out or (None if smoke else TABLES / f"{name}.md")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table + "\n")
    return path
