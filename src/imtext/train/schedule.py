"""Parameter groups with their learning-rate multipliers, the optimiser and the step schedule.

The paper trains new layers at the base rate and pretrained parts much slower: the image CNN (frozen
in Stage I, x0.001-0.02 in Stage II) and the word2vec embedding (x0.001).
"""

from __future__ import annotations

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
        groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay
    )


def set_epoch_lr(optimizer: torch.optim.Optimizer, epoch: int, cfg: TrainConfig) -> float:
    """Set every group's rate for ``epoch``; returns the base rate."""
    lr = lr_at(epoch, cfg.lr, cfg.lr_milestones, cfg.lr_gamma)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    return lr
