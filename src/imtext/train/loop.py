"""The training loop shared by Stage I (``pretrain``) and Stage II (``finetune``).

Reproducibility: every epoch derives its seeds from ``(seed, epoch)`` (shuffling, augmentation,
dropout, candidate sampling), so an epoch replayed after a resume draws exactly what the
uninterrupted run drew. A checkpoint is written atomically after every epoch; ``resume`` continues
from the last one. The loop reports through ``log(metrics, step)`` and knows nothing of MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from imtext.config import (
    MODEL_METHOD_DEFAULTS,
    TRAIN_METHOD_DEFAULTS,
    ModelConfig,
    TrainConfig,
    check_method,
    config_from_dict,
    config_to_dict,
    with_method_defaults,
)
from imtext.data.datasets import InstanceTrainDataset, train_transform
from imtext.data.store import PreparedSplit, read_vocabulary
from imtext.data.text import random_shift
from imtext.errors import ConfigError, DataError, ImtextError
from imtext.eval.embed import retrieval_inputs
from imtext.eval.metrics import retrieval_metrics
from imtext.losses import (
    dual_path_loss,
    hardest_negative_indices,
    instance_loss,
    modality_loss,
    paired_ranking_loss,
)
from imtext.models import build_model
from imtext.models.dual_path import DualPathModel
from imtext.models.files import MODEL_FILE, load_file, load_model, model_record, save_atomic
from imtext.models.logit_scale import LogitScale
from imtext.models.word2vec import init_word_embedding, read_word_vectors
from imtext.train import distributed
from imtext.train.checkpoint import CHECKPOINT_FILE, rng_state, set_rng_state
from imtext.train.methods import (
    Batch,
    NeighbourhoodDataset,
    batch_of,
    epoch_neighbourhood_batches,
    forward_kwargs,
    ranking_term,
    reversal_coefficient,
    with_negative_pairs,
)
from imtext.train.sampling import sample_candidates
from imtext.train.schedule import (
    build_optimizer,
    lr_at_time,
    parameter_groups,
    set_epoch_lr,
    set_lr,
)

Log = Callable[[dict[str, float], int], None]
logger = logging.getLogger("imtext.train")

METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
#: Steps between two step-level calls of ``log``.
LOG_EVERY = 20


def _no_log(metrics: dict[str, float], step: int) -> None:
    pass


@dataclass
class RunState:
    """Everything besides weights and optimiser that a resumed run must get back."""

    epoch: int = 0  # epochs completed
    step: int = 0
    best_rsum: float = -math.inf
    best_epoch: int = -1
    bad_evals: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


__all__ = ["Batch", "step_losses", "train_stage", "validate"]


# ---------------------------------------------------------------------------- per-step pieces


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, epoch, process)."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**31


def mined_batch(
    core: DualPathModel,
    items: dict[str, torch.Tensor],
    train: PreparedSplit,
    cfg: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
) -> Batch:
    """The paper's Stage II batch: images ``P + N``, texts ``P captions + one negative per P image``.

    Negatives come from ``candidate_pool`` random captions of images outside the batch; with
    ``paired_hard`` the one scoring highest against each anchor (the network in eval mode, no
    gradient), with ``paired_random`` a random one.
    """
    images, tokens, labels = items["image"], items["tokens"], items["label"]
    half = len(labels) // 2
    pool = sample_candidates(rng, train.caption_labels, labels.numpy(), cfg.candidate_pool)
    rows = train.tokens[pool]
    if cfg.text_shift:
        rows = np.stack(
            [random_shift(r, int(n), rng) for r, n in zip(rows, train.lengths[pool], strict=True)]
        )
    candidates = torch.from_numpy(rows.astype(np.int64))
    candidate_labels = torch.from_numpy(train.caption_labels[pool])
    if cfg.ranking == "paired_hard":
        was_training = core.training
        core.eval()
        with torch.no_grad():
            anchors = core.encode_image(images[:half].to(device))
            scored = core.encode_text(candidates.to(device))
        core.train(was_training)
        chosen = hardest_negative_indices(anchors, scored, labels[:half], candidate_labels).cpu()
    else:
        chosen = torch.arange(half)
    return Batch(
        images,
        torch.cat([tokens[:half], candidates[chosen]]),
        labels,
        torch.cat([labels[:half], candidate_labels[chosen]]),
    )


def step_losses(out: Any, batch: Batch, cfg: TrainConfig, device: torch.device) -> dict:
    """Loss terms of one step; ``loss`` is what is minimised.

    ``loss = λ_r·rank + λ_i·inst_image + λ_t·inst_text`` (``loss_weights``), where ``rank`` is
    the term of ``cfg.ranking`` (``imtext.train.methods``), ``+ adversarial_weight·adv`` when the
    model has a modality discriminator. The paper's model gets exactly the four terms it always
    had; the other methods add theirs (``adv``, ``temperature``, ``rank_t2i`` ...) for the logs.
    """
    image_labels = batch.image_labels.to(device)
    text_labels = batch.text_labels.to(device)
    image_logits = out.image_logits.float()
    if batch.caption_slot is not None:
        # Several captions per image: each image's term counts once per caption, row by row.
        image_logits, image_labels = image_logits[batch.caption_slot.to(device)], text_labels
    image_inst, text_inst = instance_loss(
        image_logits, out.text_logits.float(), image_labels, text_labels
    )
    image_emb, text_emb = out.image_emb.float(), out.text_emb.float()
    parts: dict[str, torch.Tensor] = {}
    if cfg.loss_weights[0] == 0:
        rank = image_emb.new_zeros(())
    elif cfg.ranking.startswith("paired"):
        half = len(image_emb) // 2
        rank = paired_ranking_loss(
            image_emb[:half], text_emb[:half], text_emb[half:], image_emb[half:], cfg.margin
        )
    else:
        rank, parts = ranking_term(out, batch, cfg, device)
    total = dual_path_loss(rank, image_inst, text_inst, tuple(cfg.loss_weights))
    losses = {"loss": total, "rank": rank, "inst_image": image_inst, "inst_text": text_inst}
    if getattr(out, "image_modality", None) is not None:
        # Always in the sum, at weight 0 too: every parameter then gets a gradient (DDP needs it).
        adv = modality_loss(out.image_modality.float(), out.text_modality.float())
        losses["loss"] = total + cfg.adversarial_weight * adv
        losses["adv"] = adv
    return {**losses, **parts}


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: bf16/fp16 on CUDA; bf16 on a CPU with native bf16
    instructions (AVX512-BF16 or AMX: 1.7x faster steps, bench/README.md); otherwise fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cpu":
        if precision == "bf16" and cpu_has_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (emulated bf16 is slower than fp32)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# ------------------------------------------------------------------------------- the epoch


@dataclass
class EpochStats:
    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    data_seconds: float = 0.0
    seconds: float = 0.0

    def add(self, losses: dict[str, float], samples: int) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.samples += samples

    def summary(self) -> dict[str, float]:
        means = {f"train_{k}": v / max(1, self.steps) for k, v in self.sums.items()}
        return {
            **means,
            "train_samples_per_s": self.samples / max(self.seconds, 1e-9),
            "train_data_share": self.data_seconds / max(self.seconds, 1e-9),
        }


def _to(kwargs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _timed(loader: DataLoader, stats: EpochStats) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the loader's batches, adding the time spent waiting for each to ``stats``."""
    iterator = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            with record_function("imtext.data"):
                item = next(iterator)
        except StopIteration:
            return
        stats.data_seconds += time.perf_counter() - start
        yield item


