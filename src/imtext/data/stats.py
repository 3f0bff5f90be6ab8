"""Dataset-card numbers for a Karpathy-format file (and the scene facts of a ``shapes`` file)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from imtext.data.readers import load_json
from imtext.data.text import tokenize
from imtext.errors import DataError


def _unbound_key(scene: dict) -> tuple:
    """What a bag-of-words reader sees: the background and the colours and shapes, unpaired."""
    objects = scene["objects"]
    colours = tuple(sorted(o["colour"] for o in objects))
    return scene["background"], colours, tuple(sorted(o["shape"] for o in objects))


def _layout_key(scene: dict) -> tuple:
    return tuple((o["row"], o["col"], o["size"], o["dx"], o["dy"]) for o in scene["objects"])


def _shared(keys: list) -> int:
    counts = Counter(keys)
    return sum(counts[k] > 1 for k in keys)


def karpathy_stats(path: Path) -> dict[str, Any]:
    """Split sizes, caption lengths and vocabulary of a Karpathy JSON file; for ``shapes``, also
    the object counts and how many test images have a near-duplicate or a bag-of-words twin."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        raise DataError(f"{path}: no 'images' list at the top level; is this Karpathy JSON?")
    images = data["images"]
    splits = Counter(im["split"] for im in images)
    lengths = [len(tokenize(s["raw"])) for im in images for s in im["sentences"]]
    train_words = {
        word
        for im in images
        if im["split"] == "train"
        for s in im["sentences"]
        for word in tokenize(s["raw"])
    }
    stats: dict[str, Any] = {
        "dataset": data.get("dataset"),
        "images": dict(splits),
        "captions": sum(len(im["sentences"]) for im in images),
        "caption_tokens": {
            "mean": round(sum(lengths) / len(lengths), 2),
            "min": min(lengths),
            "max": max(lengths),
        },
        "train_vocabulary": len(train_words),
    }
    if all("scene" in im for im in images):
        scenes = [im["scene"] for im in images]
        test = [im["scene"] for im in images if im["split"] == "test"]
        stats["objects_per_image"] = dict(
            sorted(Counter(len(s["objects"]) for s in scenes).items())
        )
        stats["backgrounds"] = dict(sorted(Counter(s["background"] for s in scenes).items()))
        stats["test_images_with_near_duplicate"] = _shared([_layout_key(s) for s in test])
        stats["test_images_bag_of_words_cannot_separate"] = _shared([_unbound_key(s) for s in test])
    return stats
