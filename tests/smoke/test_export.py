"""The export stage end to end on the tiny model: files, parity, recall, dynamic batch, INT8, and a
failed check that stops the stage."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from imtext._fs import MARKER
from imtext.config import ExportConfig
from imtext.data.datasets import eval_transform
from imtext.data.store import PreparedSplit, read_vocabulary
from imtext.errors import ConfigError, ImtextError
from imtext.export import verify
from imtext.export.onnx import TextEncoder, evenly_spaced, export_onnx, quantize_dynamic_encoder
from imtext.export.runtime import InputError, OnnxEncoders
from imtext.export.stage import export
from imtext.models.files import load_model

CFG = ExportConfig(
    exporter="torchscript",
    opset=18,
    parity_tolerance=1e-4,
    recall_split="test",
    recall_tolerance=0.5,
    quantize="static",
    calibration_images=16,
)
ONNX_FILES = {
    "image_encoder.onnx",
    "text_encoder.onnx",
    "pair_scorer.onnx",
    "int8/image_encoder.int8.onnx",
    "int8/text_encoder.int8.onnx",
}


@pytest.fixture(scope="module")
def exported(tiny_model_file: Path, tiny_prepared: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "export"
    messages: list[str] = []
    metrics = export(CFG, tiny_model_file, tiny_prepared, out, log=messages.append)
    assert messages[-1] == "export: passed"
    return out, metrics


@pytest.fixture(scope="module")
def test_split(tiny_prepared: Path) -> PreparedSplit:
    return PreparedSplit.load(tiny_prepared, "test")


@pytest.fixture(scope="module")
def model(tiny_model_file: Path):
    return load_model(tiny_model_file)[0]


def test_writes_the_encoders_and_what_a_client_needs(exported, tiny_prepared):
    out, _ = exported
    names = {path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file()}
    assert names == ONNX_FILES | {
        MARKER,
        "preprocess.json",
        "vocab.json",
        "parity.json",
        "metrics.json",
    }
    assert read_vocabulary(out) == read_vocabulary(tiny_prepared)
    spec = json.loads((out / "preprocess.json").read_text())
    assert spec["image"]["size"] == 32 and spec["embed_dim"] == 16
    assert spec["text"]["max_len"] == PreparedSplit.load(tiny_prepared, "test").tokens.shape[1]
    for name in ONNX_FILES:
        # Weights inside the file: nothing else to ship, and the checker accepts it.
        model = onnx.load(str(out / name), load_external_data=False)
        onnx.checker.check_model(model)
        assert not any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
        )
    image = onnx.load(str(out / "image_encoder.onnx"))
    assert {e.domain: e.version for e in image.opset_import}[""] == 18
    assert {p.key: p.value for p in image.metadata_props}["imtext.encoder"] == "image"


def test_parity_and_recall_are_recorded_and_within_tolerance(exported):
    out, metrics = exported
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True and report["failures"] == []
    assert report["provider"] == "CPUExecutionProvider"
    assert (report["n_images"], report["n_captions"]) == (12, 60)
    for encoder in ("image", "text"):
        section = report["parity"][encoder]
        assert set(section["by_batch_size"]) == {"1", "12" if encoder == "image" else "32"}
        assert section["max_abs_diff"] <= CFG.parity_tolerance
    assert metrics["parity_max_abs_diff_image"] <= CFG.parity_tolerance
    assert metrics["onnx_rsum"] == metrics["torch_rsum"]
    assert report["recall"]["onnx"] == report["recall"]["torch"]
    # 32 px images at a 32 px crop: the runtime's preprocessing is exact and its tokens too.
    assert metrics["client_rsum"] == metrics["torch_rsum"]
    assert metrics["token_mismatches"] == 0
    assert json.loads((out / "metrics.json").read_text()) == metrics


@pytest.mark.parametrize("batch", [1, 7])
def test_the_batch_axis_is_dynamic(exported, test_split, model, batch):
    out, _ = exported
    transform = eval_transform(32)
    images = torch.stack([transform(test_split.image(i)) for i in range(batch)])
    tokens = torch.from_numpy(test_split.tokens[:batch].astype(np.int64))
    for name, inputs, encode in (
        ("image_encoder.onnx", images, model.encode_image),
        ("text_encoder.onnx", tokens, model.encode_text),
    ):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[0] == "batch"
        (actual,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
        with torch.inference_mode():
            expected = encode(inputs).numpy()
        assert actual.shape == (batch, 16)
        np.testing.assert_allclose(actual, expected, atol=CFG.parity_tolerance)


def test_the_runtime_embeds_raw_images_and_sentences_like_pytorch(exported, test_split, model):
    encoders = OnnxEncoders.load(exported[0], threads=1)
    images = [test_split.image(i) for i in range(test_split.n_images)]
    captions = [str(c) for c in test_split.captions[:9]]
    with torch.inference_mode():
        transform = eval_transform(32)
        expected_images = model.encode_image(torch.stack([transform(i) for i in images])).numpy()
        tokens = torch.from_numpy(test_split.tokens[:9].astype(np.int64))
        expected_texts = model.encode_text(tokens).numpy()
    np.testing.assert_allclose(encoders.embed_images(images), expected_images, atol=1e-4)
    np.testing.assert_allclose(encoders.embed_texts(captions), expected_texts, atol=1e-4)
    assert encoders.embed_texts([]).shape == (0, 16)
    with pytest.raises(InputError, match="text 1: no words"):
        encoders.embed_texts(["a red circle", "?!"])


def test_int8_encoders_give_finite_normalised_embeddings(exported, test_split):
    out, metrics = exported
    encoders = OnnxEncoders.load(out, int8=True, threads=1)
    assert encoders.providers == ["CPUExecutionProvider"]
    images = encoders.embed_images([test_split.image(i) for i in range(5)])
    texts = encoders.embed_texts([str(c) for c in test_split.captions[:5]])
    for embeddings in (images, texts):
        assert embeddings.shape == (5, 16) and np.isfinite(embeddings).all()
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(metrics["int8_rsum"]) and metrics["int8_max_abs_diff_image"] < 0.5


def test_a_failed_parity_check_stops_the_export_and_keeps_only_the_evidence(
    tiny_model_file, tiny_prepared, tmp_path, monkeypatch
):
    real_runner = verify.torch_runner

    def perturbed_runner(encode):
        run = real_runner(encode)
        return lambda batch: run(batch) + np.float32(1e-3)  # a PyTorch that the ONNX file is not

    monkeypatch.setattr(verify, "torch_runner", perturbed_runner)
    out = tmp_path / "export"
    cfg = dataclasses.replace(CFG, quantize="none")
    with pytest.raises(ImtextError, match=r"image encoder: max \|ONNX Runtime - PyTorch\| 0\.001"):
        export(cfg, tiny_model_file, tiny_prepared, out)
    assert sorted(path.name for path in out.iterdir()) == [MARKER, "parity.json"]
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is False
    assert len(report["failures"]) == 2  # both encoders
    assert "export.parity_tolerance 0.0001" in report["failures"][0]
    with pytest.raises(InputError, match="failed its checks"):
        OnnxEncoders.load(out)


def test_a_recall_disagreement_stops_the_export(
    tiny_model_file, tiny_prepared, tmp_path, monkeypatch
):
    real_runner = verify.torch_runner

    def shuffled_runner(encode):
        run = real_runner(encode)
        # Same vectors, other rows: every embedding still unit length, recall changes.
        return lambda batch: run(batch)[::-1].copy()

    monkeypatch.setattr(verify, "torch_runner", shuffled_runner)
    cfg = dataclasses.replace(CFG, parity_tolerance=10.0, recall_tolerance=0.0, quantize="none")
    with pytest.raises(ImtextError, match="recall: rsum from ONNX embeddings .* differs by"):
        export(cfg, tiny_model_file, tiny_prepared, tmp_path / "export")


def test_an_opset_the_exporter_cannot_write_is_a_config_error(model, tmp_path):
    with pytest.raises(
        ConfigError, match="export.opset: 17 is below 18.* set export.opset to 18 or higher"
    ):
        export_onnx(TextEncoder(model), torch.zeros(2, 8, dtype=torch.int64), 17, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_the_dynamo_exporter_passes_the_same_checks(tiny_model_file, tiny_prepared, tmp_path):
    """torch.export's exporter, the alternative to the default TorchScript one (export.exporter)."""
    cfg = dataclasses.replace(CFG, exporter="dynamo", quantize="none")
    metrics = export(cfg, tiny_model_file, tiny_prepared, tmp_path / "export")
    report = json.loads((tmp_path / "export" / "parity.json").read_text())
    assert report["passed"] and report["exporter"].startswith("torch.onnx.export(dynamo=True)")
    assert metrics["parity_max_abs_diff_image"] <= cfg.parity_tolerance
    assert metrics["onnx_rsum"] == metrics["torch_rsum"]


