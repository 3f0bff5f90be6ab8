"""The losses of the other seed methods and the baselines: gradient reversal and the modality loss
(seed 002), InfoNCE with a learned temperature, the two-branch ranking and neighbourhood losses
(seed 003) and the similarity network's logistic loss. Docstring examples, float64 gradient checks,
brute-force references, validation."""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import imtext.losses as losses_pkg
from imtext.losses import (
    GradientReversal,
    adversarial_lambda,
    grad_reverse,
    infonce_loss,
    modality_loss,
    neighbourhood_loss,
    pairwise_distance,
    similarity_loss,
    topk_hinge_mean,
    topk_ranking_loss,
)
from imtext.models.logit_scale import LogitScale

F64 = torch.float64
LOG2, LOG3 = math.log(2), math.log(3)


def t(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_new_loss_modules_import_only_torch_and_the_losses_package():
    root = Path(losses_pkg.__file__).parent
    for name in ("adversarial", "contrastive", "neighbourhood", "similarity"):
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top in {"__future__", "math", "torch", "numpy"} or module.startswith(
                    "imtext.losses"
                ), f"{name}.py imports {module}"


# --------------------------------------------------------------------------- gradient reversal


@pytest.mark.parametrize("lambd", [1.0, 0.5, 0.3, 2.0])
def test_grad_reverse_is_the_identity_forward_and_negates_and_scales_the_gradient(lambd):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    upstream = torch.randn(4, 3, generator=g, dtype=F64)
    y = grad_reverse(x, lambd)
    assert torch.equal(y, x) and y.dtype == x.dtype
    y.backward(upstream)
    # Exactly: negation is exact and the one multiplication is the same on both sides.
    assert torch.equal(x.grad, -(lambd * upstream))
    if lambd == 1.0:
        assert torch.equal(x.grad, -upstream)


def test_grad_reverse_docstring_example():
    x = t([1.0, 2.0]).requires_grad_(True)
    y = grad_reverse(x, 0.5)
    (3 * y).sum().backward()
    assert y.tolist() == [1.0, 2.0]
    assert x.grad.tolist() == [-1.5, -1.5]


def test_grad_reverse_jacobian_is_minus_lambda_times_the_numerical_one():
    # gradcheck must fail here by design: autograd reports -λ·I where finite differences see I.
    x = unit(2, 3, 1).flatten()
    jac = torch.autograd.functional.jacobian(lambda v: grad_reverse(v, 0.25), x)
    assert torch.equal(jac, -0.25 * torch.eye(6, dtype=F64))


def test_grad_reverse_with_zero_lambda_passes_no_gradient():
    x = unit(3, 2, 2).requires_grad_(True)
    grad_reverse(x, 0.0).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_a_discriminator_behind_the_reversal_learns_and_the_encoder_gets_the_reversed_gradient():
    torch.manual_seed(0)
    disc = torch.nn.Linear(3, 1).double()
    image, text = unit(4, 3, 3), unit(5, 3, 4)

    def run(reverse: bool):
        disc.zero_grad()
        a, b = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
        fa, fb = (grad_reverse(a, 0.7), grad_reverse(b, 0.7)) if reverse else (a, b)
        modality_loss(disc(fa).squeeze(1), disc(fb).squeeze(1)).backward()
        return a.grad, b.grad, disc.weight.grad.clone(), disc.bias.grad.clone()

    plain, reversed_ = run(False), run(True)
    # The classifier's own gradient is untouched: it still minimises the modality loss ...
    assert torch.equal(plain[2], reversed_[2]) and torch.equal(plain[3], reversed_[3])
    # ... while the embeddings receive -λ times theirs: the encoders maximise it.
    assert torch.equal(reversed_[0], -(0.7 * plain[0]))
    assert torch.equal(reversed_[1], -(0.7 * plain[1]))


@pytest.mark.parametrize("lambd", [-0.1, math.nan, math.inf, True, "1"])
def test_grad_reverse_rejects_bad_lambda(lambd):
    with pytest.raises(ValueError, match="lambd"):
        grad_reverse(torch.zeros(2), lambd)


def test_gradient_reversal_function_is_exported():
    x = t([1.0]).requires_grad_(True)
    GradientReversal.apply(x, 2.0).backward()
    assert x.grad.item() == -2.0


def test_adversarial_lambda_docstring_values():
    assert adversarial_lambda(0.0) == 0.0
    assert adversarial_lambda(0.1) == pytest.approx(2 / (1 + math.exp(-1)) - 1)
    assert adversarial_lambda(0.1) == pytest.approx(0.462117, abs=1e-6)
    assert adversarial_lambda(1.0) == pytest.approx(0.999909, abs=1e-6)
    assert adversarial_lambda(1.0, max_lambda=0.1) == pytest.approx(0.0999909, abs=1e-7)
    ramp = [adversarial_lambda(p / 10) for p in range(11)]
    assert ramp == sorted(ramp)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"progress": -0.1}, "progress"),
        ({"progress": 1.5}, "progress"),
        ({"progress": 0.5, "max_lambda": -1.0}, "max_lambda"),
        ({"progress": 0.5, "gamma": 0.0}, "gamma"),
    ],
)
def test_adversarial_lambda_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adversarial_lambda(**kwargs)


