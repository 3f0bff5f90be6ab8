"""PyTorch datasets over prepared splits, with the Dual-Path paper's augmentation.

Training items pair an augmented image (random resized crop keeping 80-100% of the side, aspect
3/4-4/3, bicubic; optional horizontal flip) with one random caption of that image, its words moved
to a random position in the window (the paper's position shift), and the image's instance label.
Evaluation items are deterministic: a resized centre crop, and captions left-aligned.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from imtext.data.store import PreparedSplit
from imtext.data.text import random_shift

#: ImageNet statistics, which torchvision's ResNets expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The paper crops 80-100% of the image side.
CROP_SCALE = 0.8
CROP_RATIO = (3 / 4, 4 / 3)
#: The most memory a training split may take decoded and resized (uint8) to skip its decoding in
#: every epoch: the built-in dataset's 4,000 images at 64 px take 49 MB, COCO's 113K at 224 px
#: would take 17 GB and are decoded per item instead.
RESIZED_CACHE_BYTES = 1 << 30
#: Transforms that draw random numbers: a transform's steps before the first of them give the
#: same output in every epoch.
RANDOM_STEPS = (v2.RandomCrop, v2.RandomResizedCrop, v2.RandomHorizontalFlip)


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


def split_at_first_random(transform: v2.Compose) -> tuple[v2.Compose, v2.Compose]:
    """``transform`` as its deterministic first steps and the rest, which starts with the first
    step that draws random numbers; applying one after the other is ``transform``."""
    steps = list(transform.transforms)
    cut = next((i for i, step in enumerate(steps) if isinstance(step, RANDOM_STEPS)), len(steps))
    return v2.Compose(steps[:cut]), v2.Compose(steps[cut:])


@dataclass(frozen=True)
class CachedSteps:
    """A transform's random rest, to apply to a cached image faster than ``v2.Compose`` does, with
    the same draws and the same values (``split_cached_steps``): ``crop`` is a leading
    ``RandomCrop`` whose padding the cache holds, so that it becomes a slice; ``middle`` the steps
    applied as they are (None if there are none); ``to_dtype`` and ``normalize`` trailing steps
    run as plain functions (the v2 classes' dispatch cost more than their arithmetic on a 64 px
    image)."""

    crop: v2.RandomCrop | None
    middle: v2.Compose | None
    to_dtype: v2.ToDtype | None
    normalize: v2.Normalize | None

    @property
    def cache_padding(self) -> list[int]:
        """What to pad each cached image by for ``crop``, as ``F.pad`` takes it: [left, top,
        right, bottom]."""
        left, right, top, bottom = self.crop.padding  # v2 keeps it in this order
        return [left, top, right, bottom]


def split_cached_steps(rest: v2.Compose) -> CachedSteps:
    """``rest`` (what follows the cache) as :class:`CachedSteps`. The crop is taken out only when
    its padding needs no fill (edge, reflect, symmetric) and is fixed (no ``pad_if_needed``)."""
    steps = list(rest.transforms)
    crop = None
    if (
        steps
        and type(steps[0]) is v2.RandomCrop
        and steps[0].padding is not None
        and not steps[0].pad_if_needed
        and steps[0].padding_mode != "constant"
    ):
        crop = steps.pop(0)
    to_dtype = normalize = None
    if (
        len(steps) >= 2
        and type(steps[-2]) is v2.ToDtype
        and isinstance(steps[-2].dtype, torch.dtype)
        and type(steps[-1]) is v2.Normalize
    ):
        to_dtype, normalize = steps[-2:]
        del steps[-2:]
    return CachedSteps(crop, v2.Compose(steps) if steps else None, to_dtype, normalize)


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
        #: With :meth:`cache_resized_images`: every image through the transform's deterministic
        #: steps (uint8, one tensor, padded for the crop that follows), the steps left to apply
        #: per item, and one unpadded image for the crop to draw its position from.
        self._resized: torch.Tensor | None = None
        self._after_resized: CachedSteps | None = None
        self._unpadded: tv_tensors.Image | None = None
        #: With :meth:`draw_as_worker_zero`: the seed of in-process items and the state of torch's
        #: generator that their transforms draw from.
        self._inline_seed: int | None = None
        self._inline_torch_state: torch.Tensor | None = None

    def cache_resized_images(self, budget: int = RESIZED_CACHE_BYTES) -> bool:
        """Put every image through the transform's deterministic first steps (decode, resize,
        centre crop) once, so that an epoch applies only the random rest: items stay the same,
        the random draws too. Done only when those steps resize (the ``shift`` augmentation;
        ``resized_crop`` starts with its random crop) and the result fits in ``budget`` bytes
        (before the padding of a crop that follows, kept here so that the crop is a slice);
        returns whether it was done. The images are decoded on every core, once."""
        fixed, rest = split_at_first_random(self.transform)
        if self.split.n_images == 0 or not any(isinstance(s, v2.Resize) for s in fixed.transforms):
            return False
        first = fixed(self.split.image(0))
        if first.dtype != torch.uint8 or first.numel() * self.split.n_images > budget:
            return False
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            others = pool.map(lambda i: fixed(self.split.image(i)), range(1, self.split.n_images))
            resized = torch.stack([first, *others])
        after = split_cached_steps(rest)
        if after.crop is not None:
            resized = F.pad(resized, after.cache_padding, padding_mode=after.crop.padding_mode)
        self._resized, self._after_resized = resized, after
        self._unpadded = tv_tensors.Image(first)
        return True

    @property
    def cached(self) -> bool:
        """Whether :meth:`cache_resized_images` holds the images (an item is then cheap)."""
        return self._resized is not None

    def image(self, index: int) -> torch.Tensor:
        """Image ``index`` through the whole transform (from the resized cache when there is one)."""
        if self._resized is None:
            return self.transform(self.split.image(index))
        steps, image = self._after_resized, self._resized[index]
        if steps.crop is not None:
            # The step's own draws, as it makes them for an unpadded image of this size.
            at = steps.crop.make_params([self._unpadded])
            top, left = at["top"], at["left"]
            image = image[:, top : top + at["height"], left : left + at["width"]]
        if steps.middle is not None:
            image = steps.middle(tv_tensors.Image(image))
        if steps.to_dtype is not None:
            image = F.to_dtype(image, steps.to_dtype.dtype, scale=steps.to_dtype.scale)
        if steps.normalize is not None:
            n = steps.normalize
            return F.normalize(image, n.mean, n.std, inplace=n.inplace)
        return image.contiguous()

    def draw_as_worker_zero(self, base_seed: int | None) -> None:
        """From now on, items loaded in this process draw exactly what DataLoader worker 0 draws
        for a loader whose base seed (its first draw from its generator) is ``base_seed``: the
        caption choice and shift, and the transforms' draws from a torch generator of their own,
        leaving the training process's generator (dropout) alone. ``None`` undoes it."""
        self._rng = None
        self._inline_seed = base_seed
        self._inline_torch_state = (
            None if base_seed is None else torch.Generator().manual_seed(base_seed).get_state()
        )

    def __len__(self) -> int:
        return self.split.n_images

    def _generator(self) -> np.random.Generator:
        # Keyed by the seed, not the worker: in the main process (num_workers=0) the seed changes
        # when the training loop reseeds torch for an epoch, and a resumed run must draw the same.
        info = get_worker_info()
        if info is not None:
            seed = info.seed
        else:
            seed = self._inline_seed if self._inline_seed is not None else torch.initial_seed()
        seed = int(seed) % 2**63
        if self._rng is None or self._rng_seed != seed:
            self._rng, self._rng_seed = np.random.default_rng(seed), seed
        return self._rng

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if self._inline_torch_state is None or get_worker_info() is not None:
            return self._item(index)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._inline_torch_state)
            item = self._item(index)
            self._inline_torch_state = torch.get_rng_state()
        return item

    def _item(self, index: int) -> dict[str, torch.Tensor | int]:
        rng = self._generator()
        caption = int(rng.choice(self.captions_of[index]))
        row, length = self.split.tokens[caption], int(self.split.lengths[caption])
        tokens = random_shift(row, length, rng) if self.shift else row
        return {
            "image": self.image(index),
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