def train_one_epoch(
    model: torch.nn.Module,
    core: DualPathModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    train: PreparedSplit,
    cfg: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
    state: RunState,
    log: Log,
    bar: Any,
) -> dict[str, float]:
    model.train()
    stats = EpochStats()
    start = time.perf_counter()
    has_discriminator = core.discriminator is not None
    steps, epoch = len(loader), state.epoch
    for i, items in enumerate(_timed(loader, stats)):
        set_lr(optimizer, lr_at_time(epoch + i / steps, cfg))
        # The labels let a profiler split a step into data, mining, model and the rest.
        with record_function("imtext.mining"):
            if cfg.loss_weights[0] > 0 and cfg.ranking.startswith("paired"):
                batch = mined_batch(core, items, train, cfg, rng, device)
            else:
                batch = batch_of(items)
            if cfg.ranking == "logistic":
                batch = with_negative_pairs(batch, cfg.negatives_per_positive, rng)
        lam = reversal_coefficient(state.step, len(loader), cfg) if has_discriminator else 0.0
        kwargs = forward_kwargs(batch, cfg, has_discriminator, lam)
        with autocast_for(device, cfg.precision):
            with record_function("imtext.forward"):
                images = batch.images.to(
                    device, non_blocking=True, memory_format=torch.channels_last
                )
                out = model(images, batch.tokens.to(device), **_to(kwargs, device))
            with record_function("imtext.loss"):
                losses = step_losses(out, batch, cfg, device)
        if has_discriminator:
            losses["adv_lambda"] = losses["loss"].new_tensor(lam)
        if not torch.isfinite(losses["loss"]):
            raise ImtextError(
                f"the loss became {losses['loss'].item()} at step {state.step}; lower the "
                "learning rate (lr) or use precision bf16/fp32"
            )
        optimizer.zero_grad(set_to_none=True)
        with record_function("imtext.backward"):
            if scaler is not None:
                scaler.scale(losses["loss"]).backward()
            else:
                losses["loss"].backward()
        with record_function("imtext.optimizer"):
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        if core.logit_scale is not None:
            core.logit_scale.clamp_()  # keeps the temperature where the loss's clamp is a no-op
        # One device-to-host copy for all terms, not one per term.
        values = dict(
            zip(losses, torch.stack([v.detach() for v in losses.values()]).tolist(), strict=True)
        )
        stats.add(values, len(batch.images))
        state.step += 1
        if state.step % LOG_EVERY == 0:
            log({f"step_{k}": v for k, v in values.items()}, state.step)
        if bar is not None:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{stats.samples / elapsed:.0f}")
            bar.update(1)
    stats.seconds = time.perf_counter() - start
    return stats.summary()


