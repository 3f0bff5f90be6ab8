"""The built-in ``shapes`` dataset: rendered scenes with paraphrased captions, in Karpathy format.

A scene is a plain or patterned neutral background with 2-4 coloured shapes, each in its own cell
of a 3x3 grid, in one of three sizes. Every caption names the colour and shape of *every* object and
the background colour, and no two scenes share that combination, so each caption identifies its
image; sizes, positions, relations and the background pattern are mentioned by some captions only.
Telling scenes apart therefore needs colour-shape binding ("a red circle and a blue square" vs "a
blue circle and a red square"). To make that binding necessary rather than merely possible, 30% of
scenes are one-fact variations of an earlier scene of the same split (two colours swapped, one
object recoloured or reshaped, or the background changed): near-duplicate hard negatives that
make retrieval among 1,000 test images hard but learnable. See DATASET.md for the card.

Generation is byte-for-byte deterministic for a seed: scenes and captions come from Python's
``random.Random`` (stable across platforms and versions) and the PNG files are written without
metadata by the pinned Pillow.
"""

from __future__ import annotations

import collections
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from imtext.data.text import tokenize
from imtext.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross")
COLOURS = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (240, 214, 36),
    "green": (44, 160, 44),
    "cyan": (23, 210, 225),
    "blue": (31, 80, 224),
    "purple": (148, 64, 189),
    "pink": (247, 129, 191),
    "brown": (140, 86, 50),
}
BACKGROUNDS = {
    "white": (246, 246, 246),
    "light grey": (196, 196, 196),
    "dark grey": (84, 84, 84),
    "black": (16, 16, 16),
    "beige": (226, 212, 178),
}
PATTERNS = ("plain", "striped", "checkered", "dotted")
#: Radius as a fraction of the image side.
SIZES = {"small": 0.07, "medium": 0.1, "large": 0.13}
GRID = 3
OBJECT_COUNTS = (2, 3, 4)
OBJECT_COUNT_WEIGHTS = (0.25, 0.4, 0.35)
CAPTIONS_PER_IMAGE = 5
#: Every caption fits the paper's 32-token window, so encoding never cuts an object off.
MAX_CAPTION_TOKENS = 32
MAX_CAPTION_DRAWS = 20
DEFAULT_IMAGES = 6000
DEFAULT_SEED = 0
DEFAULT_SIZE = 128
MAX_EVAL_IMAGES = 1000
#: Share of scenes drawn as a one-fact variation of an earlier scene of their split.
NEAR_DUPLICATE_RATE = 0.3
SUPERSAMPLE = 2

SHAPE_WORDS = {
    "circle": ("circle", "circle", "disc"),
    "square": ("square", "square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "diamond", "rhombus"),
    "pentagon": ("pentagon",),
    "hexagon": ("hexagon",),
    "star": ("star",),
    "cross": ("cross", "cross", "plus sign"),
}
COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"purple": ("purple", "purple", "violet")}
BACKGROUND_WORDS = {b: (b,) for b in BACKGROUNDS} | {
    "light grey": ("light grey", "light gray", "pale grey"),
    "dark grey": ("dark grey", "dark gray", "charcoal"),
}
SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}
PATTERN_WORDS = {
    "plain": ("plain", "plain", "solid"),
    "striped": ("striped",),
    "checkered": ("checkered", "chequered"),
    "dotted": ("dotted", "polka-dot"),
}
#: Phrases for each grid cell (row, column).
CELL_PHRASES = {
    (0, 0): ("in the top left corner", "at the upper left", "in the top left"),
    (0, 1): ("at the top", "at the top centre", "in the upper middle"),
    (0, 2): ("in the top right corner", "at the upper right", "in the top right"),
    (1, 0): ("on the left", "at the left edge", "in the middle left"),
    (1, 1): ("in the centre", "in the middle", "at the center"),
    (1, 2): ("on the right", "at the right edge", "in the middle right"),
    (2, 0): ("in the bottom left corner", "at the lower left", "in the bottom left"),
    (2, 1): ("at the bottom", "at the bottom centre", "in the lower middle"),
    (2, 2): ("in the bottom right corner", "at the lower right", "in the bottom right"),
}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    #: Sub-cell offset of the centre, as a fraction of the free room in the cell, in [-1, 1].
    dx: float
    dy: float
    #: Rotation in degrees (not described by captions).
    angle: float


