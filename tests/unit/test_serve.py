"""imtext.serve without a server: the gallery, the indexes, the cache, the settings."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from imtext.errors import ConfigError, DataError
from imtext.serve.gallery import read_gallery, synthetic_gallery
from imtext.serve.index import EXACT, HNSW, IVF, IndexCache, build_index, ivf_lists, search
from imtext.serve.model import ExportDirSource, RegistrySource
from imtext.serve.state import build_state
from tests.conftest import REPO
from tests.serving import COLOURS, serve_config, tiny_export, tiny_gallery


def test_importing_the_service_imports_no_torch_train_or_kfp():
    code = (
        "import sys, imtext.serve, imtext.serve.app, imtext.serve.server, imtext.serve.state;"
        "import imtext.cli;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'kfp')"
        " or m.startswith('imtext.train')];"
        "print(','.join(bad))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.strip() == ""


def test_gallery_reads_one_split_with_its_captions(tmp_path):
    gallery = read_gallery(tiny_gallery(tmp_path), "test")
    assert gallery.names == tuple(COLOURS)
    assert gallery.captions == tuple(c for _, captions in COLOURS.values() for c in captions)
    assert [gallery.names[i] for i in gallery.caption_images] == [
        name for name, (_, captions) in COLOURS.items() for _ in captions
    ]
    assert gallery.paths["sub/green.png"] == (tmp_path / "images/sub/green.png").resolve()
    assert len(read_gallery(tmp_path, "all")) == len(COLOURS) + 1


def test_gallery_digest_follows_the_image_bytes(tmp_path):
    first = read_gallery(tiny_gallery(tmp_path)).digest
    assert read_gallery(tmp_path).digest == first
    (tmp_path / "images/blue.png").write_bytes((tmp_path / "images/red.png").read_bytes())
    assert read_gallery(tmp_path).digest != first


def test_gallery_refuses_a_record_outside_its_images_folder(tmp_path):
    tiny_gallery(tmp_path)
    data = json.loads((tmp_path / "dataset.json").read_text())
    data["images"][0]["filename"] = "../dataset.json"
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"\.\./dataset\.json lies outside"):
        read_gallery(tmp_path)


def test_gallery_without_dataset_says_what_to_pass(tmp_path):
    with pytest.raises(DataError, match="expected a Karpathy-format dataset.*--gallery"):
        read_gallery(tmp_path)
    with pytest.raises(DataError, match="no images in split 'val'"):
        read_gallery(tiny_gallery(tmp_path), "val")


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), dim))
    points = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_exact_index_equals_brute_force():
    vectors, queries = clustered(500, 16, 0), clustered(20, 16, 1)
    scores, ids = search(build_index(vectors, EXACT, serve_config()), queries, 7)
    expected = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :7]
    assert (ids == expected).all()
    assert np.allclose(scores, np.take_along_axis(queries @ vectors.T, expected, 1), atol=1e-5)


@pytest.mark.parametrize("kind", [IVF, HNSW])
def test_approximate_indexes_find_most_true_neighbours(kind):
    vectors, queries = clustered(4000, 16, 0), clustered(50, 16, 1)
    cfg = serve_config(ivf_probe=8)
    _, found = search(build_index(vectors, kind, cfg), queries, 10)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.9


def test_ivf_lists_keep_39_training_points_per_list():
    cfg = serve_config(ivf_lists=None)
    assert ivf_lists(cfg, 1_000_000) == 1000
    assert ivf_lists(cfg, 1000) == 25
    assert ivf_lists(cfg, 10) == 1
    assert ivf_lists(serve_config(ivf_lists=64), 1_000_000) == 64


def test_state_is_built_once_then_loaded_from_the_cache(tmp_path):
    gallery = read_gallery(tiny_gallery(tmp_path / "gallery"))
    source = ExportDirSource(tiny_export(tmp_path / "export"))
    cache = IndexCache(tmp_path / "cache")
    cfg = serve_config()
    first = build_state(source.load(source.current_version()), gallery, cfg, cache, print)
    again = build_state(source.load(source.current_version()), gallery, cfg, cache, print)
    assert (first.index_source, again.index_source) == ("built", "loaded")
    assert np.array_equal(first.image_embeddings, again.image_embeddings)
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert files == ["captions.npy", "exact.faiss", "images.npy"]  # no temporary file left
    # Another model (other weights) gets its own folder, never the first one's embeddings.
    other = ExportDirSource(tiny_export(tmp_path / "export2", seed=1))
    third = build_state(other.load(other.current_version()), gallery, cfg, cache, print)
    assert third.index_source == "built"
    assert not np.allclose(third.image_embeddings, first.image_embeddings)


def test_a_damaged_cached_index_is_rebuilt(tmp_path):
    gallery = read_gallery(tiny_gallery(tmp_path / "gallery"))
    source = ExportDirSource(tiny_export(tmp_path / "export"))
    cache, cfg = IndexCache(tmp_path / "cache"), serve_config()
    build_state(source.load(source.current_version()), gallery, cfg, cache, print)
    (index_file,) = (tmp_path / "cache").rglob("exact.faiss")
    index_file.write_bytes(b"not an index")
    state = build_state(source.load(source.current_version()), gallery, cfg, cache, print)
    assert state.index_source == "built" and state.image_index.ntotal == len(gallery)


def test_synthetic_gallery_is_named_by_size_and_recipe():
    assert synthetic_gallery(10, "seed 0").digest == synthetic_gallery(10, "seed 0").digest
    assert synthetic_gallery(10, "seed 0").digest != synthetic_gallery(10, "seed 1").digest
    assert synthetic_gallery(10, "seed 0").digest != synthetic_gallery(11, "seed 0").digest
    assert len(synthetic_gallery(10, "a")) == 10 and not synthetic_gallery(10, "a").paths


def test_serve_settings_are_checked():
    with pytest.raises(ConfigError, match="default_k: must be at most max_k"):
        serve_config(default_k=50, max_k=10)
    with pytest.raises(ConfigError, match="port: must be at most 65535"):
        serve_config(port=70000)


def test_model_uri_must_name_an_alias_or_a_version(tmp_path):
    from imtext.config import load_stage_config

    register = load_stage_config("register", REPO / "params.yaml")
    assert RegistrySource("models:/m@champion", None, register, tmp_path).polls
    assert not RegistrySource("models:/m/3", None, register, tmp_path).polls
    with pytest.raises(ConfigError, match="expected models:/NAME@ALIAS"):
        RegistrySource("runs:/abc/model", None, register, tmp_path)
