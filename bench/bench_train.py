"""Training throughput of each stage against the bare model step, and where a step's time goes.

For Stage I (``pretrain``) and Stage II (``finetune``) with the settings of ``params.yaml``, each of
``--repeats`` rounds times the baseline, the model's forward + backward + optimiser step alone on
one batch held in memory, and then one epoch of the real training loop
(``imtext.train.loop.train_stage``) on the prepared data, not profiled; a last baseline closes the
bracket. The ratio of the loop's median images/s to the baseline's says what the pipeline around
the model costs. The loop runs as configured (on the CPU, cached items load in the training
process) and, for each count of ``--workers``, with that many DataLoader worker processes. One more
epoch runs under torch.profiler, whose ``imtext.*`` labels split it into data loading, negative mining,
forward, loss, backward and optimiser.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from _table import print_and_write_table  # bench/, the script's own directory
from _tiny import smoke_model_config, smoke_prepared, smoke_stage_config  # bench/, this directory
from torch.profiler import ProfilerActivity, profile

from imtext.config import load_stage_config
from imtext.data.datasets import InstanceTrainDataset, train_transform
from imtext.data.store import PreparedSplit, read_vocabulary
from imtext.models import build_model
from imtext.train import batches
from imtext.train.batches import Batch, epoch_loader
from imtext.train.distributed import Dist
from imtext.train.loop import autocast_for, train_stage
from imtext.train.objective import step_losses
from imtext.train.schedule import build_optimizer, parameter_groups

REPO = Path(__file__).resolve().parents[1]
PHASES = ("data", "mining", "forward", "loss", "backward", "optimizer", "validate")


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_dataset(model_cfg, cfg, prepared: Path) -> InstanceTrainDataset:
    """The stage's training items, built as ``train_stage`` builds them."""
    return InstanceTrainDataset(
        PreparedSplit.load(prepared, "train"),
        train_transform(model_cfg.image_size, cfg.hflip, cfg.crop_scale, cfg.image_augment),
        cfg.text_shift,
    )


@contextlib.contextmanager
def _loader_mode(in_process: bool) -> Iterator[None]:
    """Within: cached items load in the training process on the CPU (True) or in the configured
    worker processes (False); the default is restored after."""
    batches.IN_PROCESS_WHEN_CACHED = in_process
    try:
        yield
    finally:
        batches.IN_PROCESS_WHEN_CACHED = True


def model_only_samples_per_s(model_cfg, cfg, prepared: Path, steps: int, device) -> float:
    """Forward + loss + backward + step on one fixed in-memory batch (on ``device``): the loop's
    upper bound."""
    dataset = _train_dataset(model_cfg, cfg, prepared)
    n_classes = int(dataset.split.image_labels.max()) + 1
    model = build_model(model_cfg, len(read_vocabulary(prepared)), n_classes).to(device).train()
    optimizer = build_optimizer(parameter_groups(model, cfg), cfg)
    model.image.freeze_backbone(cfg.backbone_lr_mult == 0)
    # The loop's own precision and memory layout, so the ratio is the loop's overhead only.
    model.image.to(memory_format=torch.channels_last)
    items = [dataset[i] for i in range(cfg.batch_size)]
    images = torch.stack([it["image"] for it in items]).to(memory_format=torch.channels_last)
    tokens = torch.stack([it["tokens"] for it in items])
    labels = torch.tensor([it["label"] for it in items])
    images, tokens, labels = images.to(device), tokens.to(device), labels.to(device)
    batch = Batch(images, tokens, labels, labels)
    # Paired ranking needs a batch in its P/N layout; the in-batch loss costs the same model time.
    cfg = dataclasses.replace(cfg, ranking="batch_sum" if cfg.loss_weights[0] else cfg.ranking)
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            _synchronize(device)
            start = time.perf_counter()
        with autocast_for(device, cfg.precision):
            losses = step_losses(model(images, tokens), batch, cfg, device)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    _synchronize(device)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def loop_samples_per_s(stage, model_cfg, cfg, prepared: Path, init: Path | None, out: Path, device):
    """One epoch of the real loop, not profiled: its training images per second (the loop's own
    clock, validation excluded)."""
    cfg = dataclasses.replace(cfg, epochs=1, patience=None)
    metrics = train_stage(stage, model_cfg, cfg, prepared, out, init=init, device=str(device),
                          progress=False)  # fmt: skip
    return metrics["train_samples_per_s"]


