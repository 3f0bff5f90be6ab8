"""What a training step minimises: every choice that follows from ``ranking``, ``loss_weights`` and
the adversarial settings is made here, both for the batch a step needs and for its loss terms.

``loss = λ_r·rank + λ_i·inst_image + λ_t·inst_text`` (``loss_weights``), where ``rank`` is the term
of ``ranking``, ``+ adversarial_weight·adv`` when the model has a modality discriminator:

- the paper's dual-path model: ``ranking: paired_hard`` (or ``paired_random``), a hinge with one
  negative caption per anchor image mined from ``candidate_pool`` captions outside the batch (the
  batch is built by :func:`~imtext.train.batches.mined_batch`); with the instance losses.
- VSE++: ``ranking: batch_hardest``, ``loss_weights: [1, 0, 0]``; the hardest in-batch negative.
  ``batch_sum`` sums over every in-batch negative.
- InfoNCE: ``ranking: infonce``; symmetric in-batch InfoNCE with a learned temperature (the
  model's ``logit_scale``, see :func:`learns_temperature`).
- modality-adversarial: ``adversarial_weight > 0`` with ``model.discriminator_dims``; any
  embedding loss plus the discriminator's loss behind a gradient reversal whose coefficient
  follows :func:`reversal_coefficient`.
- two-branch embedding network: ``model.method: two_branch``, ``ranking: topk``,
  ``sentences_per_image > 1`` (neighbourhood batches); top-K bidirectional ranking plus the
  neighbourhood constraint (:func:`topk_term`).
- two-branch similarity network: ``model.method: similarity``, ``ranking: logistic``; the
  logistic loss on positive and sampled negative pairs (:func:`~imtext.train.batches.with_negative_pairs`).

The ranking term is weighted by ``loss_weights[0]`` for every method, and the instance loss stays
available to every method through the other two weights. The paper's model gets exactly the four
terms it always had; the other methods add theirs (``adv``, ``temperature``, ``rank_t2i`` ...) to
the logged losses.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from imtext.config import TrainConfig
from imtext.data.store import PreparedSplit
from imtext.losses import (
    adversarial_lambda,
    dual_path_loss,
    grad_reverse,
    infonce_loss,
    instance_loss,
    modality_loss,
    neighbourhood_loss,
    paired_ranking_loss,
    ranking_loss,
    similarity_loss,
    topk_ranking_loss,
)
from imtext.models.dual_path import DualPathModel
from imtext.train.batches import Batch, batch_of, mined_batch, with_negative_pairs


def ranks_mined_pairs(cfg: TrainConfig) -> bool:
    """Whether steps train on mined batches (``paired_*`` with a ranking weight): images ``P + N``,
    texts ``P`` captions and one negative per anchor."""
    return cfg.loss_weights[0] > 0 and cfg.ranking.startswith("paired")


def learns_temperature(cfg: TrainConfig) -> bool:
    """Whether the objective has a learned temperature (the model's ``logit_scale``)."""
    return cfg.ranking == "infonce" and cfg.loss_weights[0] > 0


# ------------------------------------------------------------------------------ the batch


def step_batch(
    core: DualPathModel,
    items: dict[str, torch.Tensor],
    train: PreparedSplit,
    cfg: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
) -> Batch:
    """The batch a step of ``cfg``'s objective trains on, from the loader's ``items``."""
    if ranks_mined_pairs(cfg):
        hardest = cfg.ranking == "paired_hard"
        batch = mined_batch(core, items, train, cfg, rng, device, hardest=hardest)
    else:
        batch = batch_of(items)
    if cfg.ranking == "logistic":
        batch = with_negative_pairs(batch, cfg.negatives_per_positive, rng)
    return batch


def reversal_coefficient(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """The gradient-reversal λ at global ``step`` (0-based) of a stage.

    0 during the ``adversarial_warmup_epochs`` (the discriminator learns alone), then
    :func:`~imtext.losses.adversarial_lambda` of the progress through the remaining steps, rising
    to ``adversarial_lambda``. A function of the step count only, so a resumed run continues the
    ramp where it stopped.
    """
    warm = cfg.adversarial_warmup_epochs * steps_per_epoch
    if step < warm:
        return 0.0
    remaining = max(1, cfg.epochs * steps_per_epoch - warm)
    return adversarial_lambda(min(1.0, (step - warm) / remaining), cfg.adversarial_lambda)


def forward_kwargs(batch: Batch, cfg: TrainConfig, has_discriminator: bool, lam: float) -> dict:
    """What the model's forward needs besides images and tokens: the gradient reversal in front
    of the discriminator, the pairs to score. Empty for the paper's model (forward unchanged)."""
    kwargs: dict = {}
    if has_discriminator:
        kwargs["reverse"] = functools.partial(grad_reverse, lambd=lam)
    if batch.pairs is not None:
        kwargs["pairs"] = batch.pairs
    return kwargs


# ------------------------------------------------------------------------------- the losses


def step_losses(out: Any, batch: Batch, cfg: TrainConfig, device: torch.device) -> dict:
    """Loss terms of one step; ``loss`` is what is minimised (the sum in the module docstring).

    ``out`` is the model's :class:`~imtext.models.dual_path.MethodOutput` (or the plain dual-path
    output).
    """
    image_inst, text_inst = instance_terms(out, batch, device)
    rank, parts = ranking_term(out, batch, cfg, device)
    total = dual_path_loss(rank, image_inst, text_inst, tuple(cfg.loss_weights))
    losses = {"loss": total, "rank": rank, "inst_image": image_inst, "inst_text": text_inst}
    if getattr(out, "image_modality", None) is not None:
        # Always in the sum, at weight 0 too: every parameter then gets a gradient (DDP needs it).
        adv = modality_loss(out.image_modality.float(), out.text_modality.float())
        losses["loss"] = total + cfg.adversarial_weight * adv
        losses["adv"] = adv
    return {**losses, **parts}


def instance_terms(
    out: Any, batch: Batch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and text instance (classification) losses."""
    image_labels = batch.image_labels.to(device)
    text_labels = batch.text_labels.to(device)
    image_logits = out.image_logits.float()
    if batch.caption_slot is not None:
        # Several captions per image: each image's term counts once per caption, row by row.
        image_logits, image_labels = image_logits[batch.caption_slot.to(device)], text_labels
    return instance_loss(image_logits, out.text_logits.float(), image_labels, text_labels)


def ranking_term(
    out: Any, batch: Batch, cfg: TrainConfig, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ranking term of ``cfg.ranking`` (0 at ranking weight 0) and the parts worth logging.

    ``out`` holds embeddings (B, E) and (T, E), L2-normalised, and for ``infonce`` / ``logistic``
    the log-scale and the pair scores.
    """
    image_emb, text_emb = out.image_emb.float(), out.text_emb.float()
    if cfg.loss_weights[0] == 0:
        return image_emb.new_zeros(()), {}
    if cfg.ranking.startswith("paired"):
        half = len(image_emb) // 2
        return paired_ranking_loss(
            image_emb[:half], text_emb[:half], text_emb[half:], image_emb[half:], cfg.margin
        ), {}
    if cfg.ranking == "logistic":
        return similarity_loss(out.pair_scores.float(), batch.pair_targets.to(device)), {}
    slot = batch.slot().to(device)
    if cfg.ranking == "topk":
        return topk_term(image_emb, text_emb, slot, batch.image_labels.to(device), cfg)
    labels = batch.text_labels.to(device)
    paired_images = image_emb if batch.caption_slot is None else image_emb[slot]
    if cfg.ranking == "infonce":
        log_scale = out.log_scale.float()
        loss = infonce_loss(paired_images, text_emb, log_scale, labels=labels)
        return loss, {"temperature": (-log_scale).exp().detach()}
    hardest = cfg.ranking == "batch_hardest"
    return ranking_loss(paired_images, text_emb, cfg.margin, hardest=hardest, labels=labels), {}


def topk_term(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    slot: torch.Tensor,
    image_labels: torch.Tensor,
    cfg: TrainConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The two-branch embedding loss: ``w_t2i * image_term + w_i2t * sentence_term +
    neighbour_weight * neighbourhood`` (official weights 1.5, 1, 0.05), with its parts.

    ``image_emb`` (B, E), ``text_emb`` (T, E) L2-normalised; ``slot`` (T,) each caption's image row.
    """
    image_term, sentence_term = topk_ranking_loss(
        image_emb, text_emb, slot, cfg.margin, cfg.top_k, image_labels=image_labels
    )
    w_t2i, w_i2t = cfg.direction_weights
    loss = w_t2i * image_term + w_i2t * sentence_term
    parts = {"rank_t2i": image_term, "rank_i2t": sentence_term}
    if cfg.neighbour_weight > 0:
        neighbour = neighbourhood_loss(
            text_emb, slot, cfg.margin, cfg.top_k, image_labels=image_labels
        )
        loss = loss + cfg.neighbour_weight * neighbour
        parts["neighbour"] = neighbour
    return loss, parts
