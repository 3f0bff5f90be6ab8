"""Where Stage I leaves the embedding (docs/training.md, "Why Stage I hurts"): for a freshly
initialised model and for each given ``model.pt``, the val split's image and caption embeddings
are summarised by their mean pairwise cosine (1 = every input the same vector), their effective
rank (exp of the entropy of the normalised singular values; at most the embedding size), how far
an image's own captions are above the others (mean cosine of matching minus non-matching pairs),
image->text R@1, and with ``--dataset`` (the built-in dataset's Karpathy JSON, whose scenes name
their background colour) the share of the image embeddings' variance that lies between the
background colours (1 = the embedding knows the background and nothing else). Seconds per model
on the CPU. Usage (from the repository root):

    python docs/experiments/stage1_geometry.py artifacts/prepared RUN/pretrain/model.pt ... \
        --dataset data/shapes/dataset.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from imtext.config import read_params, stage_config_from_params
from imtext.data.store import PreparedSplit, read_vocabulary
from imtext.eval.embed import embed_captions, embed_images
from imtext.models import build_model
from imtext.models.files import load_model


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of the rows of an L2-normalised ``x``."""
    n = len(x)
    total = x.sum(0)
    return float((total @ total - n) / (n * (n - 1)))


def effective_rank(x: torch.Tensor) -> float:
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


def between_group_share(x: torch.Tensor, groups: list[str]) -> float:
    """Between-group sum of squares over the total (one-way ANOVA's R^2), summed over dimensions."""
    centred = x - x.mean(0)
    between = 0.0
    for group in set(groups):
        rows = torch.tensor([g == group for g in groups])
        between += float(rows.sum() * (centred[rows].mean(0) ** 2).sum())
    return between / float((centred**2).sum())


def backgrounds_of(split: PreparedSplit, dataset: Path) -> list[str]:
    """Each image row's background colour, from the scenes of the Karpathy JSON it came from."""
    scenes = {
        e["filename"]: e["scene"]["background"] for e in json.loads(dataset.read_text())["images"]
    }
    return [scenes[Path(str(name)).name] for name in split.filenames]


def summary(model, split: PreparedSplit, image_size: int, backgrounds) -> dict[str, float]:
    with torch.no_grad():
        images = embed_images(model, split, image_size, torch.device("cpu"))
        texts = embed_captions(model, split, torch.device("cpu"))
    scores = images @ texts.T
    owner = torch.as_tensor(split.caption_image, dtype=torch.long)
    matching = torch.zeros_like(scores, dtype=torch.bool)
    matching[owner, torch.arange(len(owner))] = True
    r1 = (matching.gather(1, scores.argmax(1, keepdim=True))).float().mean()
    extra = {"background share": between_group_share(images, backgrounds)} if backgrounds else {}
    return {
        **extra,
        "image cos": mean_pairwise_cosine(images),
        "text cos": mean_pairwise_cosine(texts),
        "image rank": effective_rank(images),
        "text rank": effective_rank(texts),
        "match gap": float(scores[matching].mean() - scores[~matching].mean()),
        "i2t R@1": 100 * float(r1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared", type=Path)
    parser.add_argument("models", type=Path, nargs="*")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--dataset", type=Path, default=None,
                        help="the built-in dataset's dataset.json (for the background share)")  # fmt: skip
    args = parser.parse_args()
    split = PreparedSplit.load(args.prepared, "val")
    backgrounds = backgrounds_of(split, args.dataset) if args.dataset else None
    train = PreparedSplit.load(args.prepared, "train")
    model_cfg = stage_config_from_params("model", read_params(args.params), str(args.params))
    torch.manual_seed(0)
    n_classes = int(train.image_labels.max()) + 1
    rows = [("random init", build_model(model_cfg, len(read_vocabulary(args.prepared)), n_classes))]
    rows += [(str(path), load_model(path)[0]) for path in args.models]
    keys = None
    for name, model in rows:
        values = summary(model, split, model_cfg.image_size, backgrounds)
        if keys is None:
            keys = list(values)
            print("| model | " + " | ".join(keys) + " |")
            print("|---|" + "---|" * len(keys))
        print(f"| {name} | " + " | ".join(f"{values[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
