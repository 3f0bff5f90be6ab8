"""The training loop shared by Stage I (``pretrain``) and Stage II (``finetune``).

A stage is a loop over epochs of small named steps (:func:`_train_stage`). What a step minimises,
and the batch it needs, is chosen in ``imtext.train.objective``; the epoch's loader is built in
``imtext.train.batches``.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import DataLoader

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
from imtext.errors import ConfigError, DataError, ImtextError
from imtext.eval.embed import retrieval_inputs
from imtext.eval.metrics import retrieval_metrics
from imtext.logs import MetricsLog
from imtext.models import build_model
from imtext.models.dual_path import DualPathModel
from imtext.models.files import MODEL_FILE, load_file, load_model, model_record, save_atomic
from imtext.models.logit_scale import LogitScale
from imtext.models.word2vec import init_word_embedding, read_word_vectors
from imtext.train import distributed
from imtext.train.batches import Batch, epoch_loader, epoch_seed
from imtext.train.checkpoint import CHECKPOINT_FILE, rng_state, set_rng_state
from imtext.train.objective import (
    forward_kwargs,
    learns_temperature,
    reversal_coefficient,
    step_batch,
    step_losses,
)
from imtext.train.schedule import (
    build_optimizer,
    lr_at_time,
    parameter_groups,
    set_epoch_lr,
    set_lr,
)

if TYPE_CHECKING:
    from tqdm import tqdm

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


@dataclass(frozen=True)
class TrainingData:
    """The prepared data a stage trains and validates on."""

    train: PreparedSplit
    val: PreparedSplit
    vocab: list[str]
    n_classes: int


@dataclass
class StageRun:
    """One stage's fixed setting: its settings, data, model, optimiser and where its files go.

    ``core`` is the model itself (what is validated and saved); ``model`` what the training forward
    pass calls: ``core``, wrapped in ``DistributedDataParallel`` when several processes train.
    """

    stage: str
    model_cfg: ModelConfig
    cfg: TrainConfig
    info: distributed.Dist
    out_dir: Path
    log: MetricsLog
    data: TrainingData
    core: DualPathModel
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None


__all__ = ["train_stage", "validate"]


# ---------------------------------------------------------------------------- per-step pieces


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
    run: StageRun, loader: DataLoader, rng: np.random.Generator, state: RunState, bar: tqdm
) -> dict[str, float]:
    """One pass over ``loader``, a step per batch; returns the epoch's means and throughput."""
    run.model.train()
    stats = EpochStats()
    start = time.perf_counter()
    steps, epoch = len(loader), state.epoch
    for i, items in enumerate(_timed(loader, stats)):
        set_lr(run.optimizer, lr_at_time(epoch + i / steps, run.cfg))
        values, samples = _train_step(run, items, rng, state.step, steps)
        stats.add(values, samples)
        state.step += 1
        if state.step % LOG_EVERY == 0:
            run.log({f"step_{k}": v for k, v in values.items()}, state.step)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{stats.samples / elapsed:.0f}")
        bar.update(1)
    stats.seconds = time.perf_counter() - start
    return stats.summary()


def _train_step(
    run: StageRun, items: dict, rng: np.random.Generator, step: int, steps_per_epoch: int
) -> tuple[dict[str, float], int]:
    """One optimiser step on the loader's ``items``: the loss terms' values and the batch size."""
    core = run.core
    has_discriminator = core.discriminator is not None
    # The labels let a profiler split a step into data, mining, model and the rest.
    with record_function("imtext.mining"):
        batch = step_batch(core, items, run.data.train, run.cfg, rng, run.info.device)
    lam = reversal_coefficient(step, steps_per_epoch, run.cfg) if has_discriminator else 0.0
    losses = _forward_losses(run, batch, lam)
    if has_discriminator:
        losses["adv_lambda"] = losses["loss"].new_tensor(lam)
    if not torch.isfinite(losses["loss"]):
        raise ImtextError(
            f"the loss became {losses['loss'].item()} at step {step}; lower the "
            "learning rate (lr) or use precision bf16/fp32"
        )
    _minimise(losses["loss"], run.optimizer, run.scaler)
    if core.logit_scale is not None:
        core.logit_scale.clamp_()  # keeps the temperature where the loss's clamp is a no-op
    # One device-to-host copy for all terms, not one per term.
    values = torch.stack([v.detach() for v in losses.values()]).tolist()
    return dict(zip(losses, values, strict=True)), len(batch.images)