# ------------------------------------------------------------------------------- modality_loss


def test_modality_loss_docstring_example():
    loss = modality_loss(t([0.0, LOG3]), t([LOG3]))
    assert loss.item() == pytest.approx(((LOG2 + math.log(4 / 3)) / 2 + math.log(4)) / 2)
    assert loss.item() == pytest.approx(0.938354, abs=1e-6)


def test_modality_loss_is_log2_at_chance_and_balances_the_modalities():
    assert modality_loss(torch.zeros(3, dtype=F64), torch.zeros(7, dtype=F64)).item() == (
        pytest.approx(LOG2)
    )
    image, text = t([0.3, -1.0]), t([2.0, 0.5])
    # Twice as many sentences (each repeated) change nothing: each modality's mean counts half.
    assert modality_loss(image, text).item() == pytest.approx(
        modality_loss(image, text.repeat(2)).item()
    )


def test_modality_loss_matches_binary_cross_entropy():
    image, text = t([0.3, -1.0, 4.0]), t([2.0, 0.5])
    expected = (
        F.binary_cross_entropy_with_logits(image, torch.ones_like(image))
        + F.binary_cross_entropy_with_logits(text, torch.zeros_like(text))
    ) / 2
    assert modality_loss(image, text).item() == pytest.approx(expected.item())


