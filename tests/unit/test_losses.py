"""The losses of imtext.losses: docstring examples, float64 gradient checks, masking, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from imtext.losses import (
    dual_path_loss,
    hardest_negative_indices,
    instance_loss,
    paired_ranking_loss,
    ranking_loss,
)

F64 = torch.float64


def t(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)


# The ranking_loss docstring example.
X3 = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
Y3 = [[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]


def reference_ranking(image, text, margin, hardest, labels=None) -> float:
    """A plain double loop over anchors and negatives, straight from the definition."""
    n = image.shape[0]
    s = [[float(image[i] @ text[j]) for j in range(n)] for i in range(n)]

    def is_negative(i, j):
        return i != j if labels is None else int(labels[i]) != int(labels[j])

    total = 0.0
    for i in range(n):
        image_hinges = [max(0.0, margin - s[i][i] + s[i][j]) for j in range(n) if is_negative(i, j)]
        text_hinges = [max(0.0, margin - s[i][i] + s[j][i]) for j in range(n) if is_negative(i, j)]
        for hinges in (image_hinges, text_hinges):
            total += (max(hinges) if hinges else 0.0) if hardest else sum(hinges)
    return total / n


# ---------------------------------------------------------------------------------- instance_loss


def test_instance_loss_docstring_example():
    image_term, text_term = instance_loss(
        t([[2.0, 0.0], [0.0, 0.0]]), t([[0.0, 0.0], [0.0, math.log(3.0)]]), torch.tensor([0, 1])
    )
    assert image_term.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log(2)) / 2)
    assert image_term.item() == pytest.approx(0.410038, abs=1e-6)
    assert text_term.item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    assert text_term.item() == pytest.approx(0.490415, abs=1e-6)


def test_instance_loss_gradcheck():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    text = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    labels = torch.tensor([2, 0, 2])  # two captions of instance 2 in one batch
    assert torch.autograd.gradcheck(lambda a, b: instance_loss(a, b, labels), (image, text))


def test_instance_loss_follows_dtype_and_accepts_int32_labels():
    for dtype in (torch.float32, F64):
        terms = instance_loss(
            torch.zeros(2, 3, dtype=dtype),
            torch.zeros(2, 3, dtype=dtype),
            torch.tensor([0, 2], dtype=torch.int32),
        )
        for term in terms:
            assert term.dtype == dtype and term.shape == ()
            assert term.item() == pytest.approx(math.log(3))


def test_instance_loss_labels_text_rows_separately():
    # Text row 1 is a mined negative of class 0: only the text term changes.
    image, text = t([[2.0, 0.0], [0.0, 0.0]]), t([[0.0, 0.0], [0.0, math.log(3.0)]])
    image_term, text_term = instance_loss(image, text, torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert image_term.item() == pytest.approx(0.410038, abs=1e-6)
    # row 1: -log(1 / (1 + 3)) = log 4
    assert text_term.item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    with pytest.raises(ValueError, match="text_labels"):
        instance_loss(image, text, torch.tensor([0, 1]), torch.tensor([0, 5]))


@pytest.mark.parametrize(
    ("image", "text", "labels", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(3, 3), torch.tensor([0, 1]), "text_logits"),
        (torch.zeros(2), torch.zeros(2), torch.tensor([0, 1]), "image_logits"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 2]), "labels"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]), "integer"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 3]), r"\[0, 3\)"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([-100, 1]), r"\[0, 3\)"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=F64), torch.tensor([0, 1]), "dtype"),
        (torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "non-empty"),
    ],
)
def test_instance_loss_rejects_bad_inputs(image, text, labels, match):
    with pytest.raises(ValueError, match=match):
        instance_loss(image, text, labels)


# ----------------------------------------------------------------------------------- ranking_loss


@pytest.mark.parametrize(
    ("hardest", "labels", "expected"),
    [
        (False, None, 1.32 / 3),
        (True, None, 1.12 / 3),
        (False, [0, 0, 1], 0.5 / 3),
        (True, [0, 0, 1], 0.5 / 3),
    ],
)
def test_ranking_loss_docstring_example(hardest, labels, expected):
    labels = None if labels is None else torch.tensor(labels)
    loss = ranking_loss(t(X3), t(Y3), margin=0.3, hardest=hardest, labels=labels)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(reference_ranking(t(X3), t(Y3), 0.3, hardest, labels))


def test_hardest_is_smaller_than_sum_when_an_anchor_has_several_active_hinges():
    x, y = t(X3), t(Y3)
    summed = ranking_loss(x, y, margin=0.3)
    hardest = ranking_loss(x, y, margin=0.3, hardest=True)
    # Image anchor 1 (0.26 + 0.1) and text anchor 0 (0.46 + 0.1) each drop their 0.1 hinge.
    assert (summed - hardest).item() == pytest.approx(0.2 / 3)
    # With two samples every anchor has one negative, so the two forms agree.
    assert ranking_loss(x[:2], y[:2], 0.3).item() == pytest.approx(
        ranking_loss(x[:2], y[:2], 0.3, hardest=True).item()
    )


@pytest.mark.parametrize("hardest", [False, True])
@pytest.mark.parametrize("labels", [None, [0, 1, 0, 2, 1, 3]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_loss_matches_double_loop(hardest, labels, seed):
    image, text = unit(6, 5, seed), unit(6, 5, seed + 100)
    labels = None if labels is None else torch.tensor(labels)
    for margin in (0.2, 1.0):
        loss = ranking_loss(image, text, margin, hardest=hardest, labels=labels)
        assert loss.item() == pytest.approx(reference_ranking(image, text, margin, hardest, labels))


def _assert_away_from_kinks(image, text, margin, labels=None):
    """Guard for gradcheck: no hinge near 0 and no near-tie for an anchor's largest hinge."""
    s = image @ text.T
    d = s.diagonal()
    n = s.shape[0]
    mask = ~torch.eye(n, dtype=torch.bool) if labels is None else labels[:, None] != labels[None, :]
    for hinge in ((margin - d[:, None] + s), (margin - d[None, :] + s).T):
        assert hinge[mask].abs().min() > 1e-3
        for row, keep in zip(hinge.clamp(min=0), mask, strict=True):
            top = row[keep].sort(descending=True).values
            assert top.numel() < 2 or top[0] == 0 or top[0] - top[1] > 1e-3


