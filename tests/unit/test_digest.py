"""data_digest of local data: DVC's directory hash, changed by any change of content or name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from imtext.data.digest import data_digest, s3_listing_entries
from imtext.errors import DataError
from tests.conftest import REPO


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "images" / "sub").mkdir(parents=True)
    (root / "dataset.json").write_text('{"images": []}')
    (root / "images" / "a.png").write_bytes(b"\x89PNG a")
    (root / "images" / "sub" / "b.png").write_bytes(b"\x89PNG b")
    return root


def test_a_directory_digest_is_dvcs_hash_of_the_file_list(folder):
    # DVC's format, worked by hand: md5 of the JSON list sorted by relpath, ".dir" appended.
    entries = [
        {"md5": hashlib.md5(b'{"images": []}').hexdigest(), "relpath": "dataset.json"},
        {"md5": hashlib.md5(b"\x89PNG a").hexdigest(), "relpath": "images/a.png"},
        {"md5": hashlib.md5(b"\x89PNG b").hexdigest(), "relpath": "images/sub/b.png"},
    ]
    expected = hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"
    assert data_digest(folder) == expected
    assert data_digest(f"file://{folder}") == expected


def test_the_marker_imtext_writes_is_left_out_as_dvcignore_leaves_it_out(folder):
    from imtext._fs import MARKER

    before = data_digest(folder)
    (folder / MARKER).write_text("written by imtext")
    assert data_digest(folder) == before
    assert MARKER in (REPO / ".dvcignore").read_text().split()


def test_any_change_of_content_or_name_changes_the_digest(folder):
    before = data_digest(folder)
    assert data_digest(folder) == before  # stable
    (folder / "images" / "a.png").write_bytes(b"\x89PNG A")  # same size, new content
    changed = data_digest(folder)
    assert changed != before
    (folder / "images" / "a.png").rename(folder / "images" / "c.png")
    assert data_digest(folder) not in (before, changed)
    (folder / "images" / "c.png").rename(folder / "images" / "a.png")
    assert data_digest(folder) == changed
    (folder / "extra.txt").write_text("x")
    assert data_digest(folder) != changed


def test_a_file_digest_is_its_md5(folder):
    assert data_digest(folder / "dataset.json") == hashlib.md5(b'{"images": []}').hexdigest()


def test_missing_or_empty_data_is_named(tmp_path):
    with pytest.raises(DataError, match="nope: no such file or directory"):
        data_digest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: empty directory"):
        data_digest(tmp_path / "empty")


def test_s3_entries_are_relative_sorted_and_skip_folder_markers():
    listing = [
        {"Key": "p/b.png", "Size": 3, "ETag": '"e2"'},
        {"Key": "p/images/", "Size": 0, "ETag": '"d41d"'},
        {"Key": "p/a.json", "Size": 5, "ETag": '"e1"'},
    ]
    assert s3_listing_entries(listing, "p/") == [
        {"etag": "e1", "key": "a.json", "size": 5},
        {"etag": "e2", "key": "b.png", "size": 3},
    ]