def test_modality_loss_gradcheck():
    g = torch.Generator().manual_seed(5)
    image = torch.randn(3, generator=g, dtype=F64, requires_grad=True)
    text = torch.randn(4, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(modality_loss, (image, text))


@pytest.mark.parametrize(
    ("image", "text", "match"),
    [
        (torch.zeros(2, 1), torch.zeros(2), "image_logits"),
        (torch.zeros(2), torch.zeros(0), "text_logits"),
        (torch.zeros(2), torch.zeros(2, dtype=F64), "dtype"),
    ],
)
def test_modality_loss_rejects_bad_inputs(image, text, match):
    with pytest.raises(ValueError, match=match):
        modality_loss(image, text)


# -------------------------------------------------------------------------------- infonce_loss

X2 = [[1.0, 0.0], [0.0, 1.0]]
Y2 = [[1.0, 0.0], [0.6, 0.8]]


def reference_infonce(image, text, scale, labels=None) -> float:
    """Plain loops over rows and columns: -log softmax at the target, masked pairs left out."""
    n = image.shape[0]
    z = [[scale * float(image[i] @ text[j]) for j in range(n)] for i in range(n)]

    def kept(i, j):
        return i == j or labels is None or labels[i] != labels[j]

    rows = [
        -z[i][i] + math.log(sum(math.exp(z[i][j]) for j in range(n) if kept(i, j)))
        for i in range(n)
    ]
    cols = [
        -z[j][j] + math.log(sum(math.exp(z[i][j]) for i in range(n) if kept(i, j)))
        for j in range(n)
    ]
    return (sum(rows) / n + sum(cols) / n) / 2


def test_infonce_loss_docstring_example():
    loss = infonce_loss(t(X2), t(Y2), t(LOG2))
    hand = (softplus(-0.8) + softplus(-1.6) + softplus(-2.0) + softplus(-0.4)) / 4
    assert loss.item() == pytest.approx(hand, abs=1e-12)
    assert loss.item() == pytest.approx(0.298736, abs=1e-6)
    for value, rounded in zip(
        (softplus(-0.8), softplus(-1.6), softplus(-2.0), softplus(-0.4)),
        (0.371101, 0.183901, 0.126928, 0.513015),
        strict=True,
    ):
        assert value == pytest.approx(rounded, abs=1e-6)
    same = infonce_loss(t(X2), t(Y2), t(LOG2), labels=torch.tensor([0, 0]))
    assert same.item() == 0.0


@pytest.mark.parametrize("labels", [None, [0, 1, 0, 2, 1]])
@pytest.mark.parametrize("seed", [0, 1])
def test_infonce_loss_matches_loops(labels, seed):
    image, text = unit(5, 4, seed), unit(5, 4, seed + 50)
    label_tensor = None if labels is None else torch.tensor(labels)
    for scale in (1.0, 7.5, 100.0):
        loss = infonce_loss(image, text, t(math.log(scale)), labels=label_tensor)
        assert loss.item() == pytest.approx(reference_infonce(image, text, scale, labels))


def test_infonce_loss_clamps_the_scale_to_one_and_max_scale():
    image, text = unit(4, 3, 2), unit(4, 3, 3)
    at_cap = infonce_loss(image, text, t(math.log(100.0)))
    above = t(math.log(1000.0)).requires_grad_(True)
    loss = infonce_loss(image, text, above)
    assert loss.item() == pytest.approx(at_cap.item())
    loss.backward()
    assert above.grad.item() == 0.0
    below = infonce_loss(image, text, t(-3.0))
    assert below.item() == pytest.approx(reference_infonce(image, text, 1.0))
    capped_at_10 = infonce_loss(image, text, t(math.log(50.0)), max_scale=10.0)
    assert capped_at_10.item() == pytest.approx(reference_infonce(image, text, 10.0))


def test_infonce_loss_gradcheck_including_the_temperature():
    image = unit(3, 4, 10).requires_grad_(True)
    text = unit(3, 4, 11).requires_grad_(True)
    log_scale = t(math.log(5.0)).requires_grad_(True)
    assert torch.autograd.gradcheck(infonce_loss, (image, text, log_scale))
    labels = torch.tensor([0, 1, 0])
    assert torch.autograd.gradcheck(
        lambda a, b, s: infonce_loss(a, b, s, labels=labels), (image, text, log_scale)
    )


def test_logit_scale_is_clip_s_log_parameter_and_clamps_in_place():
    scale = LogitScale()
    assert isinstance(scale.log_scale, torch.nn.Parameter) and scale.log_scale.shape == ()
    assert scale().item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert [p is scale.log_scale for p in scale.parameters()] == [True]
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    scale.clamp_()
    assert scale().item() == pytest.approx(math.log(100.0), rel=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(-1.0)
    scale.clamp_()
    assert scale().item() == 0.0
    # Trainable through the loss: the optimiser moves it.
    scale = LogitScale(init_temperature=0.5)
    opt = torch.optim.SGD(scale.parameters(), lr=0.1)
    infonce_loss(unit(4, 3, 4).float(), unit(4, 3, 5).float(), scale()).backward()
    before = scale().item()
    opt.step()
    assert scale().item() != before
    with pytest.raises(ValueError, match="init_temperature"):
        LogitScale(init_temperature=0.0)


def test_logit_scale_keeps_its_parameter_inside_the_loss_s_default_cap():
    # The model part and the loss are in layers that may not import each other: each states the cap.
    loss_cap = inspect.signature(infonce_loss).parameters["max_scale"].default
    assert LogitScale().max_scale == loss_cap


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_infonce_loss_follows_dtype_and_device(dtype):
    x, y = t(X2, dtype), t(Y2, dtype)
    assert infonce_loss(x, y, t(LOG2, dtype)).dtype == dtype
    meta = torch.empty(3, 2, device="meta")
    out = infonce_loss(meta, meta, torch.empty((), device="meta"), labels=torch.tensor([0, 0, 1]))
    assert out.device.type == "meta"


@pytest.mark.parametrize(
    ("image", "text", "log_scale", "kwargs", "match"),
    [
        (torch.zeros(3, 2), torch.zeros(2, 2), torch.zeros(()), {}, "text_emb"),
        (torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(1), {}, "log_scale"),
        (torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(()), {"max_scale": 0.5}, "max_scale"),
        (
            torch.zeros(3, 2),
            torch.zeros(3, 2),
            torch.zeros(()),
            {"labels": torch.tensor([0, 1])},
            "labels",
        ),
    ],
)
def test_infonce_loss_rejects_bad_inputs(image, text, log_scale, kwargs, match):
    with pytest.raises(ValueError, match=match):
        infonce_loss(image, text, log_scale, **kwargs)


# ----------------------------------------------------------------- two-branch: shared example

IMAGES = [[1.0, 0.0], [0.0, 1.0]]
SENTENCES = [[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]]
SENTENCE_IMAGE = [0, 0, 1]


def dist(cos: float) -> float:
    return math.sqrt(2 - 2 * cos + 1e-4)


def test_pairwise_distance_is_the_official_eps_euclidean_distance():
    a, b = unit(4, 3, 20), unit(5, 3, 21)
    d = pairwise_distance(a, b)
    torch.testing.assert_close(d, (torch.cdist(a, b) ** 2 + 1e-4).sqrt())
    assert pairwise_distance(a, a).diagonal().tolist() == pytest.approx([0.01] * 4)
    for cos, rounded in (
        (1, 0.01),
        (0.8, 0.632535),
        (0.6, 0.894483),
        (0, 1.414249),
        (0.96, 0.283019),
    ):
        assert dist(cos) == pytest.approx(rounded, abs=1e-6)


# ------------------------------------------------------------ brute-force references (loops)


def brute_topk_mean(per_anchor_hinges: list[list[float]], k: int) -> float:
    total = 0.0
    for hinges in per_anchor_hinges:
        kept = sorted((max(0.0, h) for h in hinges), reverse=True)[:k]
        total += sum(kept) / len(kept) if kept else 0.0
    return total / len(per_anchor_hinges)


def brute_distance(a, b) -> float:
    return math.sqrt(max(0.0, float(a @ a) - 2 * float(a @ b) + float(b @ b)) + 1e-4)


def brute_two_branch(image, text, text_image, margin, k, image_labels=None):
    n, m = image.shape[0], text.shape[0]
    label = list(range(n)) if image_labels is None else [int(v) for v in image_labels]
    own = [int(v) for v in text_image]
    image_hinges, sentence_hinges, neighbour_hinges = [], [], []
    for i in range(m):
        pos = brute_distance(text[i], image[own[i]])
        image_hinges.append(
            [
                margin + pos - brute_distance(text[i], image[j])
                for j in range(n)
                if label[j] != label[own[i]]
            ]
        )
        sentence_hinges.append(
            [
                margin + pos - brute_distance(text[j], image[own[i]])
                for j in range(m)
                if label[own[j]] != label[own[i]]
            ]
        )
        nearest_far = max(brute_distance(text[i], text[j]) for j in range(m) if own[j] == own[i])
        neighbour_hinges.append(
            [
                margin + nearest_far - brute_distance(text[i], text[j])
                for j in range(m)
                if label[own[j]] != label[own[i]]
            ]
        )
    return (
        brute_topk_mean(image_hinges, k),
        brute_topk_mean(sentence_hinges, k),
        brute_topk_mean(neighbour_hinges, k),
    )


def test_brute_force_reproduces_the_docstring_examples():
    ref = brute_two_branch(t(IMAGES), t(SENTENCES), SENTENCE_IMAGE, 0.5, 2)
    assert ref == pytest.approx((0.158701, 0.119026, 0.400352), abs=1e-6)


# ------------------------------------------------------------------------ topk_ranking_loss


def test_topk_ranking_loss_docstring_example():
    image_term, sentence_term = topk_ranking_loss(
        t(IMAGES), t(SENTENCES), torch.tensor(SENTENCE_IMAGE), margin=0.5, top_k=2
    )
    h = 0.5 + dist(0.8) - dist(0.6)
    assert h == pytest.approx(0.238051, abs=1e-6)
    assert image_term.item() == pytest.approx(2 * h / 3, abs=1e-12)
    assert image_term.item() == pytest.approx(0.158701, abs=1e-6)
    assert sentence_term.item() == pytest.approx((h + h / 2) / 3, abs=1e-12)
    assert sentence_term.item() == pytest.approx(0.119026, abs=1e-6)


def random_batch(seed: int, n: int = 5, d: int = 4, counts=(3, 1, 2, 2, 1)):
    g = torch.Generator().manual_seed(seed)
    text_image = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])
    text_image = text_image[torch.randperm(len(text_image), generator=g)]
    return unit(n, d, seed), unit(len(text_image), d, seed + 1000), text_image