@dataclass(frozen=True)
class Scene:
    background: str
    pattern: str
    objects: tuple[SceneObject, ...]

    def identity(self) -> tuple:
        """What every caption states: background colour and each object's colour and shape."""
        return (self.background, frozenset((o.colour, o.shape) for o in self.objects))


def sample_scene(rng: random.Random) -> Scene:
    """A random scene: 2-4 objects of distinct (colour, shape), each in its own grid cell."""
    n = rng.choices(OBJECT_COUNTS, weights=OBJECT_COUNT_WEIGHTS)[0]
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    objects = tuple(
        SceneObject(
            shape=shape,
            colour=colour,
            size=rng.choice(tuple(SIZES)),
            row=row,
            col=col,
            dx=round(rng.uniform(-1, 1), 3),
            dy=round(rng.uniform(-1, 1), 3),
            angle=0.0 if shape == "circle" else round(rng.uniform(-20, 20), 1),
        )
        for (colour, shape), (row, col) in zip(kinds, cells, strict=True)
    )
    return Scene(rng.choice(tuple(BACKGROUNDS)), rng.choice(PATTERNS), objects)


def _kinds_distinct(objects: Sequence[SceneObject]) -> bool:
    return len({(o.colour, o.shape) for o in objects}) == len(objects)


def perturb_scene(scene: Scene, rng: random.Random) -> Scene | None:
    """A near-duplicate of ``scene`` that differs in one stated fact, or ``None`` if the drawn
    change is impossible. Layout, sizes and pattern stay, so only the caption tells them apart:

    - swap the colours of two objects (tells apart models that do not bind colour to shape),
    - recolour one object, reshape one object, or change the background colour.
    """
    objects = list(scene.objects)
    change = rng.choice(("swap", "swap", "colour", "shape", "background"))
    if change == "background":
        others = [b for b in BACKGROUNDS if b != scene.background]
        return replace(scene, background=rng.choice(others))
    i = rng.randrange(len(objects))
    if change == "swap":
        j = rng.randrange(len(objects))
        if objects[i].colour == objects[j].colour or objects[i].shape == objects[j].shape:
            return None  # the swap would change nothing a caption states
        a, b = objects[i], objects[j]
        objects[i] = replace(a, colour=b.colour)
        objects[j] = replace(b, colour=a.colour)
    elif change == "colour":
        colour = rng.choice([c for c in COLOURS if c != objects[i].colour])
        objects[i] = replace(objects[i], colour=colour)
    else:
        shape = rng.choice([s for s in SHAPES if s != objects[i].shape])
        angle = 0.0 if shape == "circle" else objects[i].angle
        objects[i] = replace(objects[i], shape=shape, angle=angle)
    return replace(scene, objects=tuple(objects)) if _kinds_distinct(objects) else None


def sample_scenes(sizes: dict[str, int], seed: int) -> list[tuple[str, Scene]]:
    """``(split, scene)`` pairs, split by split, no two scenes with the same :meth:`Scene.identity`
    (so no two images share all captions).

    A fraction :data:`NEAR_DUPLICATE_RATE` of scenes are :func:`perturb_scene` siblings of an
    earlier scene *of the same split*: hard negatives at evaluation time, and never a near-copy of
    a training image in val or test.
    """
    rng = random.Random(seed)
    seen: set[tuple] = set()
    out: list[tuple[str, Scene]] = []
    for split, size in sizes.items():
        scenes: list[Scene] = []
        while len(scenes) < size:
            if scenes and rng.random() < NEAR_DUPLICATE_RATE:
                scene = perturb_scene(rng.choice(scenes), rng)
            else:
                scene = sample_scene(rng)
            if scene is not None and scene.identity() not in seen:
                seen.add(scene.identity())
                scenes.append(scene)
        out += [(split, scene) for scene in scenes]
    return out


