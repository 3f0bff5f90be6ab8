"""PyTorch datasets over prepared splits, with the Dual-Path paper's augmentation.

Training items pair an augmented image (random resized crop keeping 80-100% of the side, aspect
3/4-4/3, bicubic; optional horizontal flip) with one random caption of that image, its words moved
to a random position in the window (the paper's position shift), and the image's instance label.
Evaluation items are deterministic: a resized centre crop, and captions left-aligned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms import v2

from imtext.data.store import PreparedSplit
from imtext.data.text import random_shift

#: ImageNet statistics, which torchvision's ResNets expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The paper crops 80-100% of the image side.
CROP_SCALE = 0.8
CROP_RATIO = (3 / 4, 4 / 3)


def train_transform(
    image_size: int,
    hflip: bool,
    crop_scale: float = CROP_SCALE,
    augment: str = "resized_crop",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """PIL image -> float tensor (3, image_size, image_size), augmented and normalised.

    ``resized_crop`` (the paper's): a random crop keeping ``crop_scale``-100% of the image side
    (area ``crop_scale**2``-100%, aspect 3/4-4/3), resized. ``shift``: the whole image resized,
    then moved by up to 1/16 of its side each way (4 px at 64), the border repeated; sizes and
    positions stay as the captions say them, and no object is cut off.
    Set ``hflip=False`` when captions talk about left and right (the ``shapes`` dataset does):
    a flipped image would contradict its caption.
    """
    steps: list = [v2.ToImage()]
    if augment == "shift":
        steps += [
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.RandomCrop(image_size, padding=max(1, image_size // 16), padding_mode="edge"),
        ]
    else:
        steps.append(
            v2.RandomResizedCrop(
                image_size,
                scale=(crop_scale**2, 1.0),
                ratio=CROP_RATIO,
                interpolation=v2.InterpolationMode.BICUBIC,
                antialias=True,
            )
        )
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def eval_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """PIL image -> float tensor (3, image_size, image_size): resize shorter side, centre crop."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class InstanceTrainDataset(Dataset):
    """One item per image: ``{"image", "tokens", "label", "index"}``.

    ``tokens`` is one randomly chosen caption of the image (int64 (L,)), position-shifted when
    ``shift`` is set; ``label`` is the instance class (image row, or identity for CUHK-PEDES).
    Randomness comes from a per-worker generator seeded from torch's, so a DataLoader seed makes an
    epoch reproducible.
    """

    def __init__(self, split: PreparedSplit, transform: v2.Compose, shift: bool = True) -> None:
        self.split = split
        self.transform = transform
        self.shift = shift
        self.captions_of = split.captions_of_image()
        self._rng: np.random.Generator | None = None
        self._rng_seed: int | None = None

    def __len__(self) -> int:
        return self.split.n_images

    def _generator(self) -> np.random.Generator:
        # Keyed by the seed, not the worker: in the main process (num_workers=0) the seed changes
        # when the training loop reseeds torch for an epoch, and a resumed run must draw the same.
        info = get_worker_info()
        seed = (info.seed if info is not None else int(torch.initial_seed())) % 2**63
        if self._rng is None or self._rng_seed != seed:
            self._rng, self._rng_seed = np.random.default_rng(seed), seed
        return self._rng

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        rng = self._generator()
        caption = int(rng.choice(self.captions_of[index]))
        row, length = self.split.tokens[caption], int(self.split.lengths[caption])
        tokens = random_shift(row, length, rng) if self.shift else row
        return {
            "image": self.transform(self.split.image(index)),
            "tokens": torch.from_numpy(tokens.astype(np.int64)),
            "label": int(self.split.image_labels[index]),
            "index": index,
        }


class ImageDataset(Dataset):
    """Images of a split in row order, deterministically transformed: ``(image, row)``."""

    def __init__(self, split: PreparedSplit, transform: v2.Compose) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.split.image(index)), index
