"""Training throughput of each stage, and where a step's time goes, measured with torch.profiler.

For Stage I (``pretrain``) and Stage II (``finetune``) with the settings of ``params.yaml``, this runs
the real training loop (``imtext.train.loop.train_stage``) for one epoch on the prepared data under
the profiler, and reads the loop's ``imtext.*`` labels: data loading, negative mining, forward,
loss, backward, optimiser. The baseline, measured in the same run, is the model's forward + backward
+ optimiser step alone on one batch held in memory: the loop's samples/s as a ratio of it says what
the pipeline around the model costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from _tiny import smoke_model_config, smoke_prepared, smoke_stage_config  # bench/, this directory
from torch.profiler import ProfilerActivity, profile

from imtext.config import load_stage_config
from imtext.data.datasets import InstanceTrainDataset, train_transform
from imtext.data.store import PreparedSplit, read_vocabulary
from imtext.models import build_model
from imtext.train.batches import Batch
from imtext.train.loop import autocast_for, train_stage
from imtext.train.objective import step_losses
from imtext.train.schedule import build_optimizer, parameter_groups

REPO = Path(__file__).resolve().parents[1]
PHASES = ("data", "mining", "forward", "loss", "backward", "optimizer", "validate")


def model_only_samples_per_s(model_cfg, cfg, prepared: Path, steps: int) -> float:
    """Forward + loss + backward + step on one fixed in-memory batch: the loop's upper bound."""
    train = PreparedSplit.load(prepared, "train")
    n_classes = int(train.image_labels.max()) + 1
    model = build_model(model_cfg, len(read_vocabulary(prepared)), n_classes).train()
    optimizer = build_optimizer(parameter_groups(model, cfg), cfg)
    model.image.freeze_backbone(cfg.backbone_lr_mult == 0)
    # The loop's own precision and memory layout, so the ratio is the loop's overhead only.
    model.image.to(memory_format=torch.channels_last)
    dataset = InstanceTrainDataset(
        train,
        train_transform(model_cfg.image_size, cfg.hflip, cfg.crop_scale, cfg.image_augment),
        cfg.text_shift,
    )
    items = [dataset[i] for i in range(cfg.batch_size)]
    images = torch.stack([it["image"] for it in items]).to(memory_format=torch.channels_last)
    tokens = torch.stack([it["tokens"] for it in items])
    labels = torch.tensor([it["label"] for it in items])
    batch = Batch(images, tokens, labels, labels)
    # Paired ranking needs a batch in its P/N layout; the in-batch loss costs the same model time.
    cfg = dataclasses.replace(cfg, ranking="batch_sum" if cfg.loss_weights[0] else cfg.ranking)
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            start = time.perf_counter()
        with autocast_for(torch.device("cpu"), cfg.precision):
            losses = step_losses(model(images, tokens), batch, cfg, torch.device("cpu"))
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def profile_stage(stage, model_cfg, cfg, prepared: Path, init: Path | None, out: Path):
    """One epoch of the real loop under the profiler: (stage metrics, seconds per phase, wall)."""
    cfg = dataclasses.replace(cfg, epochs=1, patience=None)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        metrics = train_stage(
            stage, model_cfg, cfg, prepared, out, init=init, device="cpu", progress=False
        )
    wall = time.perf_counter() - start
    phases = {p: 0.0 for p in PHASES}
    for event in prof.key_averages():
        if event.key.startswith("imtext."):
            phases[event.key.removeprefix("imtext.")] = event.cpu_time_total / 1e6
    return metrics, phases, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", type=Path, default=REPO / "artifacts" / "prepared")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--baseline-steps", type=int, default=20)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny rendered data and model, a one-step baseline, no table file",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="default: artifacts/bench/train.md (none with --smoke)")  # fmt: skip
    args = parser.parse_args()

    model_cfg = load_stage_config("model", args.params)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.prepared = smoke_prepared(Path(tmp) / "data", args.params)
            model_cfg = smoke_model_config(args.params)
            args.baseline_steps = 1
        init = None
        for stage in ("pretrain", "finetune"):
            cfg = (smoke_stage_config if args.smoke else load_stage_config)(stage, args.params)
            baseline = model_only_samples_per_s(model_cfg, cfg, args.prepared, args.baseline_steps)
            out = Path(tmp) / stage
            metrics, phases, wall = profile_stage(stage, model_cfg, cfg, args.prepared, init, out)
            init = out / "model.pt"
            train_time = wall - phases["validate"]
            model_time = phases["forward"] + phases["backward"]
            rows.append(
                (stage, cfg, baseline, metrics["train_samples_per_s"], phases, train_time,
                 model_time)
            )  # fmt: skip

    lines = [
        f"training throughput on {torch.get_num_threads()} CPU threads, one epoch per stage, "
        f"settings of {args.params.name} (model: {model_cfg.image_backbone} at "
        f"{model_cfg.image_size} px, embed {model_cfg.embed_dim})",
        "",
        "| stage | ranking | model step only (img/s) | training loop (img/s) | ratio | "
        + " | ".join(f"{p} s" for p in PHASES[:-1])
        + " | outside forward/backward |",
        "|---|---|---|---|---|" + "---|" * (len(PHASES) - 1) + "---|",
    ]
    for stage, cfg, baseline, loop, phases, train_time, model_time in rows:
        ranking = cfg.ranking if cfg.loss_weights[0] else "none"
        lines.append(
            f"| {stage} | {ranking} | {baseline:.0f} | {loop:.0f} | {loop / baseline:.2f}x | "
            + " | ".join(f"{phases[p]:.1f}" for p in PHASES[:-1])
            + f" | {100 * (1 - model_time / train_time):.0f}% |"
        )
    lines += [
        "",
        "Phases are the profiler's CPU time of the loop's `imtext.*` labels over the epoch; "
        "'outside forward/backward' is 1 - (forward + backward) / (epoch wall time - validation).",
    ]
    table = "\n".join(lines)
    print(table)
    out = args.out or (None if args.smoke else REPO / "artifacts" / "bench" / "train.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")


if __name__ == "__main__":
    main()