# ----------------------------------------------------------------------------------------------
# Captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_phrase(obj: SceneObject, rng: random.Random, with_size: bool) -> str:
    words = [rng.choice(COLOUR_WORDS[obj.colour]), rng.choice(SHAPE_WORDS[obj.shape])]
    if with_size:
        words.insert(0, rng.choice(SIZE_WORDS[obj.size]))
    return _article(" ".join(words))


def _join(parts: Sequence[str], rng: random.Random) -> str:
    if len(parts) == 1:
        return parts[0]
    last = rng.choice((" and ", ", and ", " plus ")) if len(parts) > 2 else " and "
    return ", ".join(parts[:-1]) + last + parts[-1]


def _background_phrase(scene: Scene, rng: random.Random, with_pattern: bool) -> str:
    colour = rng.choice(BACKGROUND_WORDS[scene.background])
    noun = rng.choice(("background", "background", "backdrop"))
    if with_pattern:
        return f"{rng.choice(PATTERN_WORDS[scene.pattern])} {colour} {noun}"
    return f"{colour} {noun}"


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``, along the axis on which they are further apart."""
    drow, dcol = a.row - b.row, a.col - b.col
    if abs(dcol) >= abs(drow):
        return "to the left of" if dcol < 0 else "to the right of"
    return "above" if drow < 0 else "below"


def _caption_list(scene: Scene, objs: list[SceneObject], rng: random.Random) -> str:
    sized = rng.random() < 0.5
    phrases = [_object_phrase(o, rng, sized) for o in objs]
    lead = rng.choice(("on", "against", "over"))
    return f"{_join(phrases, rng)} {lead} {_article(_background_phrase(scene, rng, False))}"


def _caption_count(scene: Scene, objs: list[SceneObject], rng: random.Random) -> str:
    count = NUMBER_WORDS[len(objs)]
    noun = rng.choice(("shapes", "objects", "figures"))
    phrases = _join([_object_phrase(o, rng, False) for o in objs], rng)
    bg = _background_phrase(scene, rng, rng.random() < 0.5)
    return rng.choice(
        (
            f"{count} {noun} on {_article(bg)}: {phrases}",
            f"there are {count} {noun}, {phrases}, on {_article(bg)}",
        )
    )


def _caption_positions(scene: Scene, objs: list[SceneObject], rng: random.Random) -> str:
    sized = rng.random() < 0.3
    parts = [
        f"{_object_phrase(o, rng, sized)} {rng.choice(CELL_PHRASES[o.row, o.col])}" for o in objs
    ]
    return (
        f"{_join(parts, rng)}; the background is {rng.choice(BACKGROUND_WORDS[scene.background])}"
    )


def _caption_relations(scene: Scene, objs: list[SceneObject], rng: random.Random) -> str:
    # Every relation is to the first object, so "it" always means the same thing.
    anchor, others = objs[0], objs[1:]
    parts = [f"{_object_phrase(o, rng, False)} {_relation(o, anchor)} it" for o in others]
    head = f"{_object_phrase(anchor, rng, False)} with " + _join(parts, rng)
    return f"{head}, all on {_article(_background_phrase(scene, rng, False))}"


def _caption_sizes(scene: Scene, objs: list[SceneObject], rng: random.Random) -> str:
    phrases = _join([_object_phrase(o, rng, True) for o in objs], rng)
    return f"{phrases} on {_article(_background_phrase(scene, rng, rng.random() < 0.5))}"


def _caption_background_first(scene: Scene, objs: list[SceneObject], rng: random.Random) -> str:
    bg = _background_phrase(scene, rng, rng.random() < 0.7)
    phrases = _join([_object_phrase(o, rng, rng.random() < 0.3) for o in objs], rng)
    verb = rng.choice(("with", "showing", "holding"))
    return f"{_article(bg)} {verb} {phrases}"


CAPTION_STYLES: tuple[Callable[[Scene, list[SceneObject], random.Random], str], ...] = (
    _caption_list,
    _caption_count,
    _caption_positions,
    _caption_relations,
    _caption_sizes,
    _caption_background_first,
)


def _caption_within(style: Callable, scene: Scene, rng: random.Random, max_tokens: int) -> str:
    # Long styles (positions of four objects) sometimes overflow; redraw the wording, then fall
    # back to the plain list, so that no caption is truncated by the default 32-token encoding.
    for _ in range(MAX_CAPTION_DRAWS):
        text = style(scene, rng.sample(scene.objects, len(scene.objects)), rng)
        if len(tokenize(text)) <= max_tokens:
            return text
    return _caption_list(scene, list(scene.objects), rng)


def scene_captions(scene: Scene, rng: random.Random, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """``n`` captions of ``scene`` in distinct styles, each naming objects in a fresh random order
    and at most :data:`MAX_CAPTION_TOKENS` words long."""
    captions = []
    for style in rng.sample(CAPTION_STYLES, n):
        text = _caption_within(style, scene, rng, MAX_CAPTION_TOKENS)
        if rng.random() < 0.5:
            text = text[0].upper() + text[1:] + "."
        captions.append(text)
    return captions


# ----------------------------------------------------------------------------------------------
# Rendering


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    def ring(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [
            (
                cx + radius * math.cos(math.radians(start + angle + 360 * k / n)),
                cy + radius * math.sin(math.radians(start + angle + 360 * k / n)),
            )
            for k in range(n)
        ]

    if shape == "square":
        return ring(4, r * 1.25, 45)
    if shape == "triangle":
        return ring(3, r * 1.2, -90)
    if shape == "diamond":
        return [(x, cy + (y - cy) * 1.35) for x, y in ring(4, r * 1.05, 0)]
    if shape == "pentagon":
        return ring(5, r * 1.1, -90)
    if shape == "hexagon":
        return ring(6, r * 1.08, 0)
    if shape == "star":
        outer, inner = ring(5, r * 1.3, -90), ring(5, r * 0.55, -54)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        a, b = r * 1.15, r * 0.4
        corners = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a)]
        corners += [(-x, -y) for x, y in corners]
        t = math.radians(angle)
        return [
            (cx + x * math.cos(t) - y * math.sin(t), cy + x * math.sin(t) + y * math.cos(t))
            for x, y in corners
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _shifted(rgb: tuple[int, int, int], delta: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + delta)) for v in rgb)  # type: ignore[return-value]


def _draw_background(draw: ImageDraw.ImageDraw, scene: Scene, side: int) -> None:
    base = BACKGROUNDS[scene.background]
    draw.rectangle((0, 0, side, side), fill=base)
    # Patterns are low-contrast so they never hide an object.
    ink = _shifted(base, -28 if sum(base) > 300 else 28)
    step = side // 8
    if scene.pattern == "striped":
        for y in range(0, side, step):
            draw.rectangle((0, y, side, y + step // 2 - 1), fill=ink)
    elif scene.pattern == "checkered":
        for i, y in enumerate(range(0, side, step)):
            for j, x in enumerate(range(0, side, step)):
                if (i + j) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=ink)
    elif scene.pattern == "dotted":
        d = step // 6
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                draw.ellipse((x - d, y - d, x + d, y + d), fill=ink)


def render_scene(scene: Scene, size: int) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (supersampled, then downscaled)."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(image)
    _draw_background(draw, scene, side)
    cell = side / GRID
    for obj in scene.objects:
        r = SIZES[obj.size] * side
        room = max(0.0, cell / 2 - r * 1.35)
        cx = (obj.col + 0.5) * cell + obj.dx * room
        cy = (obj.row + 0.5) * cell + obj.dy * room
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r, obj.angle), fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------------------
# Writing the dataset


def split_sizes(n_images: int) -> dict[str, int]:
    """Train/val/test sizes: val and test get ``min(1000, n // 6)`` images each, train the rest."""
    n_eval = min(MAX_EVAL_IMAGES, n_images // 6)
    return {"train": n_images - 2 * n_eval, "val": n_eval, "test": n_eval}


def build_annotations(scenes: Sequence[tuple[str, Scene]], seed: int) -> dict:
    """The Karpathy-format ``dataset.json`` content for ``(split, scene)`` pairs."""
    rng = random.Random(f"captions-{seed}")
    images, sentid = [], 0
    for imgid, (split, scene) in enumerate(scenes):
        sentences = []
        for raw in scene_captions(scene, rng):
            sentences.append(
                {"raw": raw, "tokens": tokenize(raw), "imgid": imgid, "sentid": sentid}
            )
            sentid += 1
        images.append(
            {
                "filename": f"{imgid:06d}.png",
                "imgid": imgid,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "scene": asdict(scene),
            }
        )
    return {"images": images, "dataset": "shapes"}


def generate_shapes(
    out_dir: Path,
    n_images: int = DEFAULT_IMAGES,
    seed: int = DEFAULT_SEED,
    size: int = DEFAULT_SIZE,
    progress: Callable[[Sequence], Sequence] = lambda items: items,
) -> dict[str, int]:
    """Write ``out_dir/dataset.json`` and ``out_dir/images/*.png``; return the split sizes.

    ``out_dir`` must not exist or be empty, so an existing dataset is never half-overwritten (the
    CLI writes to a temporary sibling and swaps it in). ``progress`` wraps the rendering loop.
    """
    if n_images < 6:
        raise ConfigError(f"--images {n_images}: the shapes dataset needs at least 6 images")
    if size < 32:
        raise ConfigError(f"--size {size}: images smaller than 32 pixels cannot show the shapes")
    scenes = sample_scenes(split_sizes(n_images), seed)
    annotations = build_annotations(scenes, seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for record, (_, scene) in progress(list(zip(annotations["images"], scenes, strict=True))):
        render_scene(scene, size).save(out_dir / "images" / record["filename"], optimize=False)
    text = json.dumps(annotations, separators=(",", ":"), ensure_ascii=False) + "\n"
    (out_dir / "dataset.json").write_text(text, encoding="utf-8")
    return split_sizes(n_images)


def background_plateau_rsum(
    backgrounds: Sequence[str], captions_per_image: int = CAPTIONS_PER_IMAGE, ks=(1, 5, 10)
) -> float:
    """The expected rsum (percent) of a model that knows only each image's background colour:
    it ranks the items of the query's background first, in random order among themselves.

    For an image of a background shared by ``m`` gallery images, text -> image finds it in the
    top K with probability ``min(K, m) / m``; image -> text finds one of its ``c`` captions among
    the ``c * m`` of that background with probability ``1 - C(cm - c, K) / C(cm, K)``. A trained
    model that sits near this value has collapsed onto the background (docs/training.md).

    >>> round(background_plateau_rsum(["white", "white", "black", "black"], 1, ks=(1,)), 1)
    100.0
    """
    counts = collections.Counter(backgrounds)
    c = captions_per_image
    total = 0.0
    for m in counts.values():
        for k in ks:
            t2i = min(k, m) / m
            i2t = 1.0 - math.comb(c * m - c, k) / math.comb(c * m, k) if k <= c * m else 1.0
            total += m * (t2i + i2t)
    return 100.0 * total / len(backgrounds)
