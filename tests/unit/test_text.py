from __future__ import annotations

import numpy as np
import pytest

from imtext.data.text import (
    PAD_ID,
    UNK_ID,
    Vocabulary,
    build_vocabulary,
    encode,
    encode_all,
    random_shift,
    shift_tokens,
    tokenize,
)


def test_tokenize_lowercases_and_splits_on_punctuation():
    assert tokenize("A Red-circle, (left) of the BLUE square.") == [
        "a", "red", "circle", "left", "of", "the", "blue", "square",
    ]  # fmt: skip
    assert tokenize("café, naïve 2 dogs_x") == ["café", "naïve", "2", "dogs", "x"]
    assert tokenize("   ") == []


def test_vocabulary_orders_by_count_then_alphabet_and_applies_min_count():
    vocab = build_vocabulary([["b", "a", "c"], ["b", "a"], ["b", "d"]], min_count=2)
    assert vocab.words == ("<pad>", "<unk>", "b", "a")
    assert vocab.ids(["b", "a", "c", "d"]) == [2, 3, UNK_ID, UNK_ID]


def test_word_seen_only_outside_training_maps_to_unk():
    vocab = build_vocabulary([tokenize("a red square")], min_count=1)
    row, length = encode(tokenize("a zebra square"), vocab, 5)
    assert row.tolist() == [vocab.id_of("a"), UNK_ID, vocab.id_of("square"), PAD_ID, PAD_ID]
    assert length == 3


def test_encode_truncates_to_max_len():
    vocab = Vocabulary(("<pad>", "<unk>", "x", "y"))
    rows, lengths = encode_all([["x", "y", "x"], ["y"], []], vocab, 2)
    assert rows.tolist() == [[2, 3], [3, 0], [0, 0]]
    assert lengths.tolist() == [2, 1, 0]
    assert rows.dtype == np.int32


def test_vocabulary_json_round_trip(tmp_path):
    vocab = build_vocabulary([["x", "y", "y"]], 1)
    vocab.to_json(tmp_path / "v.json", min_count=1)
    assert Vocabulary.from_json(tmp_path / "v.json") == vocab
    with pytest.raises(ValueError):
        Vocabulary(("x", "<unk>"))


def test_shift_tokens_hand_example():
    row = np.array([5, 6, 7, 0, 0], dtype=np.int32)
    assert shift_tokens(row, 3, 0).tolist() == [5, 6, 7, 0, 0]
    assert shift_tokens(row, 3, 2).tolist() == [0, 0, 5, 6, 7]
    with pytest.raises(ValueError, match="does not fit"):
        shift_tokens(row, 3, 3)


def test_random_shift_keeps_the_words_and_reaches_every_offset():
    row = np.array([5, 6, 0, 0, 0], dtype=np.int32)
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        shifted = random_shift(row, 2, rng)
        nonzero = np.flatnonzero(shifted)
        assert shifted[nonzero].tolist() == [5, 6] and nonzero[1] == nonzero[0] + 1
        starts.add(int(nonzero[0]))
    assert starts == {0, 1, 2, 3}
    full = np.array([1, 2, 3], dtype=np.int32)
    assert random_shift(full, 3, rng).tolist() == [1, 2, 3]
