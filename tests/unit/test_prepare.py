from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from imtext._fs import MARKER
from imtext.data.prepare import encode_image, prepare
from imtext.data.store import PreparedSplit, read_meta, read_vocabulary
from imtext.data.text import UNK_ID
from imtext.errors import DataError
from tests.conftest import DEFAULT_PREPARE, write_image


def run(
    root,
    out,
    cfg=DEFAULT_PREPARE,
    fmt="karpathy",
    skip_bad=False,
    ann="dataset.json",
    images="images",
):
    logs: list[str] = []
    metrics = prepare(
        cfg, root / ann, root / images, out, fmt=fmt, skip_bad=skip_bad, log=logs.append
    )
    return metrics, logs


def assert_fails_then_skips_one(root, out, pattern: str) -> list[str]:
    """The bad training image stops the run with ``pattern``; ``--skip-bad`` drops just it."""
    with pytest.raises(DataError, match=pattern):
        run(root, out)
    metrics, logs = run(root, out, skip_bad=True)
    assert metrics["train_images"] == 2 and metrics["skipped"] == 1
    return logs


def test_karpathy_end_to_end(karpathy_dir, tmp_path):
    out = tmp_path / "prepared"
    metrics, _ = run(karpathy_dir, out)
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER, "meta.json", "test-images.bin", "test.npz", "train-images.bin", "train.npz",
        "val-images.bin", "val.npz", "vocab.json",
    ]  # fmt: skip
    assert metrics["train_images"] == 3 and metrics["train_captions"] == 6
    assert (
        metrics["val_images"] == 1 and metrics["test_images"] == 2 and metrics["test_captions"] == 3
    )
    assert metrics["max_len"] == 32
    train = PreparedSplit.load(out, "train")
    assert train.tokens.shape == (6, 32)
    assert train.caption_image.tolist() == [0, 0, 1, 1, 1, 2]
    assert train.image_labels.tolist() == [0, 1, 2]
    assert train.filenames.tolist() == ["img0.png", "sub/img1.png", "sub/img2.png"]
    assert [idx.tolist() for idx in train.captions_of_image()] == [[0, 1], [2, 3, 4], [5]]
    assert train.image(1).getpixel((0, 0)) == (40, 20, 170)
    assert read_meta(out)["config"] == dataclasses.asdict(DEFAULT_PREPARE)


def test_vocabulary_comes_from_train_only(karpathy_dir, tmp_path):
    metrics, _ = run(karpathy_dir, tmp_path / "out")
    vocab = read_vocabulary(tmp_path / "out")
    assert "zebra" not in vocab.words and "giraffe" not in vocab.words
    assert "red" in vocab.words and "star" in vocab.words  # "star" is only in a restval caption
    test = PreparedSplit.load(tmp_path / "out", "test")
    assert test.captions[0] == "a zebra circle"
    assert test.tokens[0, :3].tolist() == [vocab.id_of("a"), UNK_ID, vocab.id_of("circle")]
    assert metrics["train_unk_rate"] == 0.0 and metrics["test_unk_rate"] == pytest.approx(1 / 9)


def test_cuhk_labels_are_identities_and_length_is_56(cuhk_dir, tmp_path):
    metrics, _ = run(
        cuhk_dir, tmp_path / "out", fmt="cuhk-pedes", ann="reid_raw.json", images="imgs"
    )
    train = PreparedSplit.load(tmp_path / "out", "train")
    assert metrics["max_len"] == 56 and train.tokens.shape == (6, 56)
    # identities 7, 7, 3 -> dense labels in sorted order: 3 -> 0, 7 -> 1
    assert train.image_labels.tolist() == [1, 1, 0]
    assert train.caption_labels.tolist() == [1, 1, 1, 1, 0, 0]
    assert PreparedSplit.load(tmp_path / "out", "test").image_labels.tolist() == [0, 1]


def test_max_len_setting_overrides_format_default(karpathy_dir, tmp_path):
    cfg = dataclasses.replace(DEFAULT_PREPARE, max_len=3)
    metrics, _ = run(karpathy_dir, tmp_path / "out", cfg=cfg)
    train = PreparedSplit.load(tmp_path / "out", "train")
    assert train.tokens.shape[1] == 3 and metrics["train_truncated"] == 2