# --------------------------------------------------------------------------- validation


def validate(
    core: DualPathModel,
    split: PreparedSplit,
    image_size: int,
    device: torch.device,
    flip_average: bool = False,
    shift_average: bool = False,
) -> dict[str, float]:
    """Recall on ``split`` (the whole split as one gallery), by embeddings or, for the similarity
    network, by the scores of every pair (``imtext.eval.embed``)."""
    with record_function("imtext.validate"):
        images, texts = retrieval_inputs(
            core, split, image_size, device, flip_average=flip_average, shift_average=shift_average
        )
    return retrieval_metrics(images, texts, split.caption_image)


# ------------------------------------------------------------------------------ the stage


def _initial_model(
    model_cfg: ModelConfig, init: Path | None, vocab: list[str], n_classes: int
) -> tuple[DualPathModel, ModelConfig]:
    if init is None:
        model = build_model(model_cfg, len(vocab), n_classes)
        if model_cfg.word2vec:
            vectors, found = read_word_vectors(model_cfg.word2vec, vocab, model_cfg.word_dim)
            init_word_embedding(model.text.words, vectors, found)
            logger.info(
                "word2vec: %d of %d words found in %s", found.sum(), len(vocab), model_cfg.word2vec
            )
        return model, model_cfg
    model, record = load_model(init)
    if (record["vocab_size"], record["n_classes"]) != (len(vocab), n_classes):
        raise DataError(
            f"{init}: trained on data with {record['vocab_size']} words and "
            f"{record['n_classes']} instances, but the prepared data has {len(vocab)} and "
            f"{n_classes}; start from a model trained on the same prepared data"
        )
    cfg = config_from_dict(ModelConfig, record["model_config"], f"{init}: model_config")
    if cfg == model_cfg:
        return model, cfg
    if _encoder_fields(cfg) == _encoder_fields(model_cfg):
        return _transferred(model, model_cfg, len(vocab), n_classes, init), model_cfg
    logger.warning("using the architecture stored in %s, not the 'model' section of params", init)
    return model, cfg


def _encoder_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The settings of the dual-path encoders and classifier (not of what sits on them)."""
    return {k: v for k, v in config_to_dict(cfg).items() if k not in MODEL_METHOD_DEFAULTS}


def _transferred(
    source: DualPathModel, model_cfg: ModelConfig, vocab_size: int, n_classes: int, init: Path
) -> DualPathModel:
    """A model of ``model_cfg`` whose encoders (and every other part ``source`` shares with it)
    start from ``source``'s weights: e.g. two-branch networks or a discriminator on a trained
    dual-path model. Parts only the new model has start from their initialisation."""
    built = dataclasses.replace(model_cfg, image_weights=None, word2vec=None)
    model = build_model(built, vocab_size, n_classes)
    old, new = source.state_dict(), model.state_dict()
    shared = {k: v for k, v in old.items() if k in new and new[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    fresh = sorted({k.split(".")[0] for k in new.keys() - shared.keys()})
    dropped = sorted({k.split(".")[0] for k in old.keys() - shared.keys()})
    logger.info(
        "%s: encoders loaded into a %s model; new parts %s, parts left out %s",
        init, model_cfg.method, fresh or "none", dropped or "none",
    )  # fmt: skip
    model.logit_scale = source.logit_scale
    return model


def _attach_logit_scale(model: DualPathModel, cfg: TrainConfig) -> None:
    """InfoNCE's learned temperature lives on the model (optimiser, checkpoint, DDP see it); it
    continues from the init model's when that has one. Other losses train without it."""
    if cfg.ranking == "infonce" and cfg.loss_weights[0] > 0:
        if model.logit_scale is None:
            model.logit_scale = LogitScale(cfg.init_temperature)
    else:
        model.logit_scale = None


