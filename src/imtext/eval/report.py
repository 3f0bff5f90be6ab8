"""The qualitative evaluation report: sample queries with their top results, and the recall curve.

Everything here is pure (arrays, bytes and strings in, bytes and strings out) so that it tests
without a model: :func:`select_queries` picks the sample queries, :func:`top_k_matches` orders one
query's gallery, and the ``render_*`` functions draw what the ``evaluate`` stage assembled into
:class:`Example` records. The page is self-contained (images inline as base64 PNG, no external
resources, every caption HTML-escaped) so it can be mailed, opened offline or logged to MLflow.

Matplotlib draws through :class:`matplotlib.figure.Figure` directly, never ``pyplot``: no global
backend is chosen and no GUI is touched, so rendering is safe in servers and worker processes.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

GREEN = "#1a9850"
GREY = "#bdbdbd"
THUMBNAIL_SIDE = 160

Direction = Literal["t2i", "i2t"]
DIRECTION_NAMES = {"i2t": "image → text", "t2i": "text → image"}
#: ASCII names for terminals and logs, whatever their encoding.
DIRECTION_NAMES_ASCII = {"i2t": "image -> text", "t2i": "text -> image"}


@dataclass(frozen=True)
class Item:
    """One image or caption shown in the report: a query, a result or an expected match.

    ``row`` is the row of the image or caption in its split; an image carries ``png`` (a
    thumbnail), a caption carries ``caption``. ``score`` is the dot product with the query (cosine
    similarity of L2-normalised embeddings), ``None`` for the query itself.
    """

    row: int
    caption: str | None = None
    png: bytes | None = None
    score: float | None = None
    is_match: bool = False


@dataclass(frozen=True)
class Example:
    """One sample query: ``t2i`` (a caption queries the images) or ``i2t`` (an image queries the
    captions), its top-k ``results`` best first, and ``rank``, the 1-based rank of its best ground
    truth in the whole gallery (as in the metrics). ``expected`` holds ground truth missing from
    the results, so the page shows what the model should have found."""

    direction: Direction
    query: Item
    results: tuple[Item, ...]
    rank: int
    expected: tuple[Item, ...] = field(default=())


def select_queries(n: int, count: int, rng: np.random.Generator | int) -> np.ndarray:
    """``min(count, n)`` distinct rows of ``range(n)``, sorted; int64 of shape (min(count, n),).

    ``rng`` is a generator (draws advance it) or a seed: the same seed always picks the same rows.
    """
    if n < 0 or count < 0:
        raise ValueError(f"n and count must not be negative, got n={n}, count={count}")
    rng = np.random.default_rng(rng)
    return np.sort(rng.choice(n, size=min(count, n), replace=False)).astype(np.int64)


def top_k_matches(
    scores: np.ndarray, is_match: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` candidates of each query, best first, and which of them are ground truth.

    Args:
        scores: (Q, G) or (G,) query-candidate scores.
        is_match: bool of the same shape, True where the candidate is a ground truth of the query.
        k: candidates kept per query; ``min(k, G)`` are returned.

    Returns:
        ``(indices, hits)`` of shape (Q, min(k, G)) (or (min(k, G),)): candidate columns and their
        ``is_match``. Ties order a non-matching candidate before a matching one and then by column,
        as the pessimistic tie rule of :mod:`imtext.eval.metrics` does, so the first hit shown sits
        at the query's rank.

    >>> top_k_matches(np.array([0.2, 0.9, 0.5, 0.9]), np.array([0, 1, 0, 0], bool), 3)
    (array([3, 1, 2]), array([False,  True, False]))
    """
    scores, is_match = np.asarray(scores), np.asarray(is_match, dtype=bool)
    if scores.shape != is_match.shape or scores.ndim not in (1, 2):
        raise ValueError(
            f"scores and is_match must have one shape (G,) or (Q, G), got {scores.shape} "
            f"and {is_match.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # lexsort's last key is the primary one and it is stable, so the column breaks the last ties.
    order = np.lexsort((is_match, -scores), axis=-1)[..., :k]
    return order, np.take_along_axis(is_match, order, axis=-1)


def recall_curve_rows(i2t: Sequence[float], t2i: Sequence[float]) -> list[dict[str, float]]:
    """DVC-plots rows ``{"k": k, "i2t": R@k, "t2i": R@k}`` for k = 1 .. len(i2t) (percent)."""
    if len(i2t) != len(t2i):
        raise ValueError(f"the curves differ in length: {len(i2t)} and {len(t2i)}")
    return [
        {"k": k, "i2t": round(float(a), 4), "t2i": round(float(b), 4)}
        for k, (a, b) in enumerate(zip(i2t, t2i, strict=True), start=1)
    ]


def format_recall_table(metrics: Mapping[str, float]) -> str:
    """R@1/5/10 and median rank of both directions and rsum as a markdown table (fixed width,
    ASCII only).

    >>> print(format_recall_table({"i2t_r1": 50, "i2t_r5": 75, "i2t_r10": 100, "i2t_medr": 1.5,
    ...     "t2i_r1": 25, "t2i_r5": 50, "t2i_r10": 80, "t2i_medr": 5, "rsum": 380}))
    | direction     |   R@1 |   R@5 |  R@10 |  medr |
    |---------------|------:|------:|------:|------:|
    | image -> text |  50.0 |  75.0 | 100.0 |   1.5 |
    | text -> image |  25.0 |  50.0 |  80.0 |   5.0 |
    | rsum          |       |       |       | 380.0 |
    """
    lines = [
        f"| {'direction':<13} | {'R@1':>5} | {'R@5':>5} | {'R@10':>5} | {'medr':>5} |",
        f"|{'-' * 15}|{'-' * 6}:|{'-' * 6}:|{'-' * 6}:|{'-' * 6}:|",
    ]
    for direction in ("i2t", "t2i"):
        values = [metrics[f"{direction}_{key}"] for key in ("r1", "r5", "r10", "medr")]
        cells = " | ".join(f"{float(v):5.1f}" for v in values)
        lines.append(f"| {DIRECTION_NAMES_ASCII[direction]:<13} | {cells} |")
    lines.append(f"| {'rsum':<13} | {'':5} | {'':5} | {'':5} | {float(metrics['rsum']):5.1f} |")
    return "\n".join(lines)


def thumbnail_png(image: Image.Image, side: int = THUMBNAIL_SIDE) -> bytes:
    """``image`` shrunk to at most ``side`` pixels a side (never enlarged), as PNG bytes."""
    image = image.convert("RGB")
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_recall_curve_png(rows: Sequence[Mapping[str, float]], title: str = "") -> bytes:
    """Recall@K of both directions against K (log scale) from :func:`recall_curve_rows` rows."""
    from matplotlib.figure import Figure

    ks = [row["k"] for row in rows]
    figure = Figure(figsize=(5.5, 3.6), dpi=100, layout="constrained")
    ax = figure.add_subplot()
    for direction, style in (("i2t", "-"), ("t2i", "--")):
        ax.plot(ks, [row[direction] for row in rows], style, label=DIRECTION_NAMES[direction])
    if len(ks) > 1:
        ax.set_xscale("log")
        ax.set_xlim(1, ks[-1])
    ax.set_ylim(0, 101)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    return _png_bytes(figure)


def render_report_png(examples: Sequence[Example], title: str = "") -> bytes:
    """The examples as one image grid: a row per query, the query first, then its top results.

    A text query shows its top images, ground truth framed green and marked "GT", and in the last
    column its best ground-truth image when the top results miss it; an image query shows its top
    captions, ground truth green and marked "GT", then its best missed ground-truth caption.
    """
    from matplotlib.figure import Figure

    k = max((len(e.results) for e in examples), default=1)
    rows = max(len(examples), 1)
    figure = Figure(figsize=(2.6 + 1.5 * (k + 1), 0.4 + 1.7 * rows), dpi=100, layout="constrained")
    if title:
        figure.suptitle(title, fontsize=11)
    if not examples:
        figure.text(0.5, 0.5, "no sample queries (evaluate.report_queries is 0)", ha="center")
        return _png_bytes(figure)
    grid = figure.add_gridspec(rows, k + 2, width_ratios=[1.7] + [1] * (k + 1))
    for i, example in enumerate(examples):
        query_ax = figure.add_subplot(grid[i, 0])
        if example.direction == "t2i":
            text = f"{_short(example.query.caption, 110)}\n(GT at rank {example.rank})"
            _draw_caption(query_ax, text)
            for j, item in enumerate(example.results):
                _draw_image(figure.add_subplot(grid[i, j + 1]), item)
            if example.expected:
                _draw_image(figure.add_subplot(grid[i, k + 1]), example.expected[0], "missed GT")
        else:
            _draw_image(query_ax, example.query, f"query (GT at rank {example.rank})")
            _draw_caption_list(figure.add_subplot(grid[i, 1:]), example.results, example.expected)
    return _png_bytes(figure)


def render_report_html(
    examples: Sequence[Example],
    metrics: Mapping[str, float],
    curve_png: bytes,
    context: Mapping[str, object] | None = None,
) -> str:
    """A self-contained HTML page: the metrics table, the recall curve and every example.

    ``context`` (split, protocol, model file, ...) is listed under the title. Images are inline
    ``data:`` URIs and every string from the data is escaped: the page loads nothing and runs
    nothing from the dataset.
    """
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>imtext evaluation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>imtext evaluation</h1>",
    ]
    if context:
        parts.append('<dl class="context">')
        for key, value in context.items():
            parts.append(f"<dt>{e(str(key))}</dt><dd>{e(str(value))}</dd>")
        parts.append("</dl>")
    parts += ["<h2>Retrieval metrics</h2>", _metrics_table_html(metrics)]
    parts += [
        "<h2>Recall curve</h2>",
        f'<img class="curve" alt="Recall@K against K" src="{_data_uri(curve_png)}">',
    ]
    for direction, heading in (
        ("t2i", "Text queries: top images"),
        ("i2t", "Image queries: top captions"),
    ):
        chosen = [x for x in examples if x.direction == direction]
        if not chosen:
            continue
        parts.append(f"<h2>{heading}</h2>")
        parts.append(
            '<p class="legend">Ground truth is framed green and marked <b>GT</b>; rank is that of '
            "the best ground truth in the whole gallery, as in the metrics; scores are cosine "
            "similarities.</p>"
        )
        parts += [_example_html(x) for x in chosen]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _metrics_table_html(metrics: Mapping[str, float]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("", "R@1", "R@5", "R@10", "medr", "meanr"))
    rows = [f"<tr>{head}</tr>"]
    for direction in ("i2t", "t2i"):
        cells = "".join(
            f"<td>{float(metrics[f'{direction}_{key}']):.1f}</td>"
            for key in ("r1", "r5", "r10", "medr", "meanr")
        )
        rows.append(f"<tr><th>{html.escape(DIRECTION_NAMES[direction])}</th>{cells}</tr>")
    rows.append(f'<tr><th>rsum</th><td colspan="5">{float(metrics["rsum"]):.1f}</td></tr>')
    return '<table class="metrics">' + "".join(rows) + "</table>"


