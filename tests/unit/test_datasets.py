from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from imtext.data.datasets import (
    ImageDataset,
    InstanceTrainDataset,
    eval_transform,
    split_at_first_random,
    split_cached_steps,
    train_transform,
)
from imtext.data.store import PreparedSplit
from imtext.train.batches import loader_base_seed


@pytest.fixture
def prepared(karpathy_prepared):
    return karpathy_prepared


def _unshift(tokens: np.ndarray) -> list[int]:
    return [int(t) for t in tokens if t != 0]


def test_train_items_pair_an_augmented_image_with_a_shifted_caption_of_it(prepared):
    split = PreparedSplit.load(prepared, "train")
    dataset = InstanceTrainDataset(split, train_transform(16, hflip=True), shift=True)
    captions_of = split.captions_of_image()
    torch.manual_seed(0)
    offsets = set()
    for _ in range(30):
        for index in range(len(dataset)):
            item = dataset[index]
            assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
            assert item["tokens"].dtype == torch.int64 and item["tokens"].shape == (32,)
            assert item["label"] == split.image_labels[index] and item["index"] == index
            own = [_unshift(split.tokens[c]) for c in captions_of[index]]
            assert _unshift(item["tokens"].numpy()) in own
            offsets.add(int(np.flatnonzero(item["tokens"].numpy())[0]))
    assert len(offsets) > 5  # the words really move around the window


def test_without_shift_tokens_stay_left_aligned(prepared):
    split = PreparedSplit.load(prepared, "train")
    dataset = InstanceTrainDataset(split, eval_transform(8), shift=False)
    for index in range(len(dataset)):
        assert dataset[index]["tokens"][0] != 0


def test_a_seeded_loader_repeats_and_workers_load(prepared):
    split = PreparedSplit.load(prepared, "train")
    dataset = InstanceTrainDataset(split, train_transform(16, hflip=False))

    def epoch(workers: int) -> torch.Tensor:
        loader = DataLoader(
            dataset, batch_size=3, num_workers=workers, generator=torch.Generator().manual_seed(7)
        )
        return torch.cat([batch["tokens"] for batch in loader])

    assert torch.equal(epoch(2), epoch(2))
    assert epoch(0).shape == (3, 32)


def _images_of_a_seeded_loader(dataset: InstanceTrainDataset, workers: int) -> torch.Tensor:
    loader = DataLoader(
        dataset, batch_size=2, num_workers=workers, generator=torch.Generator().manual_seed(3)
    )
    return torch.cat([batch["image"] for batch in loader])


@pytest.mark.parametrize(("workers", "hflip"), [(0, True), (2, True), (0, False)])
def test_the_resized_cache_gives_the_same_items_and_draws(tiny_prepared, workers, hflip):
    # Rendered shapes, not flat colours: a crop in the wrong place gives other pixels.
    split = PreparedSplit.load(tiny_prepared, "train")
    plain = InstanceTrainDataset(split, train_transform(16, hflip=hflip, augment="shift"))
    cached = InstanceTrainDataset(split, train_transform(16, hflip=hflip, augment="shift"))
    assert cached.cache_resized_images()
    # Padded by the shift's 1 px (16 // 16) each side, so that the crop is a slice.
    assert cached._resized.shape == (split.n_images, 3, 18, 18)
    torch.manual_seed(5)
    expected = _images_of_a_seeded_loader(plain, workers)
    torch.manual_seed(5)
    assert torch.equal(_images_of_a_seeded_loader(cached, workers), expected)


def _items_of_a_seeded_loader(dataset: InstanceTrainDataset, workers: int) -> dict:
    loader = DataLoader(
        dataset, batch_size=2, num_workers=workers, generator=torch.Generator().manual_seed(3)
    )
    batches = list(loader)
    return {key: torch.cat([batch[key] for batch in batches]) for key in ("image", "tokens")}