def _forward_losses(run: StageRun, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
    """The forward pass on ``batch`` (mixed precision per ``precision``) and its loss terms."""
    device = run.info.device
    kwargs = forward_kwargs(batch, run.cfg, run.core.discriminator is not None, lam)
    with autocast_for(device, run.cfg.precision):
        with record_function("imtext.forward"):
            images = batch.images.to(device, non_blocking=True, memory_format=torch.channels_last)
            out = run.model(images, batch.tokens.to(device), **_to(kwargs, device))
        with record_function("imtext.loss"):
            return step_losses(out, batch, run.cfg, device)


def _minimise(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    optimizer.zero_grad(set_to_none=True)
    with record_function("imtext.backward"):
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
    with record_function("imtext.optimizer"):
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()


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
    log: MetricsLog = _no_log,
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
        data = _training_data(Path(prepared), cfg, info)
        run = _start_run(stage, model_cfg, cfg, data, init, info, out_dir, log)
        return _train_stage(run, resume, progress)
    finally:
        distributed.teardown(info)


def _train_stage(run: StageRun, resume: bool, progress: bool) -> dict[str, float]:
    cfg, info = run.cfg, run.info
    state = _resumed_state(run, resume)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    if info.world_size > 1:
        run.model = DistributedDataParallel(
            run.core, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    dataset = InstanceTrainDataset(
        run.data.train,
        train_transform(run.model_cfg.image_size, cfg.hflip, cfg.crop_scale, cfg.image_augment),
        cfg.text_shift,
    )
    if state.epoch < cfg.epochs:
        dataset.cache_resized_images()
    steps_per_epoch = len(epoch_loader(dataset, cfg, info, state.epoch))
    _announce(run, steps_per_epoch)
    # A run resumed after it stopped early stays stopped (a retried pipeline step must not train
    # past the epoch the uninterrupted run stopped at).
    stop = _patience_spent(cfg, state)
    while state.epoch < cfg.epochs and not stop:
        metrics = _run_epoch(run, dataset, state, steps_per_epoch, progress)
        if info.is_main:
            _end_epoch(run, state, metrics)
        stop = _stops_early(run, state)
        distributed.barrier(info)
    if cfg.epochs == 0 and info.is_main:
        _pass_initial_model(run, state)
    result = _stage_metrics(state)
    if info.is_main:
        _write_json(run.out_dir / METRICS_FILE, result)
    return result


def _training_data(prepared: Path, cfg: TrainConfig, info: distributed.Dist) -> TrainingData:
    train = PreparedSplit.load(prepared, "train")
    data = TrainingData(
        train,
        PreparedSplit.load(prepared, "val"),
        list(read_vocabulary(prepared).words),
        int(train.image_labels.max()) + 1 if train.n_images else 0,
    )
    if train.n_images < cfg.batch_size * info.world_size:
        raise DataError(
            f"{prepared}: {train.n_images} training images are fewer than one batch "
            f"({cfg.batch_size} x {info.world_size} processes); lower batch_size"
        )
    return data


def _start_run(
    stage: str,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data: TrainingData,
    init: Path | None,
    info: distributed.Dist,
    out_dir: Path,
    log: MetricsLog,
) -> StageRun:
    """The stage's model (seeded by ``seed``, or from ``init``), on its device, and its optimiser."""
    torch.manual_seed(cfg.seed)
    model, model_cfg = _initial_model(model_cfg, init, data.vocab, data.n_classes)
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
    log = log if info.is_main else _no_log
    return StageRun(
        stage, model_cfg, cfg, info, out_dir, log, data, model, model, optimizer, scaler
    )


def _resumed_state(run: StageRun, resume: bool) -> RunState:
    """The run state of the checkpoint in ``out_dir`` (weights, optimiser and RNGs restored from
    it), or a fresh one; a checkpoint there without ``resume`` is an error."""
    path = run.out_dir / CHECKPOINT_FILE
    if not path.exists():
        if resume and run.info.is_main:
            logger.info(
                "%s: no checkpoint in %s; starting from the beginning", run.stage, run.out_dir
            )
        return RunState()
    if not resume:
        raise ImtextError(
            f"{path}: a checkpoint of an earlier run is there; pass --resume to "
            "continue it, or remove the directory to start over"
        )
    record = load_file(path, "checkpoint")
    _check_resumable(record, run.model_cfg, run.cfg, path)
    run.core.load_state_dict(record["state_dict"])
    run.optimizer.load_state_dict(record["optimizer"])
    if run.scaler is not None and record.get("scaler"):
        run.scaler.load_state_dict(record["scaler"])
    set_rng_state(record["rng"])
    state = RunState(**record["run_state"])
    if run.info.is_main:
        logger.info("%s: resuming after epoch %d from %s", run.stage, state.epoch, path)
    return state


def _announce(run: StageRun, steps_per_epoch: int) -> None:
    info = run.info
    if info.is_main:
        logger.info(
            "%s: %d training images, %d instances, %d steps per epoch, %d epochs on %s%s",
            run.stage,
            run.data.train.n_images,
            run.data.n_classes,
            steps_per_epoch,
            run.cfg.epochs,
            info.device,
            f" x {info.world_size} processes" if info.world_size > 1 else "",
        )


def _run_epoch(
    run: StageRun,
    dataset: InstanceTrainDataset,
    state: RunState,
    steps_per_epoch: int,
    progress: bool,
) -> dict[str, float]:
    """Epoch ``state.epoch``, seeded by ``(seed, epoch, rank)``; returns its metrics."""
    from tqdm import tqdm

    cfg, info, epoch = run.cfg, run.info, state.epoch
    torch.manual_seed(epoch_seed(cfg.seed, epoch, info.rank))
    rng = np.random.default_rng(epoch_seed(cfg.seed, epoch, info.rank))
    lr = set_epoch_lr(run.optimizer, epoch, cfg)
    bar = tqdm(
        total=steps_per_epoch,
        desc=f"{run.stage} {epoch + 1}/{cfg.epochs}",
        unit="step",
        disable=None if progress and info.is_main else True,
        leave=False,
    )
    with bar:
        metrics = train_one_epoch(run, epoch_loader(dataset, cfg, info, epoch), rng, state, bar)
    state.epoch = epoch + 1
    return {"epoch": epoch + 1, "lr": lr, **metrics}


def _end_epoch(run: StageRun, state: RunState, metrics: dict[str, float]) -> None:
    """The main process's end of an epoch: validate when due and keep the best model, then log
    and write the checkpoint and the history."""
    cfg, val = run.cfg, run.data.val
    if val.n_images > 0 and (state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs):
        scores = validate(
            run.core,
            val,
            run.model_cfg.image_size,
            run.info.device,
            cfg.val_flip_average,
            cfg.val_shift_average,
        )
        metrics.update({f"val_{k}": v for k, v in scores.items()})
        _track_best(run, state, metrics)
    elif val.n_images == 0 and state.epoch == cfg.epochs:
        logger.warning("%s: no validation images; keeping the last epoch", run.stage)
        _save_model(run, state.epoch, metrics)
    state.history.append(metrics)
    run.log(metrics, state.step)
    logger.info("%s", _epoch_line(run.stage, metrics))
    save_atomic(_checkpoint_record(run, state), run.out_dir / CHECKPOINT_FILE)
    _write_json(run.out_dir / HISTORY_FILE, state.history)


def _patience_spent(cfg: TrainConfig, state: RunState) -> bool:
    return cfg.patience is not None and state.bad_evals >= cfg.patience


def _stops_early(run: StageRun, state: RunState) -> bool:
    """Whether every process stops now (the main process's count of validations without gain)."""
    stop = distributed.broadcast_flag(run.info, _patience_spent(run.cfg, state))
    if stop and run.info.is_main:
        logger.info(
            "%s: stopping early; val rsum has not improved for %d validations",
            run.stage,
            state.bad_evals,
        )
    return stop


def _checkpoint_record(run: StageRun, state: RunState) -> dict:
    """What ``resume`` needs to continue after the last finished epoch."""
    return {
        **model_record(run.core, run.model_cfg, len(run.data.vocab), run.data.n_classes),
        "train_config": config_to_dict(run.cfg),
        "stage": run.stage,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": rng_state(),
        "run_state": state.__dict__,
    }


def _pass_initial_model(run: StageRun, state: RunState) -> None:
    """``epochs: 0``: the stage trains nothing and its ``model.pt`` is the model it started from
    (its initialisation, or ``init``), so that the next stage starts where it would have."""
    logger.info("%s: 0 epochs; model.pt is the initial model, untrained", run.stage)
    _save_model(run, 0, {})
    # The stage's other outputs exist as after any run (dvc.yaml declares them): an empty
    # history, and one log record, which also tells the console that nothing was trained.
    _write_json(run.out_dir / HISTORY_FILE, [])
    run.log({"epoch": 0}, 0)
    # Every output dvc.yaml declares exists, a checkpoint of epoch 0 included.
    save_atomic(_checkpoint_record(run, state), run.out_dir / CHECKPOINT_FILE)


def _track_best(run: StageRun, state: RunState, metrics: dict[str, float]) -> None:
    if metrics["val_rsum"] > state.best_rsum:
        state.best_rsum, state.best_epoch, state.bad_evals = metrics["val_rsum"], state.epoch, 0
        _save_model(run, state.epoch, metrics)
    else:
        state.bad_evals += 1


def _save_model(run: StageRun, epoch: int, metrics: dict[str, float]) -> None:
    save_atomic(
        model_record(
            run.core,
            run.model_cfg,
            len(run.data.vocab),
            run.data.n_classes,
            stage=run.stage,
            epoch=epoch,
            train_config=config_to_dict(run.cfg),
            metrics=reproducible_metrics(metrics),
        ),
        run.out_dir / MODEL_FILE,
    )


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
    if learns_temperature(cfg):
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
