"""FAISS indexes over L2-normalised embeddings (inner product = the model's score), and their cache.

* ``exact``: :class:`faiss.IndexFlatIP`, every vector scored; the default.
* ``ivf``: :class:`faiss.IndexIVFFlat`, k-means lists; a query scans ``ivf_probe`` of them.
* ``hnsw``: :class:`faiss.IndexHNSWFlat`, a proximity graph searched with ``hnsw_ef_search``.

The cache holds one folder per (model, gallery): the gallery's embeddings and one file per index
kind and build setting. Every file is written to a temporary name in its folder and renamed, so a
crash or a second server never leaves a half-written file under the final name.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from imtext.config import ServeConfig

EXACT, IVF, HNSW = "exact", "ivf", "hnsw"
#: FAISS warns below this many training points per inverted list.
POINTS_PER_LIST = 39
#: Training vectors per list for the k-means of ``ivf`` (FAISS's own cap is 256): 64 keeps the
#: training of a 1M gallery's 1,000 lists to about a minute on two cores.
IVF_TRAINING_SAMPLE = 64


def ivf_lists(cfg: ServeConfig, size: int) -> int:
    """Inverted lists for a gallery of ``size``: ``cfg.ivf_lists`` or sqrt(size), never more
    than ``size / 39`` (and at least 1)."""
    wanted = cfg.ivf_lists or round(math.sqrt(size))
    return max(1, min(wanted, size // POINTS_PER_LIST))


def index_name(kind: str, cfg: ServeConfig, size: int) -> str:
    """File stem of an index: its kind and the settings it was built with (search-time settings,
    ``ivf_probe`` and ``hnsw_ef_search``, are applied after loading and are not part of it)."""
    if kind == EXACT:
        return EXACT
    if kind == IVF:
        return f"ivf-lists{ivf_lists(cfg, size)}"
    if kind == HNSW:
        return f"hnsw-m{cfg.hnsw_neighbours}-efc{cfg.hnsw_ef_construction}"
    raise ValueError(f"unknown index kind {kind!r}")


def build_index(embeddings: np.ndarray, kind: str, cfg: ServeConfig, seed: int = 0) -> faiss.Index:
    """An index of ``kind`` over ``embeddings`` (N, D) float32, L2-normalised; row i is id i."""
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    dim = vectors.shape[1]
    if kind == EXACT:
        index = faiss.IndexFlatIP(dim)
    elif kind == IVF:
        lists = ivf_lists(cfg, len(vectors))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        rng = np.random.default_rng(seed)
        sample = min(len(vectors), lists * IVF_TRAINING_SAMPLE)
        index.train(vectors[np.sort(rng.choice(len(vectors), sample, replace=False))])
    elif kind == HNSW:
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_neighbours, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    index.add(vectors)
    return configure_search(index, cfg)


def configure_search(index: faiss.Index, cfg: ServeConfig) -> faiss.Index:
    """Apply the search-time settings (``ivf_probe``, ``hnsw_ef_search``) to a built or loaded
    index."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(cfg.ivf_probe, index.nlist)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = cfg.hnsw_ef_search
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids (Q, min(k, N)) of the best ``k`` rows per query, best first. Ids an
    approximate index could not fill (-1) are dropped from the end of a row by the caller."""
    k = min(k, index.ntotal)
    if k == 0:
        empty = np.zeros((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def safe_name(text: str) -> str:
    """``text`` usable as one folder name (model names come from the registry)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


class IndexCache:
    """Embeddings and indexes under ``root/<model key>/<gallery digest>/``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def folder(self, model_key: str, gallery_digest: str) -> Path:
        return self.root / "indexes" / safe_name(model_key) / gallery_digest[:24]

    def load_embeddings(self, folder: Path, names: tuple[str, ...]) -> np.ndarray | None:
        """The cached embedding file ``names`` as arrays, or ``None`` when any is missing or
        unreadable (a partial cache is rebuilt, never trusted)."""
        arrays = []
        for name in names:
            try:
                # Memory-mapped: a 1M gallery's embeddings stay in the page cache, not the heap.
                arrays.append(np.load(folder / f"{name}.npy", allow_pickle=False, mmap_mode="r"))
            except (OSError, ValueError):
                return None
        return arrays

    def save_array(self, folder: Path, name: str, array: np.ndarray) -> None:
        write_atomic(folder / f"{name}.npy", lambda path: np.save(path, array))

    def load_index(self, folder: Path, stem: str, size: int, dim: int) -> faiss.Index | None:
        path = folder / f"{stem}.faiss"
        if not path.is_file():
            return None
        try:
            index = faiss.read_index(str(path))
        except RuntimeError:
            return None
        return index if index.ntotal == size and index.d == dim else None

    def save_index(self, folder: Path, stem: str, index: faiss.Index) -> Path:
        path = folder / f"{stem}.faiss"
        write_atomic(path, lambda tmp: faiss.write_index(index, str(tmp)))
        return path


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file next to ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        # np.save appends .npy to a name without it; the temporary name ends in .tmp, so write
        # through an open file instead.
        if path.suffix == ".npy":
            with open(tmp, "wb") as file:
                write(file)  # type: ignore[arg-type]
        else:
            write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
