from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest

from imtext._fs import MARKER, atomic_directory, check_output_dir, remove_abandoned
from imtext.errors import ImtextError


def names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def earlier_output(path, *files: str):
    """A directory as an earlier imtext run leaves it: marked, with ``files``."""
    path.mkdir(parents=True)
    (path / MARKER).write_text("x")
    for name in files:
        (path / name).write_text("old")
    return path


def test_success_replaces_an_earlier_output(tmp_path):
    target = earlier_output(tmp_path / "out", "old.txt")
    with atomic_directory(target) as tmp:
        assert tmp != target and names(tmp) == [MARKER]
        (tmp / "new.txt").write_text("new")
    assert names(target) == [MARKER, "new.txt"]
    assert names(tmp_path) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_keeps_the_target_and_cleans_up(tmp_path, error):
    target = earlier_output(tmp_path / "out", "old.txt")
    with pytest.raises(error), atomic_directory(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise error()
    assert names(target) == [MARKER, "old.txt"]
    assert names(tmp_path) == ["out"]


def test_creates_parents_and_refuses_a_file(tmp_path):
    with atomic_directory(tmp_path / "a" / "b") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "x").exists()
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(ImtextError, match="exists and is not a directory"),
        atomic_directory(tmp_path / "file"),
    ):
        pass


def test_a_foreign_directory_is_refused_before_the_work_and_kept(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "dataset.json").write_text("raw")
    ran = []
    with (
        pytest.raises(ImtextError, match=r"data: not empty and not written by imtext.*--force"),
        atomic_directory(target),
    ):
        ran.append(True)
    assert not ran and names(target) == ["dataset.json"]
    assert names(tmp_path) == ["data"]


def test_force_replaces_a_foreign_directory_and_an_empty_one_needs_no_force(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "dataset.json").write_text("raw")
    with atomic_directory(target, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert names(target) == [MARKER, "new.txt"]
    (tmp_path / "empty").mkdir()
    with atomic_directory(tmp_path / "empty") as tmp:
        (tmp / "new.txt").write_text("new")
    assert names(tmp_path / "empty") == [MARKER, "new.txt"]


@pytest.mark.parametrize("which", ["is", "holds"])
def test_an_output_that_is_or_holds_an_input_is_refused_even_with_force(tmp_path, which):
    raw = earlier_output(tmp_path / "raw", "dataset.json")  # even one imtext wrote
    (raw / "images").mkdir()
    source = raw / "images" if which == "is" else raw / "dataset.json"
    out = source if which == "is" else raw
    with pytest.raises(ImtextError, match=f"{which} .*an input of this run"):
        check_output_dir(out, inputs=[tmp_path / "other", source], force=True)
    with pytest.raises(ImtextError, match="an input"), atomic_directory(out, inputs=[source]):
        pass
    assert names(raw) == [MARKER, "dataset.json", "images"]


def test_the_current_directory_is_refused_without_leftovers(tmp_path, monkeypatch):
    work = earlier_output(tmp_path / "work", "x.txt")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        with (
            pytest.raises(ImtextError, match="current directory"),
            atomic_directory(out, force=True),
        ):
            pass
    assert names(tmp_path) == ["work"] and names(work) == [MARKER, "x.txt"]


KILLED_RUN = """
import os, sys
from imtext._fs import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"x")
    os.kill(os.getpid(), 9)
"""


def test_the_leftover_of_a_killed_run_is_removed_by_the_next(tmp_path):
    target = tmp_path / "prep"
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(target)], check=False)
    assert killed.returncode == -9
    [leftover] = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftover.name.startswith(".prep.")
    with atomic_directory(target) as tmp:
        (tmp / "done").write_text("x")
    assert names(tmp_path) == ["prep"]


def test_only_abandoned_leftovers_of_imtext_are_removed(tmp_path):
    target = tmp_path / "prep"
    abandoned, running, foreign, other = (
        tmp_path / ".prep.a1.tmp",
        tmp_path / ".prep.b2.tmp",
        tmp_path / ".prep.c3.tmp",  # same pattern, not imtext's: no marker
        tmp_path / ".other.d4.tmp",
    )
    for path in (abandoned, running, other):
        earlier_output(path)
    foreign.mkdir()
    lock = os.open(running, os.O_RDONLY)  # as a run still writing holds it
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert remove_abandoned(target) == [abandoned]
    finally:
        os.close(lock)
    assert names(tmp_path) == [".other.d4.tmp", ".prep.b2.tmp", ".prep.c3.tmp"]