def test_static_int8_is_calibrated_qdq_and_recorded(exported):
    out, metrics = exported
    model = onnx.load(str(out / "int8" / "image_encoder.int8.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "ConvInteger" not in ops
    spec = json.loads((out / "preprocess.json").read_text())
    assert spec["int8"]["quantization"] == "static"
    report = json.loads((out / "parity.json").read_text())
    assert report["int8"]["quantization"] == "static"
    assert report["int8"]["calibration_images"] == CFG.calibration_images
    assert metrics["int8_max_abs_diff_image"] < 0.5
    # Nothing of the quantizer's working files is left in the export.
    assert not [path.name for path in out.rglob("*") if path.suffix in (".in", ".pre")]


def test_calibration_rows_are_spread_over_the_split_and_never_repeat():
    assert evenly_spaced(3, 10).tolist() == [0, 4, 9]
    assert evenly_spaced(20, 5).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spaced(1, 7).tolist() == [0]


def test_dynamic_int8_quantizes_the_weights_and_each_call(exported, tmp_path):
    out, _ = exported
    quantize_dynamic_encoder(out / "image_encoder.onnx", tmp_path / "dynamic.onnx")
    model = onnx.load(str(tmp_path / "dynamic.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= ops and "QuantizeLinear" not in ops
    session = ort.InferenceSession(
        str(tmp_path / "dynamic.onnx"), providers=["CPUExecutionProvider"]
    )
    (embeddings,) = session.run(None, {"images": np.zeros((2, 3, 32, 32), np.float32)})
    assert embeddings.shape == (2, 16) and np.isfinite(embeddings).all()


@pytest.fixture(scope="module")
def similarity_model_file(tiny_prepared: Path, tmp_path_factory) -> Path:
    """An untrained similarity network (a fixed seed) on the tiny data: its scores are not dot
    products of anything, which is what the export must preserve."""
    from imtext.config import ModelConfig
    from imtext.models import build_model
    from imtext.models.files import model_record, save_atomic
    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY_MODEL, "method": "similarity", "fusion_dims": [8]})
    vocab_size = len(read_vocabulary(tiny_prepared))
    path = tmp_path_factory.mktemp("similarity") / "model.pt"
    save_atomic(model_record(build_model(cfg, vocab_size, 48), cfg, vocab_size, 48), path)
    return path


def test_the_similarity_network_exports_codes_and_its_pair_scorer(
    similarity_model_file, tiny_prepared, test_split, tmp_path
):
    from imtext.eval.embed import score_split

    cfg = dataclasses.replace(CFG, quantize="none")
    out = tmp_path / "export"
    messages: list[str] = []
    metrics = export(cfg, similarity_model_file, tiny_prepared, out, log=messages.append)
    assert messages[-1] == "export: passed"
    assert any("cannot be indexed" in m for m in messages)
    spec = json.loads((out / "preprocess.json").read_text())
    assert spec["similarity"] == "network" and spec["pair_scorer"] == "pair_scorer.onnx"
    assert "NOT embeddings" in spec["notes"]["output"]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["similarity"] == "network"
    assert parity["parity"]["scorer"]["count"] == 2 * test_split.n_captions
    assert metrics["parity_max_abs_diff_scorer"] <= cfg.parity_tolerance

    # The ONNX path scores every pair as PyTorch's evaluation does (score_split), so its recall
    # is the evaluation's; a dot product of the codes is a different ranking.
    model, _ = load_model(similarity_model_file)
    torch_scores = score_split(model, test_split, 32, torch.device("cpu")).numpy()
    encoders = OnnxEncoders.load(out)
    assert not encoders.indexable
    images = [test_split.image(row) for row in range(test_split.n_images)]
    image_codes = encoders.embed_images(images)
    text_codes = encoders.embed_texts(list(test_split.captions))
    onnx_scores = encoders.score_code_matrix(image_codes, text_codes)
    # The client path (Pillow resizing) differs from eval_transform by a few uint8 levels.
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-2)
    assert not np.allclose(image_codes @ text_codes.T, onnx_scores, atol=1e-2)
    assert metrics["onnx_rsum"] == pytest.approx(metrics["torch_rsum"], abs=cfg.recall_tolerance)
    # score_pairs is the diagonal of the matrix, row by row.
    pairs = encoders.score_pairs(images[:3], list(test_split.captions[:3]))
    np.testing.assert_allclose(pairs, np.diag(onnx_scores[:3, :3]), atol=1e-5)


def test_an_embedding_export_scores_pairs_by_dot_product(exported, test_split):
    out, metrics = exported
    encoders = OnnxEncoders.load(out)
    assert encoders.indexable
    assert json.loads((out / "preprocess.json").read_text())["similarity"] == "dot"
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(encoders.score_code_pairs(a, b), (a * b).sum(1), rtol=1e-5)
    np.testing.assert_allclose(encoders.score_code_matrix(a, b), a @ b.T, rtol=1e-5)
    assert metrics["parity_max_abs_diff_scorer"] <= CFG.parity_tolerance
    with pytest.raises(InputError, match="same shape"):
        encoders.score_code_pairs(a, b[:3])


@pytest.fixture(scope="module")
def gru_model_file(tiny_prepared: Path, tmp_path_factory) -> Path:
    """An untrained model with VSE++'s GRU text encoder and pre-ReLU embeddings (a fixed seed)."""
    from imtext.config import ModelConfig
    from imtext.models import build_model
    from imtext.models.files import model_record, save_atomic
    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY_MODEL, "text_encoder": "gru", "embedding": "pre_relu"})
    vocab_size = len(read_vocabulary(tiny_prepared))
    path = tmp_path_factory.mktemp("gru") / "model.pt"
    save_atomic(model_record(build_model(cfg, vocab_size, 48), cfg, vocab_size, 48), path)
    return path