def test_in_process_items_draw_what_worker_zero_draws(tiny_prepared):
    split = PreparedSplit.load(tiny_prepared, "train")
    dataset = InstanceTrainDataset(split, train_transform(16, hflip=True, augment="shift"))
    assert dataset.cache_resized_images()
    in_worker = _items_of_a_seeded_loader(dataset, workers=1)
    plain_in_process = _items_of_a_seeded_loader(dataset, workers=0)
    # Without it, in-process items draw other shifts and captions: the test can fail.
    assert not torch.equal(plain_in_process["image"], in_worker["image"])
    assert not torch.equal(plain_in_process["tokens"], in_worker["tokens"])

    dataset.draw_as_worker_zero(loader_base_seed(3))
    torch.manual_seed(11)
    before = torch.get_rng_state()
    in_process = _items_of_a_seeded_loader(dataset, workers=0)
    assert torch.equal(in_process["image"], in_worker["image"])
    assert torch.equal(in_process["tokens"], in_worker["tokens"])
    # The training process's own generator (dropout) is untouched by the items' draws.
    assert torch.equal(torch.get_rng_state(), before)
    dataset.draw_as_worker_zero(None)
    assert not torch.equal(_items_of_a_seeded_loader(dataset, 0)["image"], in_worker["image"])


def test_the_shift_transform_after_the_cache_is_a_slice_then_plain_functions():
    _, rest = split_at_first_random(train_transform(64, hflip=True, augment="shift"))
    steps = split_cached_steps(rest)
    assert steps.crop is not None and steps.cache_padding == [4, 4, 4, 4]
    assert [type(t) for t in steps.middle.transforms] == [v2.RandomHorizontalFlip]
    assert steps.to_dtype is not None and steps.normalize is not None
    no_flip = split_cached_steps(
        split_at_first_random(train_transform(64, False, augment="shift"))[1]
    )
    assert no_flip.middle is None
    # A crop whose padding needs a fill, or a normalise without the conversion, stays a step.
    constant = v2.Compose([v2.RandomCrop(8, padding=1), v2.Normalize([0.5], [0.5])])
    kept = split_cached_steps(constant)
    assert kept.crop is None and kept.to_dtype is None and kept.normalize is None
    assert kept.middle.transforms == constant.transforms


def test_the_resized_cache_is_skipped_for_a_random_first_step_or_over_budget(prepared):
    split = PreparedSplit.load(prepared, "train")
    # The paper's resized crop draws before it resizes: nothing is the same in every epoch.
    resized_crop = InstanceTrainDataset(split, train_transform(16, hflip=False))
    assert not resized_crop.cache_resized_images()
    shift = InstanceTrainDataset(split, train_transform(16, hflip=False, augment="shift"))
    # The budget is for the resized images; the padding for the crop comes on top.
    assert not shift.cache_resized_images(budget=3 * 16 * 16 * split.n_images - 1)
    assert shift._resized is None
    assert shift.cache_resized_images(budget=3 * 16 * 16 * split.n_images)


def test_train_crop_keeps_most_of_the_image():
    # A left half black / right half white image: a crop keeping >= 80% of the side still shows both.
    image = Image.new("RGB", (100, 100), (0, 0, 0))
    image.paste((255, 255, 255), (50, 0, 100, 100))
    transform = train_transform(32, hflip=False, mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(0)
    for _ in range(50):
        out = transform(image)
        assert out[:, :, 0].mean() < 0.1 and out[:, :, -1].mean() > 0.9


def test_the_eval_image_dataset_is_deterministic_and_ordered(prepared):
    split = PreparedSplit.load(prepared, "test")
    images = ImageDataset(split, eval_transform(8, mean=(0, 0, 0), std=(1, 1, 1)))
    image, row = images[1]
    assert image.shape == (3, 8, 8) and row == 1
    assert torch.equal(images[1][0], image)
    assert image[0].mean().item() == pytest.approx(200 / 255, abs=1e-3)