def _check_resumable(record: dict, model_cfg: ModelConfig, cfg: TrainConfig, path: Path) -> None:
    saved = {
        **with_method_defaults(record["train_config"], TRAIN_METHOD_DEFAULTS),
        "epochs": cfg.epochs,
        "patience": cfg.patience,
    }
    saved_model = with_method_defaults(record["model_config"], MODEL_METHOD_DEFAULTS)
    if saved_model != config_to_dict(model_cfg) or saved != config_to_dict(cfg):
        raise ConfigError(
            f"{path}: this checkpoint was written with other settings; resume with the same "
            "params (only epochs and patience may change), or choose a new output directory"
        )


def _loader(dataset, cfg: TrainConfig, info: distributed.Dist, epoch: int) -> DataLoader:
    generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
    if cfg.sentences_per_image > 1:
        return _neighbourhood_loader(dataset, cfg, info, epoch, generator)
    if info.world_size > 1:
        sampler = DistributedSampler(
            dataset, info.world_size, info.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        drop_last=True,
        generator=generator,
        pin_memory=info.device.type == "cuda",
        persistent_workers=False,
    )


def _neighbourhood_loader(
    dataset: InstanceTrainDataset,
    cfg: TrainConfig,
    info: distributed.Dist,
    epoch: int,
    generator: torch.Generator,
) -> DataLoader:
    """The epoch's neighbourhood batches (one loader item each), this process's share of them."""
    seed = epoch_seed(cfg.seed, epoch)  # without the rank: every process draws the same epoch
    batches = epoch_neighbourhood_batches(dataset.split, cfg, seed, info.rank, info.world_size)
    items = NeighbourhoodDataset(dataset.split, dataset.transform, dataset.shift, batches, seed)
    return DataLoader(
        items,
        batch_size=None,
        shuffle=False,  # the batches come shuffled
        num_workers=cfg.workers,
        generator=generator,
        pin_memory=info.device.type == "cuda",
        persistent_workers=False,
    )


def train_stage(
    stage: str,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    prepared: Path,
    out_dir: Path,
    *,
    init: Path | None = None,
    resume: bool = False,
    device: str = "auto",
    log: Log = _no_log,
    progress: bool = True,
) -> dict[str, float]:
    """Train one stage on ``prepared`` data into ``out_dir``; returns the stage's metrics.

    Writes ``checkpoint.pt`` (after every epoch, for ``resume``), ``model.pt`` (the epoch with the
    best validation rsum), ``history.json`` (per-epoch metrics) and ``metrics.json``.
    ``init`` is a model file to start from (Stage II starts from Stage I's ``model.pt``).
    """
    out_dir = Path(out_dir)
    check_method(model_cfg, cfg, stage)
    info = distributed.setup(device)
    try:
        return _train_stage(
            stage, model_cfg, cfg, Path(prepared), out_dir, init, resume, info, log, progress
        )
    finally:
        distributed.teardown(info)


