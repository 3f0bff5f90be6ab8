"""Tokenisation, vocabulary (built from the training split only) and fixed-length encoding.

Index 0 is padding and index 1 the unknown word, so an encoded caption is a row of ``max_len`` ids
with its words left-aligned and zeros after them. The Dual-Path "position shift" augmentation moves
the words to a random offset inside that window (:func:`shift_tokens`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of ``text``: runs of letters and digits; punctuation separates words.

    >>> tokenize("A red-circle, left of (the) BLUE square.")
    ['a', 'red', 'circle', 'left', 'of', 'the', 'blue', 'square']
    """
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Vocabulary:
    """Word <-> id mapping; ``words[0]`` is ``<pad>`` and ``words[1]`` is ``<unk>``."""

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.words[:2] != (PAD, UNK):
            raise ValueError("a vocabulary starts with <pad>, <unk>")
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    def __len__(self) -> int:
        return len(self.words)

    def id_of(self, word: str) -> int:
        return self._index.get(word, UNK_ID)  # type: ignore[attr-defined]

    def ids(self, tokens: Iterable[str]) -> list[int]:
        return [self.id_of(t) for t in tokens]

    def to_json(self, path: Path, **extra: object) -> None:
        path.write_text(json.dumps({"words": list(self.words), **extra}, indent=1) + "\n")

    @classmethod
    def from_json(cls, path: Path) -> Vocabulary:
        return cls(tuple(json.loads(Path(path).read_text(encoding="utf-8"))["words"]))


def build_vocabulary(token_lists: Iterable[Sequence[str]], min_count: int) -> Vocabulary:
    """Vocabulary of the words seen at least ``min_count`` times, most frequent first.

    Ties are broken alphabetically so the same corpus always gives the same ids. Pass only
    training-split captions: words seen only in val/test must map to ``<unk>``.
    """
    counts = Counter(token for tokens in token_lists for token in tokens)
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return Vocabulary((PAD, UNK, *kept))


def encode(tokens: Sequence[str], vocab: Vocabulary, max_len: int) -> tuple[np.ndarray, int]:
    """Ids of the first ``max_len`` tokens, left-aligned in a zero row of ``max_len``; and its length."""
    ids = vocab.ids(tokens[:max_len])
    row = np.zeros(max_len, dtype=np.int32)
    row[: len(ids)] = ids
    return row, len(ids)


def encode_all(
    token_lists: Sequence[Sequence[str]], vocab: Vocabulary, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Encode many captions: an int32 ``(n, max_len)`` array of ids and int32 ``(n,)`` lengths."""
    rows = np.zeros((len(token_lists), max_len), dtype=np.int32)
    lengths = np.zeros(len(token_lists), dtype=np.int32)
    for i, tokens in enumerate(token_lists):
        rows[i], lengths[i] = encode(tokens, vocab, max_len)
    return rows, lengths


def shift_tokens(row: np.ndarray, length: int, offset: int) -> np.ndarray:
    """Move the ``length`` left-aligned words of ``row`` to start at ``offset`` (zeros elsewhere).

    >>> shift_tokens(np.array([5, 6, 0, 0]), 2, 1).tolist()
    [0, 5, 6, 0]
    """
    max_len = row.shape[-1]
    if not 0 <= offset <= max_len - length:
        raise ValueError(f"offset {offset} does not fit {length} words in a window of {max_len}")
    shifted = np.zeros_like(row)
    shifted[offset : offset + length] = row[:length]
    return shifted


def random_shift(row: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """The paper's position shift: the words start at a uniform offset in ``[0, max_len - length]``."""
    return shift_tokens(row, length, int(rng.integers(0, row.shape[-1] - length + 1)))