def _example_html(example: Example) -> str:
    e = html.escape
    rank = f'<span class="rank">ground truth at rank {example.rank}</span>'
    if example.direction == "t2i":
        query = f'<p class="query">“{e(example.query.caption or "")}” {rank}</p>'
        results = "".join(_image_html(item, n) for n, item in enumerate(example.results, 1))
        body = f'<div class="images">{results}</div>'
        if example.expected:
            missed = "".join(_image_html(item) for item in example.expected)
            body += f'{_MISSED}<div class="images">{missed}</div>'
    else:
        query = f'<div class="query">{_image_html(example.query)} {rank}</div>'
        items = "".join(_caption_html(item) for item in example.results)
        body = f'<ol class="captions">{items}</ol>'
        if example.expected:
            missed = "".join(_caption_html(item) for item in example.expected)
            body += f'{_MISSED}<ul class="captions">{missed}</ul>'
    return f'<section class="example">{query}{body}</section>'


_MISSED = '<p class="missed">ground truth not in the top results:</p>'


def _image_html(item: Item, position: int | None = None) -> str:
    label = "" if position is None else f"#{position} "
    if item.score is not None:
        label += f"{item.score:.3f}"
    badge = '<span class="gt">GT</span>' if item.is_match else ""
    css = "item hit" if item.is_match else "item"
    return (
        f'<figure class="{css}"><img alt="image {item.row}" src="{_data_uri(item.png or b"")}">'
        f"<figcaption>{badge}{html.escape(label)}</figcaption></figure>"
    )