@pytest.mark.parametrize("image_labels", [None, [0, 1, 0, 2, 3]])
@pytest.mark.parametrize("top_k", [1, 2, 3, 50])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_branch_losses_match_the_double_loop(image_labels, top_k, seed):
    image, text, text_image = random_batch(seed)
    labels = None if image_labels is None else torch.tensor(image_labels)
    for margin in (0.05, 0.4, 2.0):
        ref = brute_two_branch(image, text, text_image, margin, top_k, image_labels)
        image_term, sentence_term = topk_ranking_loss(
            image, text, text_image, margin, top_k, image_labels=labels
        )
        nbr = neighbourhood_loss(text, text_image, margin, top_k, image_labels=labels)
        got = (image_term.item(), sentence_term.item(), nbr.item())
        assert got == pytest.approx(ref, abs=1e-12)


def test_top_1_keeps_the_largest_violation_and_a_large_k_averages_all_negatives():
    image, text, text_image = random_batch(3)
    ti = text_image.tolist()
    d = pairwise_distance(text, image)
    hinge = 2.0 + d.gather(1, text_image[:, None]) - d  # margin 2: every hinge is active
    negative = torch.tensor([[j != ti[i] for j in range(5)] for i in range(len(ti))])
    hardest = hinge.masked_fill(~negative, -math.inf).amax(1).mean()
    everything = (hinge * negative).sum(1) / negative.sum(1)
    image_term_1, _ = topk_ranking_loss(image, text, text_image, 2.0, 1)
    image_term_all, _ = topk_ranking_loss(image, text, text_image, 2.0, 10)
    assert image_term_1.item() == pytest.approx(hardest.item())
    assert image_term_all.item() == pytest.approx(everything.mean().item())


