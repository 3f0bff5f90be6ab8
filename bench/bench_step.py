"""One training step of the default model at four settings of precision and memory layout, timed
in one process, interleaved (round-robin), so that each is a ratio to fp32 measured beside it.

fp32 / bf16 autocast (``precision: bf16``, used on CPUs with native bf16) x NCHW / channels_last
(the loop's image layout). The step is the loop's: forward, InfoNCE-style loss plus the instance
logits, backward, fused AdamW. Writes a markdown table (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from _table import print_and_write_table  # bench/, the script's own directory
from _tiny import smoke_model_config, smoke_stage_config  # bench/, the script's own directory

from imtext.config import load_stage_config
from imtext.models import build_model
from imtext.train.loop import cpu_has_bf16

REPO = Path(__file__).resolve().parents[1]


def step_seconds(model, optimizer, images, tokens, bf16: bool) -> float:
    start = time.perf_counter()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        out = model(images, tokens)
    scores = out.image_emb.float() @ out.text_emb.float().T
    loss = scores.logsumexp(1).mean() + out.image_logits.float().logsumexp(1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=91)
    parser.add_argument("--classes", type=int, default=4000)
    parser.add_argument("--smoke", action="store_true", help="tiny model, one round, no file")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: artifacts/bench/step.md (none with --smoke)")  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        model_cfg = smoke_model_config(args.params)
        cfg = smoke_stage_config("finetune", args.params)
        args.rounds, args.classes = 1, 10
    else:
        model_cfg = load_stage_config("model", args.params)
        cfg = load_stage_config("finetune", args.params)
    torch.manual_seed(0)
    size = model_cfg.image_size
    images = torch.randn(cfg.batch_size, 3, size, size)
    tokens = torch.randint(1, args.vocab, (cfg.batch_size, 32))
    settings = [(cl, bf) for cl in (False, True) for bf in (False, True)]
    runs = {}
    for cl, _ in settings:
        if cl not in runs:
            model = build_model(model_cfg, args.vocab, args.classes).train()
            if cl:
                model.image.to(memory_format=torch.channels_last)
            runs[cl] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    times: dict[tuple[bool, bool], list[float]] = {s: [] for s in settings}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for cl, bf in settings:
            x = images.contiguous(memory_format=torch.channels_last) if cl else images
            seconds = step_seconds(*runs[cl], x, tokens, bf)
            if round_:
                times[(cl, bf)].append(seconds)
    base = min(times[(False, False)])
    lines = [
        f"one training step, batch {cfg.batch_size}, {model_cfg.image_backbone} at {size} px, "
        f"text {model_cfg.text_encoder}, {torch.get_num_threads()} threads, native bf16: "
        f"{cpu_has_bf16()}; best of {args.rounds} interleaved rounds",
        "",
        "| layout | precision | ms / step | speed-up over fp32 NCHW |",
        "|---|---|---|---|",
    ]
    for cl, bf in settings:
        best = min(times[(cl, bf)])
        lines.append(
            f"| {'channels_last' if cl else 'NCHW'} | {'bf16' if bf else 'fp32'} | "
            f"{1000 * best:.0f} | {base / best:.2f}x |"
        )
    table = "\n".join(lines)
    print_and_write_table(table, "step", args.out, args.smoke)


if __name__ == "__main__":
    main()
