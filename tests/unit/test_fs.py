from __future__ import annotations

import pytest

from imtext._fs import atomic_directory
from imtext.errors import ImtextError


def test_success_replaces_the_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        assert tmp != target and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_keeps_the_target_and_cleans_up(tmp_path, error):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(error), atomic_directory(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise error()
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


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
