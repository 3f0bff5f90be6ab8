"""The ``imtext`` console script end to end on tiny data, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imtext.data.store import PreparedSplit, read_meta
from tests.conftest import REPO, write_params

IMTEXT = str(Path(sys.executable).parent / "imtext")


def imtext(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [IMTEXT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_explains_every_command():
    top = imtext("--help")
    assert top.returncode == 0 and "prepare" in top.stdout and "data" in top.stdout
    shapes = imtext("data", "shapes", "--help")
    assert "byte-for-byte" in shapes.stdout and "--seed" in shapes.stdout
    prepare = " ".join(imtext("prepare", "--help").stdout.split())  # undo argparse's wrapping
    assert "--skip-bad" in prepare and "training split only" in prepare


def test_every_stage_and_tool_is_a_subcommand_with_help():
    top = imtext("--help").stdout
    for command in "evaluate export register promote plots ui serve pipeline ablate".split():
        assert f"    {command} " in top, f"`imtext {command}` is missing from imtext --help"
    pipeline = imtext("pipeline", "--help").stdout
    assert all(c in pipeline for c in ("compile", "run", "submit"))
    promote = " ".join(imtext("promote", "--help").stdout.split())
    assert "status 3" in promote and "--force REASON" in promote


def test_shapes_then_prepare(tmp_path):
    gen = imtext(
        "data", "shapes", "--out", tmp_path / "shapes", "--images", 36, "--seed", 1, "--size", 48
    )
    assert gen.returncode == 0, gen.stderr
    assert "train 24, val 6, test 6" in gen.stderr
    out = tmp_path / "prepared"
    prep = imtext(
        "prepare",
        "--annotations", tmp_path / "shapes" / "dataset.json",
        "--images", tmp_path / "shapes" / "images",
        "--out", out,
        "--params", REPO / "params.yaml",
    )  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    assert "prepared train 24 images, val 6 images, test 6 images" in prep.stderr
    assert read_meta(out)["metrics"]["test_captions"] == 30
    test = PreparedSplit.load(out, "test")
    assert test.n_images == 6 and test.image(0).size == (48, 48)


def _assert_one_line_error(result, *fragments):
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("imtext: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def test_bad_input_is_one_line_without_traceback_unless_debug(karpathy_dir, tmp_path):
    (karpathy_dir / "images" / "img0.png").write_bytes(b"junk")
    args = [
        "prepare",
        "--annotations", karpathy_dir / "dataset.json",
        "--images", karpathy_dir / "images",
        "--out", tmp_path / "out",
        "--params", REPO / "params.yaml",
    ]  # fmt: skip
    _assert_one_line_error(imtext(*args), "img0.png: image cannot be decoded", "--skip-bad")
    assert not (tmp_path / "out").exists()
    debug = imtext("--debug", *args)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    skipped = imtext(*args, "--skip-bad")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped:" in skipped.stderr and "skipped 1" in skipped.stderr


def test_malformed_annotations_and_wrong_setting(karpathy_dir, tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [')
    result = imtext(
        "prepare", "--annotations", tmp_path / "bad.json", "--images", karpathy_dir / "images",
        "--out", tmp_path / "out", "--params", REPO / "params.yaml",
    )  # fmt: skip
    _assert_one_line_error(result, "bad.json: malformed JSON", "truncated")
    params = write_params(tmp_path / "params.yaml", min_count=0)
    result = imtext(
        "prepare", "--annotations", karpathy_dir / "dataset.json", "--images", karpathy_dir / "images",
        "--out", tmp_path / "out", "--params", params,
    )  # fmt: skip
    _assert_one_line_error(result, "prepare.min_count: must be at least 1")


def test_wrong_flags_are_usage_errors(tmp_path):
    result = imtext("data", "shapes", "--out", tmp_path, "--images", "many")
    assert result.returncode == 2 and "invalid int value: 'many'" in result.stderr
    _assert_one_line_error(
        imtext("data", "shapes", "--out", tmp_path / "s", "--images", 2), "--images 2"
    )
    result = imtext(
        "prepare", "--annotations", "a.json", "--images", ".", "--out", tmp_path, "--format", "coco"
    )
    assert result.returncode == 2 and "invalid choice: 'coco'" in result.stderr


@pytest.mark.parametrize("fmt", ["cuhk-pedes"])
def test_cuhk_format_flag(cuhk_dir, tmp_path, fmt):
    result = imtext(
        "prepare", "--annotations", cuhk_dir / "reid_raw.json", "--images", cuhk_dir / "imgs",
        "--out", tmp_path / "out", "--format", fmt, "--params", REPO / "params.yaml",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["metrics"]["max_len"] == 56


def _raw_files(root: Path) -> dict[str, bytes]:
    """The raw data of a fixture directory: its annotation file and images."""
    files = [root / "dataset.json", *sorted((root / "images").rglob("*.png"))]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_out_never_deletes_an_input_or_a_directory_imtext_did_not_write(karpathy_dir, tmp_path):
    raw = _raw_files(karpathy_dir)
    prepare = [
        "prepare",
        "--annotations", karpathy_dir / "dataset.json",
        "--images", karpathy_dir / "images",
        "--params", REPO / "params.yaml",
    ]  # fmt: skip
    _assert_one_line_error(imtext(*prepare, "--out", karpathy_dir), "holds", "an input")
    _assert_one_line_error(
        imtext(*prepare, "--out", karpathy_dir / "images", "--force"), "is", "an input"
    )
    shapes = ["data", "shapes", "--images", 12, "--size", 16]
    _assert_one_line_error(
        imtext(*shapes, "--out", karpathy_dir), "not written by imtext", "--force"
    )
    assert _raw_files(karpathy_dir) == raw

    prepared = tmp_path / "prepared"
    assert imtext(*prepare, "--out", prepared).returncode == 0
    assert imtext(*prepare, "--out", prepared).returncode == 0, "its own output is replaced"
    listing = sorted(p.name for p in prepared.iterdir())
    for stage in ("evaluate", "export"):
        result = imtext(
            stage, "--model", tmp_path / "model.pt", "--prepared", prepared, "--out", prepared,
            "--params", REPO / "params.yaml",
        )  # fmt: skip
        _assert_one_line_error(result, "an input of this run")
    assert sorted(p.name for p in prepared.iterdir()) == listing
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old"))] == []


def test_out_dot_is_refused_at_once_and_leaves_no_copy(karpathy_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = imtext(
        "prepare", "--annotations", karpathy_dir / "dataset.json", "--images",
        karpathy_dir / "images", "--out", ".", "--params", REPO / "params.yaml", cwd=work,
    )  # fmt: skip
    _assert_one_line_error(result, "current directory")
    assert not list(work.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_file_name_with_control_characters_stays_one_escaped_line(karpathy_dir, tmp_path):
    data = json.loads((karpathy_dir / "dataset.json").read_text())
    data["images"][0]["filename"] = "evil\n\x1b[2J\x1b[31mfake.png"
    (karpathy_dir / "dataset.json").write_text(json.dumps(data))
    result = imtext(
        "prepare", "--annotations", karpathy_dir / "dataset.json", "--images",
        karpathy_dir / "images", "--out", tmp_path / "out", "--params", REPO / "params.yaml",
    )  # fmt: skip
    _assert_one_line_error(result, "evil\\n\\x1b[2J\\x1b[31mfake.png", "image file not found")
    assert "\x1b" not in result.stderr


def test_an_unavailable_device_leaves_no_output_directory(tmp_path, monkeypatch):
    import torch

    from imtext.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for stage in ("pretrain", "finetune"):
        out = tmp_path / stage
        args = [stage, "--prepared", tmp_path / "prepared", "--out", out, "--device", "cuda"]
        if stage == "finetune":
            args += ["--init", tmp_path / "model.pt"]
        assert main([*map(str, args), "--params", str(REPO / "params.yaml")]) == 1
        assert not out.exists()