def test_the_gru_text_encoder_exports_with_the_same_contract_and_checks(
    gru_model_file, tiny_prepared, test_split, tmp_path
):
    cfg = dataclasses.replace(CFG, quantize="none")
    out = tmp_path / "export"
    messages: list[str] = []
    metrics = export(cfg, gru_model_file, tiny_prepared, out, log=messages.append)
    assert messages[-1] == "export: passed"
    assert metrics["parity_max_abs_diff_text"] <= cfg.parity_tolerance
    assert metrics["onnx_rsum"] == pytest.approx(metrics["torch_rsum"], abs=cfg.recall_tolerance)
    # The ONNX text encoder takes the same (batch, max_len) int64 tokens as the CNN's, and
    # padding anywhere in the window is ignored by the pooling as in PyTorch.
    session = ort.InferenceSession(str(out / "text_encoder.onnx"))
    (tokens,) = session.get_inputs()
    assert tokens.name == "tokens" and tokens.type == "tensor(int64)"
    model, _ = load_model(gru_model_file)
    rows = torch.from_numpy(test_split.tokens[:5].astype(np.int64))
    shifted = torch.roll(rows, shifts=3, dims=1)  # the words moved right, padding first
    with torch.no_grad():
        expected = model.encode_text(shifted).numpy()
    (got,) = session.run(None, {"tokens": shifted.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (got < 0).any(), "pre-ReLU embeddings have negative coordinates"
