"""Parameter groups with their learning-rate multipliers, the optimiser and the schedules.

The paper trains new layers at the base rate and pretrained parts much slower: the image CNN (frozen
in Stage I, x0.001-0.02 in Stage II) and the word2vec embedding (x0.001).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from imtext.config import TrainConfig


def lr_at(epoch: int, base_lr: float, milestones: Sequence[int], gamma: float) -> float:
    """Step schedule: ``base_lr * gamma ** (number of milestones <= epoch)``; epochs count from 0.

    >>> lr_at(39, 0.1, [40], 0.1), lr_at(40, 0.1, [40], 0.1)
    (0.1, 0.010000000000000002)
    """
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def lr_at_time(t: float, cfg: TrainConfig) -> float:
    """The base learning rate at training time ``t`` in epochs (epoch + fraction of it done).

    A linear warm-up over the first ``warmup_epochs`` multiplies either schedule: ``step`` is
    :func:`lr_at` of the epoch, ``cosine`` falls from ``lr`` after the warm-up to 0 at ``epochs``.

    >>> from types import SimpleNamespace as S
    >>> cfg = S(lr=1.0, epochs=4, warmup_epochs=1.0, lr_schedule="cosine", lr_milestones=[], lr_gamma=0.1)
    >>> [round(lr_at_time(t, cfg), 3) for t in (0.5, 1.0, 2.5, 4.0)]
    [0.5, 1.0, 0.5, 0.0]
    """
    warm = min(1.0, t / cfg.warmup_epochs) if cfg.warmup_epochs > 0 else 1.0
    if cfg.lr_schedule == "cosine":
        span = cfg.epochs - cfg.warmup_epochs
        done = min(1.0, max(0.0, (t - cfg.warmup_epochs) / span)) if span > 0 else 1.0
        return warm * cfg.lr * 0.5 * (1.0 + math.cos(math.pi * done))
    return warm * lr_at(int(t), cfg.lr, cfg.lr_milestones, cfg.lr_gamma)


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Split trainable parameters into ``backbone``, ``words`` and ``new`` groups with ``lr_mult``.

    A group whose multiplier is 0 is frozen instead (no gradients, no optimiser state).
    """
    named = dict(model.named_parameters())
    backbone = {n for n in named if n.startswith("image.backbone.")}
    words = {n for n in named if n.startswith(("text.words.", "text.word_bias"))}
    spec = [
        ("backbone", backbone, cfg.backbone_lr_mult),
        ("words", words, cfg.word_lr_mult),
        ("new", set(named) - backbone - words, 1.0),
    ]
    groups = []
    for name, members, mult in spec:
        params = [named[n] for n in sorted(members)]
        if mult == 0:
            for p in params:
                p.requires_grad_(False)
        elif params:
            groups.append({"name": name, "params": params, "lr_mult": mult})
    return groups


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    for group in groups:
        group["lr"] = cfg.lr * group["lr_mult"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.momentum, 0.999),
        weight_decay=cfg.weight_decay,
        # One fused kernel over all parameters instead of a loop of small ops per tensor: the
        # optimiser step was a fifth of a CPU epoch (bench/bench_train.py).
        fused=_fusable(groups),
    )


def _fusable(groups: list[dict]) -> bool:
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
        for p in params
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every group's rate to ``lr`` times its multiplier; returns ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    return lr


def set_epoch_lr(optimizer: torch.optim.Optimizer, epoch: int, cfg: TrainConfig) -> float:
    """Set every group's rate for the start of ``epoch``; returns the base rate."""
    return set_lr(optimizer, lr_at_time(float(epoch), cfg))