def _caption_html(item: Item) -> str:
    badge = '<span class="gt">GT</span> ' if item.is_match else ""
    css = ' class="hit"' if item.is_match else ""
    score = f' <span class="score">{item.score:.3f}</span>' if item.score is not None else ""
    return f"<li{css}>{badge}{html.escape(item.caption or '')}{score}</li>"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" entry: the same report is the same bytes across matplotlib versions.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _short(text: str | None, limit: int) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _draw_caption(ax, text: str) -> None:
    ax.axis("off")
    ax.text(0, 0.5, textwrap.fill(text, 26), va="center", ha="left", fontsize=8)


def _draw_image(ax, item: Item, title: str | None = None) -> None:
    with Image.open(io.BytesIO(item.png or b"")) as image:
        ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(GREEN if item.is_match else GREY)
        spine.set_linewidth(4 if item.is_match else 1)
    if title is None:
        title = ("GT " if item.is_match else "") + (
            f"{item.score:.3f}" if item.score is not None else ""
        )
    ax.set_title(title, fontsize=8, color=GREEN if item.is_match else "black")


def _draw_caption_list(ax, items: Sequence[Item], expected: Sequence[Item]) -> None:
    ax.axis("off")
    lines = [
        (f"{n}. {'GT ' if item.is_match else ''}{_short(item.caption, 90)}", item)
        for n, item in enumerate(items, 1)
    ]
    lines += [(f"missed GT: {_short(item.caption, 84)}", item) for item in expected[:1]]
    for n, (text, item) in enumerate(lines):
        ax.text(
            0,
            1 - (n + 0.5) / len(lines),
            f"{text}  ({item.score or 0:.3f})",
            va="center",
            ha="left",
            fontsize=8,
            color=GREEN if item.is_match else "black",
            fontweight="bold" if item.is_match else "normal",
        )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; }
