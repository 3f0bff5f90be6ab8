"""Test-time features: flip-averaged images and shift-averaged captions."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from imtext.config import ModelConfig
from imtext.data.datasets import eval_transform
from imtext.data.store import PreparedSplit
from imtext.eval.embed import caption_shifts, embed_captions, embed_images
from imtext.models import build_model
from tests.conftest import TINY_MODEL


def test_caption_shifts_places_the_words_at_every_offset():
    shifts = caption_shifts(np.array([5, 6, 0, 0]), 2)
    assert shifts.tolist() == [[5, 6, 0, 0], [0, 5, 6, 0], [0, 0, 5, 6]]
    assert caption_shifts(np.array([5, 6, 7]), 3).tolist() == [[5, 6, 7]]


def test_averaged_features_equal_the_normalised_sum(karpathy_prepared):
    split = PreparedSplit.load(karpathy_prepared, "test")
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_MODEL), vocab_size=40, n_classes=3).eval()
    device = torch.device("cpu")

    images = embed_images(model, split, 32, device, flip_average=True)
    batch = torch.stack([eval_transform(32)(split.image(i)) for i in range(split.n_images)])
    with torch.no_grad():
        expected = F.normalize(model.encode_image(batch) + model.encode_image(batch.flip(3)), dim=1)
    torch.testing.assert_close(images, expected)

    texts = embed_captions(model, split, device, shift_average=True)
    plain = embed_captions(model, split, device)
    assert texts.shape == plain.shape == (split.n_captions, TINY_MODEL["embed_dim"])
    row, length = split.tokens[0].astype(np.int64), int(split.lengths[0])
    with torch.no_grad():
        every = model.encode_text(torch.from_numpy(caption_shifts(row, length)))
    torch.testing.assert_close(texts[0], F.normalize(every.sum(0), dim=0))
    torch.testing.assert_close(plain[0], every[0])  # offset 0 is the left-aligned caption
    assert not torch.allclose(texts[0], plain[0])