def test_topk_hinge_mean_counts_anchors_without_negatives_as_zero():
    hinge = t([[0.5, 0.2, -1.0], [0.3, 0.9, 0.1]])
    negative = torch.tensor([[False, False, False], [True, True, False]])
    # Anchor 0: no negatives -> 0; anchor 1: top 2 of (0.3, 0.9) -> 0.6.
    assert topk_hinge_mean(hinge, negative, 2).item() == pytest.approx(0.3)
    assert topk_hinge_mean(hinge, negative, 1).item() == pytest.approx(0.45)


def _assert_away_from_kinks(hinge: torch.Tensor, negative: torch.Tensor, k: int) -> None:
    """No active hinge near 0 and no near-tie at an anchor's k-th largest (gradcheck guard)."""
    for row, keep in zip(hinge, negative, strict=True):
        values = row[keep].sort(descending=True).values
        assert values.abs().min() > 1e-3
        if values.numel() > k:
            assert values[k - 1] - values[k] > 1e-3


@pytest.mark.parametrize("top_k", [2, 50])
def test_two_branch_losses_gradcheck(top_k):
    image, text, text_image = random_batch(7, d=3)
    margin = 0.3
    ti = text_image
    d_ti = pairwise_distance(text, image)
    pos = d_ti.gather(1, ti[:, None])
    labels = torch.arange(5)
    _assert_away_from_kinks(margin + pos - d_ti, labels[ti][:, None] != labels[None, :], top_k)
    _assert_away_from_kinks(margin + pos - d_ti[:, ti].T, ti[:, None] != ti[None, :], top_k)
    d_tt = pairwise_distance(text, text)
    far = d_tt.masked_fill(ti[:, None] != ti[None, :], -math.inf)
    top2 = far.topk(2, dim=1).values
    assert ((top2[:, 0] - top2[:, 1]).abs() > 1e-3).all()  # a unique farthest positive
    _assert_away_from_kinks(
        margin + far.amax(1, keepdim=True) - d_tt, ti[:, None] != ti[None, :], top_k
    )
    image.requires_grad_(True)
    text.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: torch.stack(topk_ranking_loss(a, b, ti, margin, top_k)), (image, text)
    )
    assert torch.autograd.gradcheck(lambda b: neighbourhood_loss(b, ti, margin, top_k), (text,))


