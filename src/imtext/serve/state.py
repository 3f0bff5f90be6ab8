"""What one model version serves: its encoders, the gallery's embeddings and their indexes.

A :class:`ServingState` is immutable once built. The service holds one and replaces it whole when
the alias moves (:mod:`imtext.serve.service`); a request reads it once and answers from it alone,
so every answer comes from one version and names it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from imtext.config import ServeConfig
from imtext.errors import ImtextError
from imtext.export.runtime import InputError, open_image
from imtext.logs import MessageLog
from imtext.serve.gallery import Gallery
from imtext.serve.index import (
    EXACT,
    IndexCache,
    build_index,
    configure_search,
    index_name,
    search,
)
from imtext.serve.model import LoadedModel

#: Gallery images decoded and embedded per batch (bounds the memory of the build).
EMBED_BATCH = 64


@dataclass(frozen=True)
class Hit:
    """One result: a gallery image (by index) and, for caption results, a caption (by index)."""

    image: int
    score: float
    caption: int | None = None


@dataclass(frozen=True, eq=False)
class ServingState:
    model: LoadedModel
    gallery: Gallery
    #: Image embeddings (N, D), L2-normalised, row i = gallery.names[i].
    image_embeddings: np.ndarray
    #: The text -> image index (kind ``index_kind``) over ``image_embeddings``.
    image_index: faiss.Index
    #: Exact index over the caption embeddings, for image -> caption queries.
    caption_index: faiss.Index
    index_kind: str
    #: Size in bytes of the image index file in the cache.
    index_bytes: int
    #: How the image index came to be: "loaded" from the cache or "built".
    index_source: str
    #: Seconds from "load this version" to ready.
    load_seconds: float

    @property
    def model_info(self) -> dict[str, str]:
        return {"name": self.model.name, "version": self.model.version}

    def search_text(self, query: str, k: int) -> list[Hit]:
        """The ``k`` gallery images nearest to ``query``; :class:`InputError` for a query without
        words."""
        embedding = self.model.encoders.embed_texts([query])
        return self.images_near(embedding, k)

    def images_near(self, embedding: np.ndarray, k: int) -> list[Hit]:
        scores, ids = search(self.image_index, embedding, k)
        return [Hit(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]

    def captions_near(self, embedding: np.ndarray, k: int) -> list[Hit]:
        scores, ids = search(self.caption_index, embedding, k)
        owners = self.gallery.caption_images
        return [
            Hit(int(owners[i]), float(s), int(i))
            for s, i in zip(scores[0], ids[0], strict=True)
            if i >= 0
        ]

    def search_image_bytes(self, data: bytes, k: int, max_pixels: int) -> list[Hit]:
        """The ``k`` captions nearest to the image in ``data`` (PNG or JPEG); :class:`InputError`
        for bytes that are not one, or an image over ``max_pixels`` (read from its header)."""
        size = self.model.encoders.spec.image.size
        image = open_image(data, size, max_pixels=max_pixels)
        return self.captions_near(self.model.encoders.embed_images([image]), k)


def build_state(
    model: LoadedModel,
    gallery: Gallery,
    cfg: ServeConfig,
    cache: IndexCache,
    log: MessageLog,
    *,
    embeddings: tuple[np.ndarray, np.ndarray] | None = None,
) -> ServingState:
    """The state of ``model`` over ``gallery``, from the cache when it holds this (model, gallery)
    pair, else embedded and indexed now and written to the cache.

    ``embeddings`` (images, captions) skips the encoders for the gallery (a benchmark's synthetic
    gallery); they are still cached and indexed.
    """
    if not model.encoders.indexable:
        raise ImtextError(
            f"{model.name} version {model.version} is a similarity network: it scores (image, "
            "caption) pairs and has no embeddings to index; serve a dual_path or two_branch model"
        )
    start = time.monotonic()
    folder = cache.folder(model.cache_key, gallery.digest)
    dim = model.encoders.spec.embed_dim
    cached = cache.load_embeddings(folder, ("images", "captions"))
    if cached is not None and cached[0].shape == (len(gallery), dim):
        images, captions = cached
    else:
        if embeddings is None:
            log(f"embedding {len(gallery)} images and {len(gallery.captions)} captions")
            images = embed_gallery_images(model, gallery)
            captions = model.encoders.embed_texts(list(gallery.captions))
        else:
            images, captions = embeddings
        cache.save_array(folder, "images", images)
        cache.save_array(folder, "captions", captions)
    stem = index_name(cfg.index, cfg, len(gallery))
    index = cache.load_index(folder, stem, len(gallery), dim)
    source = "loaded"
    if index is None:
        index, source = build_index(images, cfg.index, cfg), "built"
        cache.save_index(folder, stem, index)
    else:
        index = configure_search(index, cfg)
    caption_index = build_index(captions.reshape(-1, dim), EXACT, cfg)
    return ServingState(
        model=model,
        gallery=gallery,
        image_embeddings=images,
        image_index=index,
        caption_index=caption_index,
        index_kind=cfg.index,
        index_bytes=(folder / f"{stem}.faiss").stat().st_size,
        index_source=source,
        load_seconds=time.monotonic() - start,
    )


def embed_gallery_images(model: LoadedModel, gallery: Gallery) -> np.ndarray:
    """(N, D) embeddings of the gallery's image files, a batch at a time."""
    size = model.encoders.spec.image.size
    chunks = []
    for start in range(0, len(gallery), EMBED_BATCH):
        batch = []
        for name in gallery.names[start : start + EMBED_BATCH]:
            path: Path = gallery.paths[name]
            try:
                batch.append(open_image(path.read_bytes(), size))
            except InputError as exc:
                raise ImtextError(f"gallery image {path}: {exc}; fix or remove it") from None
        chunks.append(model.encoders.embed_images(batch))
    dim = model.encoders.spec.embed_dim
    return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