def _train_stage(stage, model_cfg, cfg, prepared, out_dir, init, resume, info, log, progress):
    if not info.is_main:
        log = _no_log
    train = PreparedSplit.load(prepared, "train")
    val = PreparedSplit.load(prepared, "val")
    vocab = list(read_vocabulary(prepared).words)
    n_classes = int(train.image_labels.max()) + 1 if train.n_images else 0
    if train.n_images < cfg.batch_size * info.world_size:
        raise DataError(
            f"{prepared}: {train.n_images} training images are fewer than one batch "
            f"({cfg.batch_size} x {info.world_size} processes); lower batch_size"
        )
    torch.manual_seed(cfg.seed)
    model, model_cfg = _initial_model(model_cfg, init, vocab, n_classes)
    check_method(model_cfg, cfg, f"{stage} (model of {init})")
    _attach_logit_scale(model, cfg)
    model.to(info.device)
    # NHWC convolutions are ~10% faster on the CPU (oneDNN) and use tensor cores on CUDA.
    model.image.to(memory_format=torch.channels_last)
    groups = parameter_groups(model, cfg)
    model.image.freeze_backbone(cfg.backbone_lr_mult == 0)
    optimizer = build_optimizer(groups, cfg)
    use_scaler = info.device.type == "cuda" and cfg.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    state = RunState()

    checkpoint_path = out_dir / CHECKPOINT_FILE
    if checkpoint_path.exists():
        if not resume:
            raise ImtextError(
                f"{checkpoint_path}: a checkpoint of an earlier run is there; pass --resume to "
                "continue it, or remove the directory to start over"
            )
        record = load_file(checkpoint_path, "checkpoint")
        _check_resumable(record, model_cfg, cfg, checkpoint_path)
        model.load_state_dict(record["state_dict"])
        optimizer.load_state_dict(record["optimizer"])
        if scaler is not None and record.get("scaler"):
            scaler.load_state_dict(record["scaler"])
        set_rng_state(record["rng"])
        state = RunState(**record["run_state"])
        if info.is_main:
            logger.info("%s: resuming after epoch %d from %s", stage, state.epoch, checkpoint_path)
    elif resume and info.is_main:
        logger.info("%s: no checkpoint in %s; starting from the beginning", stage, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    core = model
    if info.world_size > 1:
        model = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    dataset = InstanceTrainDataset(
        train,
        train_transform(model_cfg.image_size, cfg.hflip, cfg.crop_scale, cfg.image_augment),
        cfg.text_shift,
    )
    steps_per_epoch = len(_loader(dataset, cfg, info, state.epoch))
    if info.is_main:
        logger.info(
            "%s: %d training images, %d instances, %d steps per epoch, %d epochs on %s%s",
            stage,
            train.n_images,
            n_classes,
            steps_per_epoch,
            cfg.epochs,
            info.device,
            f" x {info.world_size} processes" if info.world_size > 1 else "",
        )
    from tqdm import tqdm

    # A run resumed after it stopped early stays stopped (a retried pipeline step must not train
    # past the epoch the uninterrupted run stopped at).
    stop = cfg.patience is not None and state.bad_evals >= cfg.patience
    while state.epoch < cfg.epochs and not stop:
        epoch = state.epoch
        torch.manual_seed(epoch_seed(cfg.seed, epoch, info.rank))
        rng = np.random.default_rng(epoch_seed(cfg.seed, epoch, info.rank))
        lr = set_epoch_lr(optimizer, epoch, cfg)
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"{stage} {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=None if progress and info.is_main else True,
            leave=False,
        )
        with bar:
            metrics = train_one_epoch(
                model,
                core,
                _loader(dataset, cfg, info, epoch),
                optimizer,
                scaler,
                train,
                cfg,
                rng,
                info.device,
                state,
                log,
                bar,
            )
        metrics = {"epoch": epoch + 1, "lr": lr, **metrics}
        state.epoch = epoch + 1
        validating = val.n_images > 0 and (
            state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs
        )
        if info.is_main:
            if validating:
                scores = validate(
                    core,
                    val,
                    model_cfg.image_size,
                    info.device,
                    cfg.val_flip_average,
                    cfg.val_shift_average,
                )
                metrics.update({f"val_{k}": v for k, v in scores.items()})
                _track_best(
                    state, metrics, core, model_cfg, len(vocab), n_classes, cfg, stage, out_dir
                )
            elif val.n_images == 0 and state.epoch == cfg.epochs:
                logger.warning("%s: no validation images; keeping the last epoch", stage)
                _save_model(
                    core,
                    model_cfg,
                    len(vocab),
                    n_classes,
                    cfg,
                    stage,
                    state.epoch,
                    metrics,
                    out_dir,
                )
            state.history.append(metrics)
            log(metrics, state.step)
            logger.info("%s", _epoch_line(stage, metrics))
            save_atomic(
                _checkpoint_record(
                    core, model_cfg, len(vocab), n_classes, cfg, stage, optimizer, scaler, state
                ),
                out_dir / CHECKPOINT_FILE,
            )
            _write_json(out_dir / HISTORY_FILE, state.history)
        stop = distributed.broadcast_flag(
            info, cfg.patience is not None and state.bad_evals >= cfg.patience
        )
        if stop and info.is_main:
            logger.info(
                "%s: stopping early; val rsum has not improved for %d validations",
                stage,
                state.bad_evals,
            )
        distributed.barrier(info)
    if cfg.epochs == 0 and info.is_main:
        _pass_initial_model(core, model_cfg, len(vocab), n_classes, cfg, stage, out_dir, log)
        # Every output dvc.yaml declares exists, a checkpoint of epoch 0 included.
        save_atomic(
            _checkpoint_record(
                core, model_cfg, len(vocab), n_classes, cfg, stage, optimizer, scaler, state
            ),
            out_dir / CHECKPOINT_FILE,
        )
    result = _stage_metrics(state)
    if info.is_main:
        _write_json(out_dir / METRICS_FILE, result)
    return result