def loader_alone(model_cfg, cfg, prepared: Path, device, workers: int, in_process: bool):
    """One epoch of the stage's loader with no model (pinned on CUDA, as the loop loads it):
    (seconds to its first batch, images/s over the whole epoch). The data side's ceiling."""
    dataset = _train_dataset(model_cfg, cfg, prepared)
    dataset.cache_resized_images()
    with _loader_mode(in_process):
        loader = epoch_loader(dataset, dataclasses.replace(cfg, workers=workers),
                              Dist(0, 1, device), 0)  # fmt: skip
        start = time.perf_counter()
        iterator = iter(loader)
        images = len(next(iterator)["image"])
        first = time.perf_counter() - start
        images += sum(len(items["image"]) for items in iterator)
    return first, images / (time.perf_counter() - start)


def profile_stage(stage, model_cfg, cfg, prepared: Path, init: Path | None, out: Path, device):
    """One epoch of the real loop under the profiler: (seconds per phase, wall seconds)."""
    cfg = dataclasses.replace(cfg, epochs=1, patience=None)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_stage(stage, model_cfg, cfg, prepared, out, init=init, device=str(device),
                    progress=False)  # fmt: skip
    wall = time.perf_counter() - start
    phases = {p: 0.0 for p in PHASES}
    for event in prof.key_averages():
        if event.key.startswith("imtext."):
            phases[event.key.removeprefix("imtext.")] = event.cpu_time_total / 1e6
    return phases, wall


@dataclasses.dataclass
class StageTimes:
    """What one stage measured: baselines bracket the loop's epochs, one list per loader."""

    stage: str
    cfg: object
    baselines: list[float]
    loops: dict[str, list[float]]
    phases: dict[str, float]
    wall: float
    loader_only: dict[str, tuple[float, float]]


def measure_stage(stage, model_cfg, cfg, args, init: Path | None, tmp: Path) -> StageTimes:
    """``args.repeats`` rounds of (bare step, one unprofiled epoch per loader), a last bare
    step, then one profiled epoch for the phase breakdown. Alternating puts the machine's drift
    into both sides of the ratio alike."""
    # label -> (workers, load cached items in process when on the CPU)
    loaders = {"as configured": (cfg.workers, True)} | {
        f"{w} worker{'s' * (w != 1)}": (w, False) for w in args.workers
    }
    baselines, loops = [], {label: [] for label in loaders}
    for r in range(args.repeats):
        baselines.append(
            model_only_samples_per_s(
                model_cfg, cfg, args.prepared, args.baseline_steps, args.device
            )
        )
        for i, (label, (workers, in_process)) in enumerate(loaders.items()):
            run_cfg = dataclasses.replace(cfg, workers=workers)
            out = tmp / f"{stage}-r{r}-l{i}"
            with _loader_mode(in_process):
                loops[label].append(loop_samples_per_s(
                    stage, model_cfg, run_cfg, args.prepared, init, out, args.device
                ))  # fmt: skip
    baselines.append(
        model_only_samples_per_s(model_cfg, cfg, args.prepared, args.baseline_steps, args.device)
    )
    phases, wall = profile_stage(
        stage, model_cfg, cfg, args.prepared, init, tmp / f"{stage}-prof", args.device
    )
    loader_only = {
        label: loader_alone(model_cfg, cfg, args.prepared, args.device, workers, in_process)
        for label, (workers, in_process) in loaders.items()
    }
    return StageTimes(stage, cfg, baselines, loops, phases, wall, loader_only)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({torch.get_num_threads()} CPU threads)"
    return f"{torch.get_num_threads()} CPU threads"


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def throughput_table(times: list[StageTimes]) -> list[str]:
    lines = [
        "| stage | ranking | loader | model step only, img/s: median (range) "
        "| training loop, img/s: median (range) | ratio of medians |",
        "|---|---|---|---|---|---|",
    ]
    for t in times:
        ranking = t.cfg.ranking if t.cfg.loss_weights[0] else "none"
        for loader, loop in t.loops.items():
            ratio = statistics.median(loop) / statistics.median(t.baselines)
            lines.append(f"| {t.stage} | {ranking} | {loader} | {_spread(t.baselines)} "
                         f"| {_spread(loop)} | {ratio:.2f}x |")  # fmt: skip
    return lines


