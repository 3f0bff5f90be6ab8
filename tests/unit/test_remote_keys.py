"""Object keys of an S3 fetch map to files inside the destination, or fail naming the key."""

from __future__ import annotations

import pytest

from imtext.data.remote import local_path
from imtext.errors import DataError


@pytest.mark.parametrize(
    ("key", "parts"),
    [("d/a.png", ("a.png",)), ("d/images/sub/b.png", ("images", "sub", "b.png"))],
)
def test_plain_keys_map_below_the_destination(tmp_path, key, parts):
    assert local_path(tmp_path, "b", "d/", key) == tmp_path.joinpath(*parts)


@pytest.mark.parametrize(
    "key",
    [
        "d//etc/x",  # joins to the absolute path /etc/x
        "d/../x",
        "d/a/../../x",
        "d/a/./b",
        "d/a//b",
        "d/",
        "d/a\0b",
    ],
)
def test_keys_that_leave_the_destination_are_refused_by_name(tmp_path, key):
    with pytest.raises(DataError, match="object key does not name a file inside") as info:
        local_path(tmp_path / "raw", "b", "d/", key)
    assert f"s3://b/{key}".replace("\0", "\\x00") in str(info.value)


def test_a_symlink_in_the_destination_does_not_lead_out(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "raw" / "images").symlink_to(tmp_path / "outside")
    with pytest.raises(DataError, match="symbolic link"):
        local_path(tmp_path / "raw", "b", "d/", "d/images/x.png")


def test_a_key_with_control_characters_is_shown_escaped(tmp_path):
    with pytest.raises(DataError) as info:
        local_path(tmp_path, "b", "d/", "d/\x1b[31m\n/../x")
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    assert "\\x1b[31m\\n" in str(info.value)
