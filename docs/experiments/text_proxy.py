"""A text-only proxy for the text encoders (docs/training.md): can the encoder tell images apart
from their captions alone? Two captions of one training image are a positive pair, the other
images' captions in the batch negatives (symmetric InfoNCE, temperature 0.05). Scored on the
val split: for each caption, is another caption of its image the nearest of all val captions?

Runs in seconds per variant on the CPU, which is what makes one-factor-at-a-time search over the
text CNN affordable here. Usage (from the repository root, after `imtext prepare`):

    python docs/experiments/text_proxy.py artifacts/prepared --steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from imtext.config import read_params, stage_config_from_params
from imtext.data.store import PreparedSplit, read_vocabulary
from imtext.data.text import random_shift
from imtext.models.dual_path import build_text_encoder
from imtext.models.text import TextCNN

ORIGINAL_FORWARD = TextCNN.forward

VARIANTS = {
    "cnn": {},
    "cnn_w64": {"text_width": 64},
    "cnn_b2222": {"text_blocks": [2, 2, 2, 2]},
    "cnn_stride1": {"text_strides": [1, 1, 1, 1]},
    "cnn_stride1_b2222": {"text_strides": [1, 1, 1, 1], "text_blocks": [2, 2, 2, 2]},
    "cnn_stride1_w64": {"text_strides": [1, 1, 1, 1], "text_width": 64},
    "cnn_stride1211": {"text_strides": [1, 2, 1, 1]},
    "cnn_masked_pool": {"_masked_pool": True},
    "cnn_no_word_bn": {"_no_word_bn": True},
    "gru": {"text_encoder": "gru"},
}


def masked_cnn_forward(self, tokens):
    """TextCNN.forward with the max over word positions only (padding left out)."""
    x = (self.words(tokens) + self.word_bias).transpose(1, 2)
    x = self.stages(self.word_bn(x))
    stride = x.shape[2] and tokens.shape[1] // x.shape[2]
    words = (tokens > 0)[:, ::stride][:, : x.shape[2]].unsqueeze(1)
    return self.head(x.masked_fill(~words, -1e4).amax(dim=2))


def caption_pairs(split: PreparedSplit, rows: np.ndarray, rng: np.random.Generator, shift: bool):
    captions = split.captions_of_image()
    a, b = [], []
    for row in rows:
        first, second = rng.choice(captions[row], size=2, replace=False)
        a.append(first)
        b.append(second)

    def tokens(ids):
        out = []
        for i in ids:
            t = split.tokens[i]
            out.append(random_shift(t, int(split.lengths[i]), rng) if shift else t)
        return torch.from_numpy(np.stack(out).astype(np.int64))

    return tokens(a), tokens(b)


def text_recall_at_1(encoder, split: PreparedSplit) -> float:
    encoder.eval()
    with torch.no_grad():
        emb = F.normalize(encoder(torch.from_numpy(split.tokens.astype(np.int64))), dim=1)
    scores = emb @ emb.T
    scores.fill_diagonal_(-2.0)
    owner = torch.from_numpy(split.caption_image.astype(np.int64))
    best = scores.argmax(dim=1)
    encoder.train()
    return 100.0 * (owner[best] == owner).float().mean().item()


def run(name: str, overrides: dict, prepared: str, steps: int, seed: int) -> tuple[float, float]:
    import imtext.models.text as text_module

    hacks = {k: overrides[k] for k in overrides if k.startswith("_")}
    overrides = {k: v for k, v in overrides.items() if not k.startswith("_")}
    params = read_params("params.yaml")
    # The text CNN of the runs: width 32, the paper's strides, unless a variant says otherwise.
    model_cfg = dataclasses.replace(
        stage_config_from_params("model", params),
        embedding="pre_relu",
        **{"text_width": 32, "text_strides": [1, 2, 2, 1], **overrides},
    )
    text_module.TextCNN.forward = (
        masked_cnn_forward if hacks.get("_masked_pool") else ORIGINAL_FORWARD
    )
    train, val = PreparedSplit.load(prepared, "train"), PreparedSplit.load(prepared, "val")
    torch.manual_seed(seed)
    encoder = build_text_encoder(model_cfg, len(read_vocabulary(prepared)))
    if hacks.get("_no_word_bn"):
        encoder.word_bn = torch.nn.Identity()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=2e-3, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = (
                2e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + np.cos(np.pi * step / steps))
            )
        rows = rng.choice(train.n_images, size=128, replace=False)
        a, b = caption_pairs(train, rows, rng, shift=True)
        ea, eb = F.normalize(encoder(a), dim=1), F.normalize(encoder(b), dim=1)
        logits = ea @ eb.T / 0.05
        target = torch.arange(len(rows))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    return text_recall_at_1(encoder, val), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    print("| variant | val caption->caption R@1 | train s |")
    print("|---|---|---|")
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        r1, seconds = run(name, overrides, args.prepared, args.steps, args.seed)
        print(f"| {name} | {r1:.1f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
