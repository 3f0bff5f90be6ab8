from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from imtext.data import shapes
from imtext.data.shapes import (
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    SHAPE_WORDS,
    SceneObject,
    generate_shapes,
    perturb_scene,
    sample_scene,
    sample_scenes,
    scene_captions,
    split_sizes,
)
from imtext.data.text import tokenize
from imtext.errors import ConfigError


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_generation_is_byte_for_byte_deterministic(tmp_path):
    generate_shapes(tmp_path / "a", n_images=30, seed=5, size=64)
    generate_shapes(tmp_path / "b", n_images=30, seed=5, size=64)
    generate_shapes(tmp_path / "c", n_images=30, seed=6, size=64)
    a, b, c = (tree_digest(tmp_path / x) for x in "abc")
    assert len(a) == 31 and a == b
    assert a["dataset.json"] != c["dataset.json"]
    assert a["images/000000.png"] != c["images/000000.png"]


def test_karpathy_layout_and_splits(tmp_path):
    sizes = generate_shapes(tmp_path, n_images=60, seed=0, size=48)
    data = json.loads((tmp_path / "dataset.json").read_text())
    assert sizes == {"train": 40, "val": 10, "test": 10}
    assert data["dataset"] == "shapes"
    assert [im["split"] for im in data["images"]] == ["train"] * 40 + ["val"] * 10 + ["test"] * 10
    sentids = [s["sentid"] for im in data["images"] for s in im["sentences"]]
    assert sentids == list(range(300))
    for im in data["images"]:
        assert (tmp_path / "images" / im["filename"]).is_file()
        assert len(im["sentences"]) == 5 and im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert all(
            s["imgid"] == im["imgid"] and s["tokens"] == tokenize(s["raw"]) for s in im["sentences"]
        )


def test_split_sizes_cap_eval_at_1000():
    assert split_sizes(6000) == {"train": 4000, "val": 1000, "test": 1000}
    assert split_sizes(20000) == {"train": 18000, "val": 1000, "test": 1000}
    assert split_sizes(6) == {"train": 4, "val": 1, "test": 1}


def _mentions(words: list[str], phrase: str) -> bool:
    target = tokenize(phrase)
    return any(words[i : i + len(target)] == target for i in range(len(words)))


def test_every_caption_names_every_object_and_the_background():
    rng = random.Random(1)
    for _, scene in sample_scenes({"train": 300}, seed=3):
        for caption in scene_captions(scene, rng):
            words = tokenize(caption)
            assert len(words) <= shapes.MAX_CAPTION_TOKENS
            assert any(_mentions(words, w) for w in BACKGROUND_WORDS[scene.background]), caption
            for obj in scene.objects:
                named = [
                    f"{c} {s}" for c in COLOUR_WORDS[obj.colour] for s in SHAPE_WORDS[obj.shape]
                ]
                assert any(_mentions(words, n) for n in named), (caption, obj)


def test_no_two_images_share_their_identity_or_all_captions(tmp_path):
    scenes = sample_scenes({"train": 1500, "test": 500}, seed=0)
    assert len({scene.identity() for _, scene in scenes}) == 2000
    assert [split for split, _ in scenes] == ["train"] * 1500 + ["test"] * 500
    generate_shapes(tmp_path, n_images=200, seed=0, size=32)
    data = json.loads((tmp_path / "dataset.json").read_text())
    caption_sets = {frozenset(s["raw"] for s in im["sentences"]) for im in data["images"]}
    assert len(caption_sets) == 200


def test_captions_of_an_image_use_distinct_styles_and_vary():
    scene = sample_scene(random.Random(0))
    captions = scene_captions(scene, random.Random(0))
    assert len(set(captions)) == 5


def _obj(row: int, col: int) -> SceneObject:
    return SceneObject("circle", "red", "small", row, col, 0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("a", "b", "relation"),
    [
        ((0, 0), (0, 2), "to the left of"),
        ((1, 2), (1, 0), "to the right of"),
        ((0, 1), (2, 1), "above"),
        ((2, 0), (0, 1), "below"),
        ((0, 0), (1, 1), "to the left of"),  # a tie goes to the horizontal axis
    ],
)
def test_relation_follows_grid_positions(a, b, relation):
    assert shapes._relation(_obj(*a), _obj(*b)) == relation


def test_render_size_and_background_colour():
    scene = sample_scene(random.Random(2))
    image = shapes.render_scene(scene, 64)
    assert image.size == (64, 64) and image.mode == "RGB"
    corner = image.getpixel((0, 0))
    base = shapes.BACKGROUNDS[scene.background]
    assert max(abs(x - y) for x, y in zip(corner, base, strict=True)) <= 30


def test_too_few_images_or_pixels_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--images 3"):
        generate_shapes(tmp_path, n_images=3)
    with pytest.raises(ConfigError, match="--size 8"):
        generate_shapes(tmp_path, n_images=10, size=8)


def test_perturbed_scene_differs_in_exactly_one_stated_fact():
    rng = random.Random(0)
    changes = set()
    for _ in range(300):
        base = sample_scene(rng)
        sibling = perturb_scene(base, rng)
        if sibling is None:
            continue
        assert sibling.identity() != base.identity()
        assert [(o.row, o.col, o.size) for o in sibling.objects] == [
            (o.row, o.col, o.size) for o in base.objects
        ]
        diffs = [
            (a.colour != b.colour, a.shape != b.shape)
            for a, b in zip(base.objects, sibling.objects, strict=True)
        ]
        if sibling.background != base.background:
            changes.add("background")
            assert not any(map(any, diffs))
        elif sum(c for c, _ in diffs) == 2:
            changes.add("swap")
            assert sorted(o.colour for o in base.objects) == sorted(
                o.colour for o in sibling.objects
            )
        else:
            assert sum(map(any, diffs)) == 1
            changes.add("colour" if any(c for c, _ in diffs) else "shape")
    assert changes == {"background", "swap", "colour", "shape"}


def test_test_split_holds_hard_negatives_only_from_itself(tmp_path):
    scenes = sample_scenes(split_sizes(600), seed=0)
    test = [scene for split, scene in scenes if split == "test"]
    train_layouts = {
        tuple((o.row, o.col, o.size, o.dx) for o in scene.objects)
        for split, scene in scenes
        if split == "train"
    }
    layouts = [tuple((o.row, o.col, o.size, o.dx) for o in scene.objects) for scene in test]
    assert not train_layouts & set(layouts)
    assert len(set(layouts)) < len(layouts)  # some test images are siblings of each other
