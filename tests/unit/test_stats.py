from __future__ import annotations

import json

import pytest

from imtext.data.shapes import Scene, SceneObject, build_annotations
from imtext.data.stats import karpathy_stats
from imtext.errors import DataError


def _scene(background: str, *objects: tuple[str, str, int]) -> Scene:
    return Scene(
        background,
        "plain",
        tuple(
            SceneObject(shape, colour, "small", row, 0, 0.0, 0.0, 0.0)
            for colour, shape, row in objects
        ),
    )


def test_counts_near_duplicates_and_bag_of_words_twins(tmp_path):
    scenes = [
        ("train", _scene("white", ("red", "circle", 0), ("blue", "star", 1))),
        # colours swapped: same layout (near duplicate) and same bag of words
        ("test", _scene("black", ("red", "circle", 0), ("blue", "star", 1))),
        ("test", _scene("black", ("blue", "circle", 0), ("red", "star", 1))),
        ("test", _scene("black", ("green", "square", 2), ("red", "star", 1))),
    ]
    (tmp_path / "d.json").write_text(json.dumps(build_annotations(scenes, seed=0)))
    stats = karpathy_stats(tmp_path / "d.json")
    assert stats["images"] == {"train": 1, "test": 3}
    assert stats["captions"] == 20
    assert stats["objects_per_image"] == {2: 4}
    assert stats["test_images_with_near_duplicate"] == 2
    assert stats["test_images_bag_of_words_cannot_separate"] == 2


def test_plain_karpathy_file_has_no_scene_facts(karpathy_dir):
    stats = karpathy_stats(karpathy_dir / "dataset.json")
    assert stats["images"] == {"train": 2, "restval": 1, "val": 1, "test": 2}
    assert stats["caption_tokens"]["max"] == 5 and "objects_per_image" not in stats


def test_not_karpathy_is_a_clear_error(tmp_path):
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(DataError, match="no 'images' list"):
        karpathy_stats(tmp_path / "x.json")