def loader_table(times: list[StageTimes]) -> list[str]:
    lines = [
        "| stage | loader | first batch, s | img/s over the epoch | loop's median / loader's |",
        "|---|---|---|---|---|",
    ]
    for t in times:
        for label, (first, rate) in t.loader_only.items():
            share = statistics.median(t.loops[label]) / rate
            lines.append(f"| {t.stage} | {label} | {first:.2f} | {rate:.0f} | {share:.2f} |")
    return lines


def phase_table(times: list[StageTimes]) -> list[str]:
    lines = [
        "| stage | " + " | ".join(f"{p} s" for p in PHASES[:-1]) + " | outside forward/backward |",
        "|---|" + "---|" * (len(PHASES) - 1) + "---|",
    ]
    for t in times:
        model_time = t.phases["forward"] + t.phases["backward"]
        train_time = t.wall - t.phases["validate"]
        lines.append(f"| {t.stage} | " + " | ".join(f"{t.phases[p]:.1f}" for p in PHASES[:-1])
                     + f" | {100 * (1 - model_time / train_time):.0f}% |")  # fmt: skip
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", type=Path, default=REPO / "artifacts" / "prepared")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--baseline-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of (bare step, unprofiled epoch) per stage (default 3)")  # fmt: skip
    parser.add_argument("--workers", type=int, nargs="*", default=[],
                        help="also time the loop with each of these DataLoader worker counts "
                             "(worker processes even for cached items on the CPU)")  # fmt: skip
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"),
                        help="cpu (default) or cuda[:N]; on CUDA the phases are host time, "
                             "the clocks wait for the GPU")  # fmt: skip
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny rendered data and model, a one-step baseline, no table file",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="default: artifacts/bench/train.md (none with --smoke)")  # fmt: skip
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model_cfg = load_stage_config("model", args.params)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.prepared = smoke_prepared(Path(tmp) / "data", args.params)
            model_cfg = smoke_model_config(args.params)
            args.baseline_steps, args.repeats = 1, 1
        init = None
        for stage in ("pretrain", "finetune"):
            cfg = (smoke_stage_config if args.smoke else load_stage_config)(stage, args.params)
            times.append(measure_stage(stage, model_cfg, cfg, args, init, Path(tmp)))
            init = Path(tmp) / f"{stage}-prof" / "model.pt"

    lines = [
        f"training throughput on {_device_name(args.device)}, one epoch per run, "
        f"{args.repeats} rounds, settings of {args.params.name} (model: "
        f"{model_cfg.image_backbone} at {model_cfg.image_size} px, embed {model_cfg.embed_dim})",
        "",
        *throughput_table(times),
        "",
        "The loader alone, no model (one epoch each, after the rounds above):",
        "",
        *loader_table(times),
        "",
        "Where one more epoch's time goes, under torch.profiler (loader as configured):",
        "",
        *phase_table(times),
        "",
        "The loop's img/s is its own clock over an unprofiled epoch (validation excluded); the "
        "baseline's rounds bracket the loop's. Phases are the profiler's CPU time of the loop's "
        "`imtext.*` labels; 'outside forward/backward' is 1 - (forward + backward) / (epoch wall "
        "time - validation).",
    ]
    table = "\n".join(lines)
    print_and_write_table(table, "train", args.out, args.smoke)


if __name__ == "__main__":
    main()