def test_one_instance_everywhere_means_no_negatives_zero_loss_and_zero_gradient():
    image, text, text_image = random_batch(4)
    image.requires_grad_(True)
    text.requires_grad_(True)
    same = torch.zeros(5, dtype=torch.long)
    terms = topk_ranking_loss(image, text, text_image, 0.5, 3, image_labels=same)
    nbr = neighbourhood_loss(text, text_image, 0.5, 3, image_labels=same)
    total = terms[0] + terms[1] + nbr
    total.backward()
    assert total.item() == 0.0
    assert torch.equal(image.grad, torch.zeros_like(image))
    assert torch.equal(text.grad, torch.zeros_like(text))


# ------------------------------------------------------------------------ neighbourhood_loss


def test_neighbourhood_loss_docstring_example():
    loss = neighbourhood_loss(t(SENTENCES), torch.tensor(SENTENCE_IMAGE), margin=0.5, top_k=2)
    s0 = 0.5 + dist(0.8) - dist(0.6)
    s1 = 0.5 + dist(0.8) - dist(0.96)
    s2 = (0.5 + dist(1.0) - dist(0.96)) / 2
    assert (s0, s1, s2) == pytest.approx((0.238051, 0.849515, 0.113490), abs=1e-6)
    assert loss.item() == pytest.approx((s0 + s1 + s2) / 3, abs=1e-12)
    assert loss.item() == pytest.approx(0.400352, abs=1e-6)


def test_a_sentence_alone_in_its_image_uses_itself_as_positive():
    text = t([[1.0, 0.0], [0.0, 1.0]])
    loss = neighbourhood_loss(text, torch.tensor([0, 1]), margin=2.0, top_k=5)
    # Each anchor: 2 + 0.01 - sqrt(2.0001).
    assert loss.item() == pytest.approx(2 + 0.01 - dist(0.0))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_two_branch_losses_follow_dtype(dtype):
    image, text, ti = t(IMAGES, dtype), t(SENTENCES, dtype), torch.tensor(SENTENCE_IMAGE)
    for term in (*topk_ranking_loss(image, text, ti, 0.5, 2), neighbourhood_loss(text, ti, 0.5, 2)):
        assert term.dtype == dtype and term.shape == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_new_losses_on_cuda_with_cpu_index_tensors():
    image, text = t(IMAGES).cuda(), t(SENTENCES).cuda()
    ti = torch.tensor(SENTENCE_IMAGE)
    image_term, sentence_term = topk_ranking_loss(image, text, ti, 0.5, 2)
    nbr = neighbourhood_loss(text, ti, 0.5, 2, image_labels=torch.tensor([0, 1]))
    for term, expected in ((image_term, 0.158701), (sentence_term, 0.119026), (nbr, 0.400352)):
        assert term.device.type == "cuda" and term.item() == pytest.approx(expected, abs=1e-6)
    assert infonce_loss(t(X2).cuda(), t(Y2).cuda(), t(LOG2).cuda()).device.type == "cuda"
    assert similarity_loss(t([0.0]).cuda(), torch.tensor([1])).device.type == "cuda"
    assert modality_loss(t([0.0]).cuda(), t([0.0]).cuda()).device.type == "cuda"