def _checkpoint_record(
    core, model_cfg, vocab_size, n_classes, cfg, stage, optimizer, scaler, state
) -> dict:
    """What ``resume`` needs to continue after the last finished epoch."""
    return {
        **model_record(core, model_cfg, vocab_size, n_classes),
        "train_config": config_to_dict(cfg),
        "stage": stage,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "run_state": state.__dict__,
    }


def _pass_initial_model(core, model_cfg, vocab_size, n_classes, cfg, stage, out_dir, log):
    """``epochs: 0``: the stage trains nothing and its ``model.pt`` is the model it started from
    (its initialisation, or ``init``), so that the next stage starts where it would have."""
    logger.info("%s: 0 epochs; model.pt is the initial model, untrained", stage)
    _save_model(core, model_cfg, vocab_size, n_classes, cfg, stage, 0, {}, out_dir)
    # The stage's other outputs exist as after any run (dvc.yaml declares them): an empty
    # history, and one log record, which also tells the console that nothing was trained.
    _write_json(out_dir / HISTORY_FILE, [])
    log({"epoch": 0}, 0)


def _track_best(state, metrics, core, model_cfg, vocab_size, n_classes, cfg, stage, out_dir):
    if metrics["val_rsum"] > state.best_rsum:
        state.best_rsum, state.best_epoch, state.bad_evals = metrics["val_rsum"], state.epoch, 0
        _save_model(
            core, model_cfg, vocab_size, n_classes, cfg, stage, state.epoch, metrics, out_dir
        )
    else:
        state.bad_evals += 1


def _save_model(core, model_cfg, vocab_size, n_classes, cfg, stage, epoch, metrics, out_dir):
    save_atomic(
        model_record(
            core,
            model_cfg,
            vocab_size,
            n_classes,
            stage=stage,
            epoch=epoch,
            train_config=config_to_dict(cfg),
            metrics=reproducible_metrics(metrics),
        ),
        out_dir / MODEL_FILE,
    )


#: Wall-clock measurements: they differ between identical runs.
TIMING_METRICS = ("train_samples_per_s", "train_data_share")


def reproducible_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` without the wall-clock entries, so the same run writes the same model file
    byte for byte (DVC hashes it; the timings stay in history.json and metrics.json)."""
    return {k: v for k, v in metrics.items() if k not in TIMING_METRICS}


def _stage_metrics(state: RunState) -> dict[str, float]:
    """The best epoch's validation metrics plus training totals (``metrics.json``)."""
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), None)
    last = state.history[-1] if state.history else {}
    result = {k: v for k, v in (best or last).items() if k.startswith("val_")}
    result.update(best_epoch=(best or last).get("epoch", 0), epochs=state.epoch, steps=state.step)
    if state.history:  # a stage of 0 epochs has no training figures (and no NaN in its JSON)
        result.update(
            train_samples_per_s=float(np.mean([h["train_samples_per_s"] for h in state.history])),
            train_loss=last.get("train_loss", float("nan")),
        )
    return result


def _epoch_line(stage: str, m: dict[str, float]) -> str:
    parts = [
        f"{stage} epoch {m['epoch']}",
        f"loss {m['train_loss']:.4f}",
        f"{m['train_samples_per_s']:.0f} img/s",
    ]
    if "val_rsum" in m:
        parts.append(
            f"val R@1 i2t {m['val_i2t_r1']:.1f} t2i {m['val_t2i_r1']:.1f} rsum {m['val_rsum']:.1f}"
        )
    return ", ".join(parts)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)
