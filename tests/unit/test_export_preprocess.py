"""The export runtime's own preprocessing equals the training code's, without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from imtext.data.datasets import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from imtext.data.text import Vocabulary, encode, tokenize
from imtext.export.onnx import export_spec
from imtext.export.runtime import (
    ExportSpec,
    ImageSpec,
    InputError,
    OnnxEncoders,
    TextSpec,
    check_verified,
    encode_text,
    preprocess_image,
    read_vocabulary,
    resized_size,
)
from imtext.export.runtime import tokenize as runtime_tokenize
from imtext.export.verify import max_abs_diff

#: One uint8 level after normalisation by the smallest std: Pillow and torchvision round the
#: two resize passes independently, so a value may differ by a level or two, and rarely.
LEVEL = 1 / 255 / min(IMAGENET_STD)

SENTENCES = [
    "A red circle, left of (the) BLUE square.",
    "snake_case words and 3 digits 42x",
    "Ünïcode naïve café — ÉCOLE 東京 İstanbul",
    "   tabs\tand\nnewlines   ",
    "unknownword red red red " * 5,
    "one",
]


def noisy_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colours plus noise: natural-ish content with the sharp edges that show rounding."""
    smooth = Image.fromarray(rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), np.uint8))
    base = np.asarray(smooth.resize((width, height), Image.Resampling.BILINEAR), np.float64)
    noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy)