@pytest.mark.parametrize("hardest", [False, True])
@pytest.mark.parametrize("labels", [None, [0, 1, 0, 2]])
def test_ranking_loss_gradcheck(hardest, labels):
    image, text = unit(4, 3, 7), unit(4, 3, 8)
    labels = None if labels is None else torch.tensor(labels)
    _assert_away_from_kinks(image, text, 0.5, labels)
    image.requires_grad_(True)
    text.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: ranking_loss(a, b, 0.5, hardest=hardest, labels=labels), (image, text)
    )


@pytest.mark.parametrize("hardest", [False, True])
def test_no_gradient_through_masked_negatives(hardest):
    # Both rows share one instance: without labels the hinges are active, with labels there are
    # no negatives at all, so the loss and every gradient are exactly zero.
    image = t([[1.0, 0.0], [0.6, 0.8]]).requires_grad_(True)
    text = t([[0.8, 0.6], [0.6, 0.8]]).requires_grad_(True)
    assert ranking_loss(image, text, 0.5, hardest=hardest).item() > 0
    loss = ranking_loss(image, text, 0.5, hardest=hardest, labels=torch.tensor([4, 4]))
    loss.backward()
    assert loss.item() == 0
    assert torch.equal(image.grad, torch.zeros_like(image))
    assert torch.equal(text.grad, torch.zeros_like(text))


@pytest.mark.parametrize("hardest", [False, True])
def test_masked_gradient_matches_a_loss_built_only_from_allowed_pairs(hardest):
    # Rows 0 and 2 share a label and row 2's text scores highest for image 0: masking must drop
    # exactly that pair, and the gradient must equal that of the explicit double loop.
    image = t(X3 + [[-0.6, 0.8]])
    text = t([[0.6, 0.8], [0.0, 1.0], [0.8, 0.6], [-0.8, 0.6]])
    labels = torch.tensor([0, 1, 0, 2])
    a = image.clone().requires_grad_(True)
    b = text.clone().requires_grad_(True)
    ranking_loss(a, b, 0.3, hardest=hardest, labels=labels).backward()

    def explicit(img, txt):
        s = img @ txt.T
        terms = []
        for i in range(4):
            for hinge_of in (
                lambda j, i=i: 0.3 - s[i, i] + s[i, j],
                lambda j, i=i: 0.3 - s[i, i] + s[j, i],
            ):
                hinges = [hinge_of(j).clamp(min=0) for j in range(4) if labels[j] != labels[i]]
                terms.append(torch.stack(hinges).max() if hardest else torch.stack(hinges).sum())
        return torch.stack(terms).sum() / 4

    c = image.clone().requires_grad_(True)
    d = text.clone().requires_grad_(True)
    explicit(c, d).backward()
    torch.testing.assert_close(a.grad, c.grad)
    torch.testing.assert_close(b.grad, d.grad)


