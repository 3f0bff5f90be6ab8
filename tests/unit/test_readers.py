from __future__ import annotations

import json

import pytest

from imtext.data.readers import read_annotations
from imtext.errors import DataError
from tests.conftest import karpathy_image


def read(path, fmt="karpathy", skip_bad=False, per_image=5, restval=True):
    skipped: list[str] = []
    records = read_annotations(
        path,
        fmt,
        captions_per_image=per_image,
        use_restval=restval,
        skip_bad=skip_bad,
        report=skipped.append,
    )
    return records, skipped


def write(tmp_path, content, name="ann.json"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


def test_karpathy_reads_splits_filepath_and_restval(karpathy_dir):
    records, skipped = read(karpathy_dir / "dataset.json")
    assert [r.split for r in records] == ["train", "train", "train", "val", "test", "test"]
    assert [r.relpath for r in records[:3]] == ["img0.png", "sub/img1.png", "sub/img2.png"]
    assert records[1].captions == ("a blue circle", "one blue disc", "a circle")
    assert all(r.identity is None for r in records) and skipped == []


def test_karpathy_without_restval_and_caption_cap(karpathy_dir):
    records, _ = read(karpathy_dir / "dataset.json", restval=False, per_image=2)
    assert [r.relpath for r in records].count("sub/img2.png") == 0
    assert records[1].captions == ("a blue circle", "one blue disc")


def test_karpathy_tokens_only_sentences_are_joined(tmp_path):
    entry = karpathy_image(0, "train", ["x"])
    entry["sentences"] = [{"tokens": ["a", "dog"]}]
    records, _ = read(write(tmp_path, {"images": [entry]}))
    assert records[0].captions == ("a dog",)


def test_cuhk_reads_identities(cuhk_dir):
    records, _ = read(cuhk_dir / "reid_raw.json", fmt="cuhk-pedes")
    assert [r.identity for r in records] == [7, 7, 3, 11, 20, 21]
    assert records[0].relpath == "CUHK01/a.png"
    assert records[0].captions == ("a man in a red shirt", "red shirt and jeans")


def test_whitespace_in_captions_is_normalised(tmp_path):
    path = write(tmp_path, {"images": [karpathy_image(0, "train", ["  a \n red\tsquare "])]})
    assert read(path)[0][0].captions == ("a red square",)


# ---- bad input: each names the file and record and says what to do -------------------------


def test_missing_annotation_file(tmp_path):
    with pytest.raises(
        DataError, match=r"nope\.json: annotation file not found; check --annotations"
    ):
        read(tmp_path / "nope.json")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read(tmp_path)


def test_non_utf8_text(tmp_path):
    path = write(tmp_path, b'{"images": [\n{"filename": "caf' + b"\xe9" + b'.png"}]}')
    with pytest.raises(
        DataError, match=r"ann\.json: not UTF-8 text \(byte 0xe9 at offset 30, line 2\)"
    ):
        read(path)


def test_malformed_json(tmp_path):
    path = write(tmp_path, '{"images": [}')
    with pytest.raises(DataError, match=r"ann\.json: malformed JSON at line 1 column 13"):
        read(path)


def test_truncated_json_says_so(tmp_path):
    text = json.dumps({"images": [karpathy_image(0, "train", ["a b"])]})
    path = write(tmp_path, text[: len(text) // 2])
    with pytest.raises(DataError, match="looks truncated"):
        read(path)


def test_wrong_format_suggests_the_other(tmp_path, cuhk_dir, karpathy_dir):
    with pytest.raises(DataError, match="pass --format cuhk-pedes"):
        read(cuhk_dir / "reid_raw.json", fmt="karpathy")
    with pytest.raises(DataError, match="pass --format karpathy"):
        read(karpathy_dir / "dataset.json", fmt="cuhk-pedes")
    with pytest.raises(DataError, match="no 'images' list"):
        read(write(tmp_path, {"pictures": []}))


def test_missing_field_names_record_and_field(tmp_path):
    entry = karpathy_image(4, "train", ["a b"])
    del entry["split"]
    with pytest.raises(DataError, match=r"record 0 \(imgid 4, img4\.png\): missing field 'split'"):
        read(write(tmp_path, {"images": [entry]}))
    entry = karpathy_image(4, "train", ["a b"])
    entry["sentences"] = "a b"
    with pytest.raises(DataError, match="field 'sentences' has type str"):
        read(write(tmp_path, {"images": [entry]}))


def test_duplicate_image_id(tmp_path):
    images = [karpathy_image(3, "train", ["a"]), karpathy_image(3, "val", ["b"])]
    images[1]["filename"] = "other.png"
    with pytest.raises(
        DataError, match=r"record 1 \(imgid 3, other\.png\): duplicate image id 3 \(also record 0\)"
    ):
        read(write(tmp_path, {"images": images}))


def test_duplicate_cuhk_image(tmp_path):
    row = {"split": "train", "captions": ["a"], "file_path": "x/a.png", "id": 1}
    with pytest.raises(DataError, match=r"record 1 \(x/a\.png\): duplicate image"):
        read(write(tmp_path, [row, row]), fmt="cuhk-pedes")


@pytest.mark.parametrize("fmt", ["karpathy", "cuhk-pedes"])
def test_unknown_split(tmp_path, fmt):
    if fmt == "karpathy":
        content = {"images": [karpathy_image(0, "training", ["a"])]}
    else:
        content = [{"split": "restval", "captions": ["a"], "file_path": "a.png", "id": 1}]
    with pytest.raises(
        DataError, match=r"record 0 .*unknown split '(training|restval)'; expected one of"
    ):
        read(write(tmp_path, content), fmt=fmt)


def test_empty_caption_fails_or_is_skipped(tmp_path):
    path = write(tmp_path, {"images": [karpathy_image(0, "train", ["a dog", "   "])]})
    with pytest.raises(
        DataError, match=r"record 0 \(imgid 0, img0\.png\): caption 1 is empty; .*--skip-bad"
    ):
        read(path)
    records, skipped = read(path, skip_bad=True)
    assert records[0].captions == ("a dog",)
    assert len(skipped) == 1 and "caption 1 is empty" in skipped[0]


def test_image_without_captions_fails_or_is_skipped(tmp_path):
    images = [karpathy_image(0, "train", ["a dog"]), karpathy_image(1, "train", [])]
    path = write(tmp_path, {"images": images})
    with pytest.raises(
        DataError, match=r"record 1 \(imgid 1, img1\.png\): the image has no captions"
    ):
        read(path)
    records, skipped = read(path, skip_bad=True)
    assert [r.relpath for r in records] == ["img0.png"] and len(skipped) == 1


def test_only_empty_captions_means_no_captions_when_skipping(tmp_path):
    path = write(tmp_path, {"images": [karpathy_image(0, "train", ["", " "])]})
    records, skipped = read(path, skip_bad=True)
    assert records == [] and len(skipped) == 3


def test_cuhk_non_string_caption(tmp_path):
    row = {"split": "train", "captions": ["a", 5], "file_path": "a.png", "id": 1}
    with pytest.raises(DataError, match=r"record 0 \(a\.png\): caption 1 is not a string"):
        read(write(tmp_path, [row]), fmt="cuhk-pedes")


def test_punctuation_only_caption_counts_as_empty(tmp_path):
    path = write(tmp_path, {"images": [karpathy_image(0, "train", ["a dog", " ... !"])]})
    with pytest.raises(DataError, match=r"caption 1 has no words \('\.\.\. !'\)"):
        read(path)
    assert read(path, skip_bad=True)[0][0].captions == ("a dog",)


def test_an_unhashable_image_id_is_a_data_error(tmp_path):
    entry = karpathy_image(4, "train", ["a b"])
    entry["imgid"] = [1, 2]
    with pytest.raises(DataError, match=r"record 0: field 'imgid' has type list"):
        read(write(tmp_path, {"images": [entry]}))


BAD_VALUES = [[1, 2], {"a": 1}, None, 1.5, True]


@pytest.mark.parametrize(
    "field", ["filename", "imgid", "split", "sentences", "filepath", "sentences.0", "raw"]
)
@pytest.mark.parametrize("value", BAD_VALUES, ids=lambda v: type(v).__name__)
def test_any_json_value_in_a_karpathy_field_is_a_data_error_or_accepted(tmp_path, field, value):
    """A wrong type anywhere stops the run with a DataError naming the record, never a crash."""
    entry = karpathy_image(4, "train", ["a b"], filepath="sub")
    if field == "sentences.0":
        entry["sentences"][0] = value
    elif field == "raw":
        entry["sentences"][0]["raw"] = value
    else:
        entry[field] = value
    try:
        read(write(tmp_path, {"images": [entry]}))
    except DataError as exc:
        assert "record 0" in str(exc)


@pytest.mark.parametrize("field", ["file_path", "split", "id", "captions", "captions.0"])
@pytest.mark.parametrize("value", BAD_VALUES, ids=lambda v: type(v).__name__)
def test_any_json_value_in_a_cuhk_field_is_a_data_error(tmp_path, field, value):
    row = {"split": "train", "captions": ["a"], "file_path": "a.png", "id": 1}
    if field == "captions.0":
        row["captions"][0] = value
    else:
        row[field] = value
    with pytest.raises(DataError, match="record 0"):
        read(write(tmp_path, [row]), fmt="cuhk-pedes")


def test_control_characters_in_names_are_escaped_in_messages(tmp_path):
    entry = karpathy_image(4, "train", ["a b"])
    entry["filename"] = "a\nb\x1b[31m.png"
    entry["sentences"] = []
    with pytest.raises(DataError) as info:
        read(write(tmp_path, {"images": [entry]}))
    assert r"(imgid 4, a\nb\x1b[31m.png)" in str(info.value)
    _, skipped = read(write(tmp_path, {"images": [entry]}), skip_bad=True)
    assert skipped == [
        f"{tmp_path / 'ann.json'}: record 0 (imgid 4, a\\nb\\x1b[31m.png): the image has no "
        "captions; add captions"
    ]