@pytest.mark.parametrize(
    ("width", "height", "size"),
    [(128, 128, 64), (50, 37, 32), (37, 50, 32), (33, 97, 32), (97, 33, 32), (20, 30, 64),
     (300, 200, 64), (64, 64, 64), (129, 128, 64)],
)  # fmt: skip
def test_image_preprocessing_matches_eval_transform(width, height, size):
    rng = np.random.default_rng(width * 1000 + height)
    image = noisy_image(rng, width, height)
    spec = ImageSpec(size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    expected = eval_transform(size)(image).numpy()
    actual = preprocess_image(image, spec)
    assert actual.shape == expected.shape == (3, size, size)
    assert actual.dtype == np.float32
    diff = np.abs(actual - expected)
    assert diff.max() <= 2 * LEVEL + 1e-5
    assert (diff > LEVEL / 2).mean() < 0.02  # almost every value is identical


def test_image_preprocessing_converts_modes_like_the_prepared_images():
    rng = np.random.default_rng(0)
    rgb = noisy_image(rng, 40, 30)
    spec = ImageSpec(size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for image in (rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P")):
        expected = eval_transform(32)(image.convert("RGB")).numpy()
        assert max_abs_diff(preprocess_image(image, spec), expected) <= 2 * LEVEL + 1e-5


@pytest.mark.parametrize(
    ("width", "height"), [(33, 97), (97, 33), (64, 64), (100, 37), (37, 100), (65, 64)]
)
def test_resized_size_is_torchvisions(width, height):
    resized = TF.resize(torch.zeros(1, height, width), [32], antialias=True)
    assert resized_size(width, height, 32) == (resized.shape[2], resized.shape[1])


def test_tokenisation_matches_training():
    spec = TextSpec(max_len=8)
    for sentence in SENTENCES:
        assert runtime_tokenize(sentence, spec) == tokenize(sentence)


def test_word_ids_match_training_encode():
    vocab = Vocabulary(("<pad>", "<unk>", "red", "circle", "square", "blue", "a", "café", "42x"))
    index = {word: i for i, word in enumerate(vocab.words)}
    for max_len in (4, 32):
        spec = TextSpec(max_len=max_len)
        for sentence in SENTENCES:
            expected, _ = encode(tokenize(sentence), vocab, max_len)
            actual = encode_text(sentence, index, spec)
            assert actual.dtype == np.int64
            np.testing.assert_array_equal(actual, expected)


def test_a_sentence_without_words_names_its_index():
    spec = ExportSpec(
        image=ImageSpec(32, IMAGENET_MEAN, IMAGENET_STD), text=TextSpec(8), embed_dim=4
    )
    encoders = OnnxEncoders(spec, {"<pad>": 0, "<unk>": 1}, None, None)  # no session needed
    with pytest.raises(InputError, match=r"text 1: no words in ' \.,; '"):
        encoders.token_array(["fine", " .,; ", "also fine"])
    with pytest.raises(ValueError, match="text 0: no words"):
        encoders.token_array([""])
    with pytest.raises(InputError, match="text 2: expected a string"):
        encoders.token_array(["a", "b", None])
    with pytest.raises(InputError, match="one string"):
        encoders.embed_texts("a sentence, not a list")
    with pytest.raises(InputError, match="image 0: expected a PIL image"):
        encoders.image_array([np.zeros((4, 4, 3))])


def test_spec_round_trips_through_json_and_describes_the_training_preprocessing():
    spec = export_spec(image_size=32, max_len=32, embed_dim=16, int8="static")
    again = ExportSpec.from_dict(json.loads(json.dumps(spec.to_dict())), "preprocess.json")
    assert again == spec
    assert (spec.image.size, spec.embed_dim, spec.text.max_len) == (32, 16, 32)
    assert spec.image.mean == IMAGENET_MEAN and spec.image.std == IMAGENET_STD
    assert (spec.text.pad_id, spec.text.unk_id, spec.text.vocabulary) == (0, 1, "vocab.json")
    assert spec.image.scale == pytest.approx(1 / 255)
    assert set(spec.notes) == {"image", "text", "output", "pair_scorer"}
    assert (spec.similarity, spec.pair_scorer) == ("dot", "pair_scorer.onnx")
    network = export_spec(32, 32, 16, int8=None, similarity="network")
    assert "NOT embeddings" in network.notes["output"]
    assert ExportSpec.from_dict(network.to_dict(), "p.json") == network


def test_spec_rejects_other_versions_and_missing_keys():
    values = export_spec(32, 32, 16, int8=None).to_dict()
    with pytest.raises(InputError, match="format_version 99"):
        ExportSpec.from_dict({**values, "format_version": 99}, "x.json")
    with pytest.raises(InputError, match="resize_passes 'one_pass' is not supported"):
        ExportSpec.from_dict(
            {**values, "image": {**values["image"], "resize_passes": "one_pass"}}, "x"
        )
    with pytest.raises(InputError, match="similarity 'cosine' is not supported"):
        ExportSpec.from_dict({**values, "similarity": "cosine"}, "x.json")
    with pytest.raises(InputError, match="similarity 'network' needs a pair_scorer"):
        ExportSpec.from_dict({**values, "similarity": "network", "pair_scorer": None}, "x.json")
    with pytest.raises(InputError, match="x.json: not an imtext preprocess file"):
        ExportSpec.from_dict({k: v for k, v in values.items() if k != "text"}, "x.json")


def test_vocabulary_file_must_start_with_pad_and_unk(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"words": ["<pad>", "<unk>", "red"]}))
    assert read_vocabulary(path, TextSpec(4)) == {"<pad>": 0, "<unk>": 1, "red": 2}
    path.write_text(json.dumps({"words": ["red", "<pad>", "<unk>"]}))
    with pytest.raises(InputError, match="must be <pad> and <unk>"):
        read_vocabulary(path, TextSpec(4))


def test_only_a_passed_parity_report_counts_as_verified(tmp_path):
    path = tmp_path / "parity.json"
    with pytest.raises(InputError, match="only a verified export"):
        check_verified(path)
    path.write_text(json.dumps({"passed": False, "failures": ["image encoder: too far"]}))
    with pytest.raises(InputError, match="failed its checks \\(image encoder: too far\\)"):
        check_verified(path)
    path.write_text(json.dumps({"passed": True, "failures": []}))
    check_verified(path)


def test_the_runtime_never_imports_torch():
    code = (
        "import sys, imtext.export.runtime, imtext.export; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scorer_parity_pairs_each_caption_with_its_image_and_the_next():
    from imtext.export.verify import scorer_pairs

    images, captions = scorer_pairs(np.array([0, 0, 1]), n_images=2)
    assert images.tolist() == [0, 0, 1, 1, 1, 0]
    assert captions.tolist() == [0, 1, 2, 0, 1, 2]