def test_anchor_without_negatives_contributes_zero():
    image, text = unit(3, 4, 3), unit(3, 4, 4)
    assert ranking_loss(image[:1], text[:1], 0.5).item() == 0
    # Row 2 is alone in its instance; rows 0 and 1 only have row 2 as negative.
    loss = ranking_loss(image, text, 0.5, hardest=True, labels=torch.tensor([1, 1, 0]))
    assert loss.item() == pytest.approx(reference_ranking(image, text, 0.5, True, [1, 1, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_ranking_losses_follow_dtype_and_leave_inputs_alone(dtype):
    x, y = t(X3, dtype), t(Y3, dtype)
    before = (x.clone(), y.clone())
    out = ranking_loss(x, y, 0.3, hardest=True, labels=torch.tensor([0, 0, 1]))
    paired = paired_ranking_loss(x, y, y.flip(0), x.flip(0), 0.3)
    for loss in (out, paired):
        assert loss.dtype == dtype and loss.shape == ()
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])


def test_ranking_losses_create_tensors_on_the_input_device():
    # Meta tensors stand in for an accelerator: a new CPU tensor mixed in would raise.
    x, y = torch.empty(3, 2, device="meta"), torch.empty(3, 2, device="meta")
    assert ranking_loss(x, y, 0.3).device.type == "meta"
    assert ranking_loss(x, y, 0.3, hardest=True).device.type == "meta"
    assert paired_ranking_loss(x, y, y, x, 0.3).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_on_cuda_with_cpu_labels():
    x, y = t(X3).cuda(), t(Y3).cuda()
    loss = ranking_loss(x, y, 0.3, labels=torch.tensor([0, 0, 1]))
    assert loss.device.type == "cuda" and loss.item() == pytest.approx(0.5 / 3)
    idx = hardest_negative_indices(x, y, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    assert idx.device.type == "cuda"
    terms = instance_loss(x, y, torch.tensor([0, 1, 1]))
    assert all(term.device.type == "cuda" for term in terms)


@pytest.mark.parametrize(
    ("image", "text", "kwargs", "match"),
    [
        (torch.zeros(3, 2), torch.zeros(2, 2), {}, "text_emb"),
        (torch.zeros(3, 2), torch.zeros(3, 3), {}, "text_emb"),
        (torch.zeros(3), torch.zeros(3), {}, "image_emb"),
        (torch.zeros(0, 2), torch.zeros(0, 2), {}, "image_emb"),
        (torch.zeros(3, 2), torch.zeros(3, 2, dtype=F64), {}, "dtype"),
        (torch.zeros(3, 2), torch.zeros(3, 2), {"labels": torch.tensor([0, 1])}, "labels"),
        (torch.zeros(3, 2), torch.zeros(3, 2), {"labels": torch.zeros(3)}, "integer"),
        (torch.zeros(3, 2), torch.zeros(3, 2), {"margin": -0.1}, "margin"),
        (torch.zeros(3, 2), torch.zeros(3, 2), {"margin": math.nan}, "margin"),
    ],
)
def test_ranking_loss_rejects_bad_inputs(image, text, kwargs, match):
    kwargs = {"margin": 0.2} | kwargs
    with pytest.raises(ValueError, match=match):
        ranking_loss(image, text, **kwargs)


# ---------------------------------------------------------------------------- paired_ranking_loss


def test_paired_ranking_loss_docstring_example():
    x, y = t([[1.0, 0.0], [0.0, 1.0]]), t([[0.8, 0.6], [0.6, 0.8]])
    y_neg, x_neg = t([[0.6, 0.8], [1.0, 0.0]]), t([[0.6, 0.8], [1.0, 0.0]])
    loss = paired_ranking_loss(x, y, y_neg, x_neg, margin=0.5)
    assert loss.item() == pytest.approx(0.63, abs=1e-12)


def test_paired_ranking_loss_gradcheck():
    inputs = [unit(3, 4, seed) for seed in (10, 11, 12, 13)]
    x, y, y_neg, x_neg = inputs
    pos = (x * y).sum(1)
    for hinge in (1.0 - pos + (x * y_neg).sum(1), 1.0 - pos + (x_neg * y).sum(1)):
        assert hinge.abs().min() > 1e-3
    for tensor in inputs:
        tensor.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: paired_ranking_loss(*a, margin=1.0), tuple(inputs))


def test_paired_ranking_loss_is_ranking_loss_with_one_negative():
    # For two pairs each anchor's only negative is the other row: same hinges, same mean.
    x, y = unit(2, 3, 20), unit(2, 3, 21)
    paired = paired_ranking_loss(x, y, y.flip(0), x.flip(0), 0.7)
    assert paired.item() == pytest.approx(ranking_loss(x, y, 0.7).item())


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((3, 2), (3, 2), (2, 2), (3, 2)), "negative_text"),
        (((3, 2), (3, 2), (3, 2), (3, 3)), "negative_image"),
        (((3, 2), (3, 1), (3, 2), (3, 2)), "positive_text"),
        (((3,), (3,), (3,), (3,)), "anchor_image"),
    ],
)
def test_paired_ranking_loss_rejects_bad_shapes(shapes, match):
    with pytest.raises(ValueError, match=match):
        paired_ranking_loss(*(torch.zeros(s) for s in shapes), margin=0.5)


