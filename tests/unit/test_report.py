"""The pure parts of the evaluation report: query choice, top-k order, tables, HTML and PNGs."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from imtext.eval.metrics import reference_ranks
from imtext.eval.report import (
    Example,
    Item,
    format_recall_table,
    recall_curve_rows,
    render_recall_curve_png,
    render_report_html,
    render_report_png,
    select_queries,
    thumbnail_png,
    top_k_matches,
)

METRICS = {
    "i2t_r1": 50.0,
    "i2t_r5": 75.0,
    "i2t_r10": 100.0,
    "t2i_r1": 25.0,
    "t2i_r5": 50.0,
    "t2i_r10": 80.0,
    "i2t_medr": 1.5,
    "t2i_medr": 5.0,
    "i2t_meanr": 2.25,
    "t2i_meanr": 6.125,
    "rsum": 380.0,
}


def png(colour: tuple[int, int, int], size=(8, 6)) -> bytes:
    return thumbnail_png(Image.new("RGB", size, colour))


def open_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def test_select_queries_is_reproducible_distinct_and_sorted():
    rows = select_queries(100, 5, 0)
    assert rows.tolist() == select_queries(100, 5, 0).tolist()
    assert rows.tolist() == sorted(np.random.default_rng(0).choice(100, 5, replace=False))
    assert rows.dtype == np.int64 and len(set(rows.tolist())) == 5
    assert rows.min() >= 0 and rows.max() < 100
    assert rows.tolist() != select_queries(100, 5, 1).tolist()


def test_select_queries_takes_every_row_when_asked_for_more_and_advances_a_generator():
    assert select_queries(4, 10, 0).tolist() == [0, 1, 2, 3]
    assert select_queries(7, 0, 0).tolist() == []
    rng = np.random.default_rng(3)
    first, second = select_queries(1000, 4, rng), select_queries(1000, 4, rng)
    assert first.tolist() == select_queries(1000, 4, 3).tolist()
    assert first.tolist() != second.tolist()  # the caption and image draws are independent
    with pytest.raises(ValueError):
        select_queries(-1, 2, 0)


def test_top_k_matches_orders_by_score_and_puts_ties_against_the_query():
    scores = np.array([[0.2, 0.9, 0.5, 0.9], [0.1, 0.3, 0.3, 0.0]])
    is_match = np.array([[0, 1, 0, 0], [0, 0, 1, 1]], dtype=bool)
    order, hits = top_k_matches(scores, is_match, 3)
    # Row 0: columns 1 and 3 tie at 0.9; the non-matching 3 goes first (pessimistic).
    # Row 1: columns 1 and 2 tie at 0.3; the non-matching 1 goes first.
    assert order.tolist() == [[3, 1, 2], [1, 2, 0]]
    assert hits.tolist() == [[False, True, False], [False, True, False]]
    order, hits = top_k_matches(scores[0], is_match[0], 10)  # 1-D, k beyond the gallery
    assert order.tolist() == [3, 1, 2, 0] and hits.tolist() == [False, True, False, False]


def test_top_k_matches_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        top_k_matches(np.zeros((2, 3)), np.zeros((2, 4), bool), 1)
    with pytest.raises(ValueError, match="k must be"):
        top_k_matches(np.zeros(3), np.zeros(3, bool), 0)


def test_first_ground_truth_shown_sits_at_the_metric_rank_even_with_ties():
    # Small integer embeddings: exact scores with many ties, the hard case for the tie rule.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 3, size=(6, 2)).astype(np.float64)
    texts = rng.integers(0, 3, size=(15, 2)).astype(np.float64)
    text_to_image = np.repeat(np.arange(5), 3)
    image_ids = np.array([0, 1, 2, 3, 4, 2])  # image 5 shares id 2: two matches for some
    i2t_ranks, t2i_ranks = reference_ranks(images, texts, text_to_image, image_ids)
    scores = texts @ images.T
    is_match = text_to_image[:, None] == image_ids[None, :]
    _, hits = top_k_matches(scores, is_match, images.shape[0])
    assert (hits.argmax(axis=1) + 1).tolist() == t2i_ranks.tolist()
    _, hits = top_k_matches(scores.T, is_match.T, texts.shape[0])
    assert (hits.argmax(axis=1) + 1).tolist() == i2t_ranks.tolist()
    assert len(set(scores.ravel().tolist())) < scores.size // 4  # ties did occur


def test_format_recall_table_is_a_fixed_width_markdown_table():
    assert format_recall_table(METRICS).isascii()
    assert format_recall_table(METRICS) == (
        "| direction     |   R@1 |   R@5 |  R@10 |  medr |\n"
        "|---------------|------:|------:|------:|------:|\n"
        "| image -> text |  50.0 |  75.0 | 100.0 |   1.5 |\n"
        "| text -> image |  25.0 |  50.0 |  80.0 |   5.0 |\n"
        "| rsum          |       |       |       | 380.0 |"
    )


def test_recall_curve_rows_number_k_from_one():
    rows = recall_curve_rows(np.array([10.0, 20.0]), [30.0, 40.0])
    assert rows == [{"k": 1, "i2t": 10.0, "t2i": 30.0}, {"k": 2, "i2t": 20.0, "t2i": 40.0}]
    with pytest.raises(ValueError, match="length"):
        recall_curve_rows([1.0], [1.0, 2.0])


def test_thumbnail_shrinks_large_images_and_never_enlarges_small_ones():
    assert open_png(png((1, 2, 3), (12, 10))).size == (12, 10)
    assert open_png(png((1, 2, 3), (400, 200))).size == (160, 80)


def examples() -> list[Example]:
    red, blue, green = png((255, 0, 0)), png((0, 0, 255)), png((0, 255, 0))
    text_query = Example(
        "t2i",
        Item(7, caption="<script>alert('x')</script> & a red box"),
        (Item(3, png=blue, score=0.9), Item(1, png=red, score=0.8, is_match=True)),
        rank=2,
    )
    image_query = Example(
        "i2t",
        Item(2, png=green),
        (Item(11, caption="a blue <b>box</b>", score=0.7), Item(12, caption="a cat", score=0.6)),
        rank=9,
        expected=(Item(10, caption="a green square", score=0.1, is_match=True),),
    )
    return [text_query, image_query]


def test_report_html_is_self_contained_escaped_and_marks_ground_truth():
    page = render_report_html(
        examples(), METRICS, png((9, 9, 9)), {"model": "runs/<model>.pt", "split": "test"}
    )
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<b>box</b>" not in page and "a blue &lt;b&gt;box&lt;/b&gt;" in page
    assert "runs/&lt;model&gt;.pt" in page
    assert "http" not in page and "url(" not in page and "<link" not in page
    # The curve, 2 results and 1 query image inline; nothing else is an image source.
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    # One ground truth among the text query's results, one missed caption of the image query.
    assert page.count('<span class="gt">GT</span>') == 2
    assert page.count('class="item hit"') == 1 and page.count('<li class="hit">') == 1
    assert "ground truth at rank 2" in page and "ground truth at rank 9" in page
    assert "ground truth not in the top results" in page
    for value in ("50.0", "75.0", "100.0", "25.0", "80.0", "380.0", "6.1"):
        assert f">{value}</td>" in page, value


def test_report_html_without_examples_still_shows_metrics_and_curve():
    page = render_report_html([], METRICS, png((9, 9, 9)))
    assert page.count("data:image/png;base64,") == 1 and "Text queries" not in page
    assert 'class="gt"' not in page and "380.0" in page


def test_report_and_curve_pngs_open():
    grid = open_png(render_report_png(examples(), "title"))
    assert grid.size[0] > 300 and grid.size[1] > 200
    assert open_png(render_report_png([])).size[0] > 0
    rows = recall_curve_rows(np.linspace(10, 100, 12), np.linspace(5, 100, 12))
    assert open_png(render_recall_curve_png(rows, "curve")).size == (550, 360)
    assert open_png(render_recall_curve_png(rows[:1])).size == (550, 360)