RANKING_ARGS = {
    "image_emb": torch.zeros(2, 2),
    "text_emb": torch.zeros(3, 2),
    "text_image": torch.tensor([0, 1, 1]),
    "margin": 0.1,
    "top_k": 1,
}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"text_emb": torch.zeros(3, 3)}, "text_emb"),
        ({"text_emb": torch.zeros(3, 2, dtype=F64)}, "dtype"),
        ({"image_emb": torch.zeros(0, 2)}, "image_emb"),
        ({"text_image": torch.tensor([0, 1, 2])}, "text_image"),
        ({"text_image": torch.tensor([0, -1, 1])}, "text_image"),
        ({"text_image": torch.tensor([0, 1])}, "text_image"),
        ({"text_image": torch.tensor([0.0, 1.0, 1.0])}, "integer"),
        ({"margin": -0.1}, "margin"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"image_labels": torch.tensor([0])}, "image_labels"),
    ],
)
def test_topk_ranking_loss_rejects_bad_inputs(overrides, match):
    with pytest.raises(ValueError, match=match):
        topk_ranking_loss(**(RANKING_ARGS | overrides))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"text_emb": torch.zeros(0, 2), "text_image": torch.zeros(0, dtype=torch.long)},
            "text_emb",
        ),
        ({"image_labels": torch.tensor([0])}, "text_image"),
        ({"margin": math.nan}, "margin"),
        ({"top_k": 2.0}, "top_k"),
    ],
)
def test_neighbourhood_loss_rejects_bad_inputs(overrides, match):
    args = {key: RANKING_ARGS[key] for key in ("text_emb", "text_image", "margin", "top_k")}
    with pytest.raises(ValueError, match=match):
        neighbourhood_loss(**(args | overrides))


# --------------------------------------------------------------------------- similarity_loss


def test_similarity_loss_docstring_example():
    loss = similarity_loss(t([0.0, LOG3, LOG3]), torch.tensor([1, 1, -1]))
    assert loss.item() == pytest.approx((LOG2 + math.log(4 / 3) + math.log(4)) / 3, abs=1e-12)
    assert loss.item() == pytest.approx(0.789041, abs=1e-6)


def test_similarity_loss_is_binary_cross_entropy_on_0_1_targets():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, generator=g, dtype=F64)
    targets = torch.tensor([1, -1, -1, 1, -1, -1, -1], dtype=torch.float32)
    expected = F.binary_cross_entropy_with_logits(scores, (targets.double() + 1) / 2)
    assert similarity_loss(scores, targets).item() == pytest.approx(expected.item())


def test_similarity_loss_gradcheck():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, generator=g, dtype=F64, requires_grad=True)
    targets = torch.tensor([1, -1, 1, -1, -1])
    assert torch.autograd.gradcheck(lambda s: similarity_loss(s, targets), (scores,))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_similarity_loss_follows_dtype(dtype):
    out = similarity_loss(torch.zeros(2, dtype=dtype), torch.tensor([1, -1], dtype=torch.int8))
    assert out.dtype == dtype and out.item() == pytest.approx(LOG2)


@pytest.mark.parametrize(
    ("scores", "targets", "match"),
    [
        (torch.zeros(2), torch.tensor([1, 0]), r"\+1"),
        (torch.zeros(2), torch.tensor([1, 2]), r"\+1"),
        (torch.zeros(2), torch.tensor([True, False]), "dtype"),
        (torch.zeros(2), torch.tensor([1, -1, 1]), "targets"),
        (torch.zeros(2, 1), torch.tensor([1, -1]), "scores"),
        (torch.zeros(0), torch.zeros(0), "scores"),
    ],
)
def test_similarity_loss_rejects_bad_targets(scores, targets, match):
    with pytest.raises(ValueError, match=match):
        similarity_loss(scores, targets)