# ----------------------------------------------------------------------- hardest_negative_indices


def test_hardest_negative_indices_docstring_example():
    anchors = t([[1.0, 0.0], [0.0, 1.0]])
    candidates = t([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    idx = hardest_negative_indices(
        anchors, candidates, torch.tensor([0, 1]), torch.tensor([0, 2, 1, 3])
    )
    assert idx.dtype == torch.int64
    assert idx.tolist() == [1, 3]


def test_hardest_negative_indices_skips_same_label_candidates_that_score_highest():
    anchors, candidates = unit(4, 6, 30), unit(9, 6, 31)
    anchor_labels = torch.tensor([0, 1, 2, 3])
    # Give every anchor an exact copy among the candidates, labelled as its own instance.
    candidates = torch.cat([candidates, anchors])
    candidate_labels = torch.tensor([10 + i for i in range(9)] + [0, 1, 2, 3])
    idx = hardest_negative_indices(anchors, candidates, anchor_labels, candidate_labels)
    scores = anchors @ candidates.T
    assert idx.tolist() == scores[:, :9].argmax(dim=1).tolist()
    assert (candidate_labels[idx] != anchor_labels).all()


def test_hardest_negative_indices_returns_no_gradient():
    anchors = unit(2, 3, 40).requires_grad_(True)
    idx = hardest_negative_indices(anchors, unit(5, 3, 41), torch.tensor([0, 1]), torch.arange(5))
    assert not idx.requires_grad


def test_hardest_negative_indices_needs_a_candidate_of_another_label():
    with pytest.raises(ValueError, match=r"anchors \[1\]"):
        hardest_negative_indices(
            unit(2, 3, 50), unit(2, 3, 51), torch.tensor([0, 1]), torch.tensor([1, 1])
        )


@pytest.mark.parametrize(
    ("anchor", "candidate", "anchor_labels", "candidate_labels", "match"),
    [
        ((2, 3), (4, 2), (2,), (4,), "embedding size"),
        ((2,), (4, 3), (2,), (4,), "anchor_emb"),
        ((2, 3), (0, 3), (2,), (0,), "candidate_emb"),
        ((2, 3), (4, 3), (3,), (4,), "anchor_labels"),
        ((2, 3), (4, 3), (2,), (2,), "candidate_labels"),
    ],
)
def test_hardest_negative_indices_rejects_bad_shapes(
    anchor, candidate, anchor_labels, candidate_labels, match
):
    with pytest.raises(ValueError, match=match):
        hardest_negative_indices(
            torch.zeros(anchor),
            torch.zeros(candidate),
            torch.zeros(anchor_labels, dtype=torch.long),
            torch.zeros(candidate_labels, dtype=torch.long),
        )


# ---------------------------------------------------------------------------------- dual_path_loss


def test_dual_path_loss_docstring_example():
    loss = dual_path_loss(t(0.5), t(2.0), t(3.0), (2, 1, 0.1))
    assert loss.item() == pytest.approx(3.3, abs=1e-12)
    assert loss.dtype == F64


def test_dual_path_loss_gradcheck():
    terms = tuple(t(v).requires_grad_(True) for v in (0.5, 2.0, 3.0))
    assert torch.autograd.gradcheck(lambda *a: dual_path_loss(*a, (2.0, 1.0, 0.1)), terms)


@pytest.mark.parametrize(
    "weights", [(2, 1), (2, 1, 0.1, 1), (2, -1, 0.1), (2, math.inf, 0.1), (2, "1", 0.1), 2.0]
)
def test_dual_path_loss_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="weights"):
        dual_path_loss(t(0.5), t(2.0), t(3.0), weights)


def test_dual_path_loss_rejects_non_scalar_terms():
    with pytest.raises(ValueError, match="text_instance"):
        dual_path_loss(t(0.5), t(2.0), t([3.0, 1.0]), (2, 1, 0.1))
