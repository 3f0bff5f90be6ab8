"""Word-vector files (word2vec text or binary format) for the text branch's word embedding.

Only the vocabulary's words are kept while reading, so the 3.6 GB GoogleNews file needs memory for
the vocabulary alone. Lookup is exact first, then lower-cased, because the vocabulary is lower-case
and word2vec is case-sensitive.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from imtext.errors import ConfigError


def _header(first: bytes) -> tuple[int, int] | None:
    parts = first.split()
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


def _binary_records(file: BinaryIO, count: int, dim: int) -> Iterator[tuple[str, np.ndarray]]:
    for _ in range(count):
        word = bytearray()
        while (ch := file.read(1)) != b" ":
            if not ch:
                return
            if ch != b"\n":  # some writers end each vector with a newline
                word += ch
        vector = np.frombuffer(file.read(4 * dim), dtype="<f4")
        if len(vector) != dim:
            return
        yield word.decode("utf-8", errors="replace"), vector


def _text_records(
    lines: Iterator[bytes], path: Path, first_line: int
) -> Iterator[tuple[str, np.ndarray]]:
    for n, line in enumerate(lines, first_line):
        parts = line.rstrip().split(b" ")
        if len(parts) < 2:
            continue
        try:
            vector = np.array(parts[1:], dtype=np.float32)
        except ValueError:
            raise ConfigError(
                f"model.word2vec: {path} line {n} is not 'word number number ...'; "
                "give a word2vec text or binary file"
            ) from None
        yield parts[0].decode("utf-8", errors="replace"), vector


def _records(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    with open(path, "rb") as file:
        first = file.readline()
        header = _header(first)
        rest = file.read(4096)
        file.seek(len(first))
        # A binary file's float bytes right after the header are not text (or hold zero bytes).
        is_binary = header is not None and (b"\x00" in rest or not _looks_like_text(rest))
        if is_binary:
            yield from _binary_records(file, header[0], header[1])
        else:
            lines = file if header else itertools.chain([first], file)
            yield from _text_records(lines, path, 2 if header else 1)


def _looks_like_text(chunk: bytes) -> bool:
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(chunk) - 4  # a character cut at the chunk's end
    return True


def read_word_vectors(
    path: str | Path, words: Sequence[str], dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors for ``words`` from a word2vec file: ``(vectors float32 (V, dim), found bool (V,))``.

    Rows of words not in the file are zero and ``found`` is False for them.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"model.word2vec: {path} not found; give a local word2vec file or set it to null"
        )
    index: dict[str, int] = {}
    for i, w in enumerate(words):
        index.setdefault(w, i)
    vectors = np.zeros((len(words), dim), dtype=np.float32)
    found = np.zeros(len(words), dtype=bool)
    exact = np.zeros(len(words), dtype=bool)
    for n, (word, vector) in enumerate(_records(path)):
        if len(vector) != dim:
            raise ConfigError(
                f"model.word2vec: {path} has {len(vector)}-d vectors (record {n + 1}, "
                f"{word!r}) but model.word_dim is {dim}; set word_dim to {len(vector)}"
            )
        for key, is_exact in ((word, True), (word.lower(), False)):
            i = index.get(key)
            if i is not None and not exact[i] and (is_exact or not found[i]):
                vectors[i], found[i], exact[i] = vector, True, is_exact
    return vectors, found


def init_word_embedding(
    embedding: torch.nn.Embedding, vectors: np.ndarray, found: np.ndarray
) -> None:
    """Copy the found vectors into ``embedding``; the others keep their random initialisation and
    the padding row stays zero."""
    with torch.no_grad():
        rows = torch.from_numpy(np.flatnonzero(found))
        embedding.weight[rows] = torch.from_numpy(vectors[found]).to(embedding.weight.dtype)
        if embedding.padding_idx is not None:
            embedding.weight[embedding.padding_idx] = 0