def test_large_images_are_downscaled_and_jpeg_is_supported(tmp_path):
    write_image(tmp_path / "big.png", size=(600, 300))
    encoded = encode_image(tmp_path / "big.png", 256, "jpeg")
    with Image.open(io.BytesIO(encoded)) as image:
        assert image.format == "JPEG" and image.size == (512, 256)
    with Image.open(io.BytesIO(encode_image(tmp_path / "big.png", 1000, "png"))) as image:
        assert image.size == (600, 300)


def test_missing_image_names_file_and_record(karpathy_dir, tmp_path):
    (karpathy_dir / "images" / "sub" / "img1.png").unlink()
    logs = assert_fails_then_skips_one(
        karpathy_dir,
        tmp_path / "out",
        r"sub/img1\.png: image file not found \(.*record 1 \(imgid 1, img1\.png\)\); check --images or pass --skip-bad",
    )
    assert any("img1.png: image file not found" in line for line in logs)
    assert len(read_meta(tmp_path / "out")["skipped"]) == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_image_names_file(karpathy_dir, tmp_path, damage):
    path = karpathy_dir / "images" / "img0.png"
    if damage == "garbage":
        path.write_bytes(b"this is not an image")
    elif damage == "truncated":
        Image.effect_noise((64, 64), 50).convert("RGB").save(path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(b"")
    assert_fails_then_skips_one(
        karpathy_dir,
        tmp_path / "out",
        r"img0\.png: image cannot be decoded .*record 0 .*replace the file or pass --skip-bad",
    )


def test_failure_leaves_previous_output_untouched(karpathy_dir, tmp_path):
    out = tmp_path / "outputs" / "out"
    run(karpathy_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (karpathy_dir / "images" / "img5.png").write_bytes(b"broken")
    with pytest.raises(DataError):
        run(karpathy_dir, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no temporary leftovers


def test_missing_images_directory_and_empty_train_split(karpathy_dir, tmp_path):
    with pytest.raises(DataError, match="image directory not found; check --images"):
        run(karpathy_dir, tmp_path / "out", images="nope")
    data = json.loads((karpathy_dir / "dataset.json").read_text())
    data["images"] = [im for im in data["images"] if im["split"] == "test"]
    (karpathy_dir / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="no usable training images"):
        run(karpathy_dir, tmp_path / "out")


def test_output_is_deterministic(karpathy_dir, tmp_path):
    run(karpathy_dir, tmp_path / "a")
    run(karpathy_dir, tmp_path / "b")
    for split in ("train", "val", "test"):
        a, b = PreparedSplit.load(tmp_path / "a", split), PreparedSplit.load(tmp_path / "b", split)
        assert np.array_equal(a.tokens, b.tokens)
        assert (tmp_path / "a" / f"{split}-images.bin").read_bytes() == (
            tmp_path / "b" / f"{split}-images.bin"
        ).read_bytes()


def test_an_empty_split_is_written_and_warned_about(karpathy_dir, tmp_path):
    data = json.loads((karpathy_dir / "dataset.json").read_text())
    data["images"] = [im for im in data["images"] if im["split"] != "val"]
    (karpathy_dir / "dataset.json").write_text(json.dumps(data))
    metrics, logs = run(karpathy_dir, tmp_path / "out")
    assert metrics["val_images"] == 0 and metrics["val_captions"] == 0
    assert any("warning: the val split" in line for line in logs)
    val = PreparedSplit.load(tmp_path / "out", "val")
    assert val.n_images == 0 and val.tokens.shape == (0, 32)


def set_record(root, index: int, **fields) -> None:
    data = json.loads((root / "dataset.json").read_text())
    data["images"][index].update(fields)
    (root / "dataset.json").write_text(json.dumps(data))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_an_image_outside_the_images_folder_is_refused_or_skipped(karpathy_dir, tmp_path, how):
    secret = write_image(tmp_path / "private" / "secret.png")  # a readable image, outside
    if how == "dotdot":
        set_record(karpathy_dir, 0, filepath="../private", filename="secret.png")
    elif how == "absolute":
        set_record(karpathy_dir, 0, filename=str(secret))
    else:
        (karpathy_dir / "images" / "img0.png").unlink()
        (karpathy_dir / "images" / "img0.png").symlink_to(secret)
    logs = assert_fails_then_skips_one(
        karpathy_dir,
        tmp_path / "out",
        r"record 0 \(imgid 0, .*\): image path '.*' leads outside --images .*move the file there "
        "or pass --skip-bad",
    )
    assert any("leads outside --images" in line for line in logs)
    assert "secret.png" not in " ".join(PreparedSplit.load(tmp_path / "out", "train").filenames)


def test_refusing_an_outside_path_does_not_tell_whether_the_file_exists(karpathy_dir, tmp_path):
    messages = {}
    for name in ("passwd", "no-such-file"):
        set_record(karpathy_dir, 0, filepath="../../../../../../../../etc", filename=name)
        with pytest.raises(DataError) as info:
            run(karpathy_dir, tmp_path / "out")
        messages[name] = str(info.value).replace(name, "NAME")
    assert messages["passwd"] == messages["no-such-file"]
    assert "leads outside" in messages["passwd"] and "decoded" not in messages["passwd"]


def test_a_symlink_to_an_image_inside_the_folder_is_fine(karpathy_dir, tmp_path):
    (karpathy_dir / "images" / "img0.png").rename(karpathy_dir / "images" / "sub" / "real.png")
    (karpathy_dir / "images" / "img0.png").symlink_to(karpathy_dir / "images" / "sub" / "real.png")
    metrics, _ = run(karpathy_dir, tmp_path / "out")
    assert metrics["train_images"] == 3


@pytest.mark.filterwarnings("error")  # no Pillow warning either: the message says it all
def test_a_decompression_bomb_is_refused_or_skipped(karpathy_dir, tmp_path):
    Image.new("1", (10_000, 10_000)).save(karpathy_dir / "images" / "img0.png")
    assert_fails_then_skips_one(
        karpathy_dir,
        tmp_path / "out",
        r"img0\.png: image of 10000 x 10000 pixels is too large.*downscale it \(.*record 0 .*\); "
        "replace the file or pass --skip-bad",
    )


def test_skip_messages_do_not_suggest_skip_bad(karpathy_dir, tmp_path):
    data = json.loads((karpathy_dir / "dataset.json").read_text())
    data["images"][0]["sentences"].append({"raw": "  "})  # an empty caption
    data["images"][3]["sentences"] = []  # an image without captions
    data["images"][4]["filename"] = "missing.png"
    data["images"][5]["filepath"] = ".."  # outside
    (karpathy_dir / "dataset.json").write_text(json.dumps(data))
    (karpathy_dir / "images" / "img0.png").write_bytes(b"junk")
    metrics, logs = run(karpathy_dir, tmp_path / "out", skip_bad=True)
    skipped = read_meta(tmp_path / "out")["skipped"]
    assert metrics["skipped"] == len(skipped) == 5
    assert [line for line in logs if line.startswith("skipped:")] == [
        f"skipped: {s}" for s in skipped
    ]
    assert not [s for s in skipped if "skip-bad" in s]


def test_control_characters_in_a_file_name_are_escaped(karpathy_dir, tmp_path):
    set_record(karpathy_dir, 0, filename="evil\n\x1b[2J\u202eimage.png")
    with pytest.raises(DataError) as info:
        run(karpathy_dir, tmp_path / "out")
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    assert "evil\\n\\x1b[2J\\u202eimage.png" in str(info.value)
    _, logs = run(karpathy_dir, tmp_path / "out", skip_bad=True)
    assert [line for line in logs if "evil" in line] and not [
        line for line in logs if "\n" in line or "\x1b" in line or "\u202e" in line
    ]


def test_running_again_replaces_its_own_output(karpathy_dir, tmp_path):
    run(karpathy_dir, tmp_path / "out")
    (karpathy_dir / "images" / "img5.png").unlink()
    metrics, _ = run(karpathy_dir, tmp_path / "out", skip_bad=True)
    assert metrics["test_images"] == 1
