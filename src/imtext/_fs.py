"""Output directories: written whole, replaced only when imtext wrote them.

A stage builds its output in a hidden sibling directory (``.NAME.*.tmp``) and swaps it in at the
end, so a failure leaves the previous output as it was. Swapping deletes the previous directory, so
it is allowed only for a directory that is new, empty or marked with :data:`MARKER` (which every
output gets); a directory that is, or holds, an input of the run is never replaced, and any other
non-empty directory only with ``force``.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from imtext.errors import ImtextError

#: File in every output directory that says imtext wrote it and may replace it.
MARKER = ".imtext-output"
MARKER_TEXT = "Written by imtext, which replaces this whole directory when it writes here again.\n"


def output_problem(target: Path, inputs: Sequence[Path] = (), force: bool = False) -> str | None:
    """Why a stage reading ``inputs`` must not replace the directory ``target``; ``None`` if it
    may (it is missing, empty, imtext's own, or ``force`` is set for a foreign one)."""
    target = Path(target)
    final = target.resolve()
    for path in inputs:
        source = Path(path).resolve()
        if source == final or source.is_relative_to(final):
            what = "is" if source == final else "holds"
            return (
                f"{target}: {what} {path}, an input of this run; replacing it would delete the "
                "input, choose another output directory"
            )
    cwd = Path.cwd().resolve()
    if cwd == final or cwd.is_relative_to(final):
        return (
            f"{target}: is the current directory or above it, which cannot be replaced while in "
            "use; choose a new subdirectory as the output"
        )
    if not final.exists():
        return None
    if not final.is_dir():
        return f"{target}: exists and is not a directory; choose another output path"
    if force or (final / MARKER).is_file() or not any(final.iterdir()):
        return None
    return (
        f"{target}: not empty and not written by imtext (no {MARKER} file); choose a new or empty "
        "directory, or pass --force to replace it and everything in it"
    )


def check_output_dir(target: Path, inputs: Sequence[Path] = (), force: bool = False) -> None:
    """Raise :class:`ImtextError` if ``target`` must not be replaced (see :func:`output_problem`).

    Stages call it before their work, so a refusal costs nothing; :func:`atomic_directory` checks
    again before it swaps.
    """
    problem = output_problem(target, inputs, force)
    if problem is not None:
        raise ImtextError(problem)


@contextmanager
def atomic_directory(
    target: Path, *, inputs: Sequence[Path] = (), force: bool = False
) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``target`` only if the block succeeds.

    A failed or interrupted run leaves the previous ``target`` untouched, so bad input never
    destroys earlier output. ``target`` is checked with :func:`check_output_dir` on entry and
    again before the swap. Leftovers of earlier runs killed before they could clean up (marked,
    and not locked by a run still going) are removed on entry.
    """
    check_output_dir(target, inputs, force)
    # Resolved, because "." has no name to build a sibling from and its parent is elsewhere.
    final = Path(target).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    # A lock on the directory tells other runs it is in use; the kernel drops it when this process
    # dies, however it dies, which is what makes a leftover recognisable.
    lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (tmp / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
        yield tmp
        # Written again: a stage may have emptied its directory (export keeps only the evidence).
        (tmp / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
        check_output_dir(target, inputs, force)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _publish(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` to ``final``, deleting what was there."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0o700 would hide the output from the group
    if not final.exists():
        tmp.rename(final)
        return
    old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
    final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)
        raise
    # Marked, so that a run killed during the removal leaves a leftover the next one removes.
    (old / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    shutil.rmtree(old)


def remove_abandoned(final: Path) -> list[Path]:
    """Remove the temporary siblings of ``final`` that runs killed before cleaning up left behind.

    Only imtext's own are touched: hidden ``.NAME.*.tmp`` / ``.NAME.*.old`` directories holding
    :data:`MARKER` whose lock no running process holds. Returns the directories removed.
    """
    removed = []
    for path in sorted(final.parent.glob(f".{glob.escape(final.name)}.*")):
        if path.suffix not in (".tmp", ".old") or path.is_symlink() or not path.is_dir():
            continue
        if (path / MARKER).is_file() and _unlocked(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _unlocked(path: Path) -> bool:
    """Whether no process holds the lock of the directory ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True