dl.context { display: grid; grid-template-columns: max-content auto; gap: 0.1em 1em;
  font-size: 0.9em; color: #555; }
dl.context dt { font-weight: bold; } dl.context dd { margin: 0; word-break: break-all; }
table.metrics { border-collapse: collapse; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 0.3em 0.8em;
  text-align: right; }
img.curve { max-width: 560px; }
section.example { border-top: 1px solid #eee; padding: 0.6em 0; }
p.query { font-size: 1.05em; margin: 0.3em 0; }
div.query { display: flex; align-items: center; gap: 1em; }
.rank { color: #777; font-size: 0.85em; margin-left: 0.5em; }
div.images { display: flex; flex-wrap: wrap; gap: 0.6em; }
figure.item { margin: 0; text-align: center; font-size: 0.8em; color: #555; }
figure.item img { width: 112px; height: 112px; object-fit: contain; image-rendering: pixelated;
  border: 4px solid #eee; display: block; }
figure.item.hit img { border-color: #1a9850; }
.gt { background: #1a9850; color: white; font-weight: bold; border-radius: 3px;
  padding: 0 0.3em; margin-right: 0.3em; }
ol.captions li, ul.captions li { margin: 0.15em 0; }
li.hit { color: #1a9850; font-weight: bold; }
.score { color: #999; font-size: 0.85em; font-weight: normal; }
p.missed { color: #b2182b; font-size: 0.9em; margin: 0.4em 0 0.2em; }
"""
