"""imtext.registry on an embedded MLflow (SQLite store and artifacts in tmp_path).

The export stage's ONNX files are stood in for by two tiny ONNX graphs built with ``onnx.helper``
(mean-pooled pixels / word vectors, projected and L2-normalised) with the inputs, output and
``preprocess.json`` of the real export, so the real ``imtext.export.runtime`` serves them; building
them takes milliseconds and no torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imtext.config import RegisterConfig
from imtext.errors import ConfigError, ImtextError
from imtext.export.runtime import ExportSpec, ImageSpec, TextSpec
from imtext.registry import (
    RegistryUnavailableError,
    load_champion,
    preview_promotion,
    promote,
    register,
)
from imtext.registry.provenance import (
    data_md5,
    flatten_params,
    git_commit,
    history_metrics,
    params_sha256,
)
from imtext.registry.retry import (
    RegistryError,
    is_unavailable,
    retry_environment,
    retry_settings,
    translated,
)
from imtext.registry.tracking import local_artifact_root, resolve_tracking_uri

EMBED_DIM = 8
IMAGE_SIZE = 16
MAX_LEN = 6
VOCAB = ["<pad>", "<unk>", "a", "red", "blue", "square", "circle", "on", "grey"]
GIT_COMMIT = "0123456789abcdef0123456789abcdef01234567"
#: The stand-in similarity network's weights (not all equal: its score is not a dot product).
WEIGHTS = np.linspace(-1.0, 2.0, EMBED_DIM, dtype=np.float32)
PARAMS = {
    "finetune": {"lr": 0.001, "epochs": 2, "loss_weights": [2.0, 1.0, 0.1], "patience": None},
    "register": {"gate_metric": "rsum"},
}


# ---------------------------------------------------------------- tiny upstream outputs


def write_onnx_encoders(out: Path, seed: int = 0, network: bool = False) -> Path:
    """``image_encoder.onnx`` and ``text_encoder.onnx`` with the export stage's inputs and output
    names: ``images`` float32 [N,3,H,W] / ``tokens`` int64 [N,L] -> ``embeddings`` [N,D], L2-normed.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)

    def save(nodes, inputs, initializers, name):
        output = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", EMBED_DIM])
        graph = helper.make_graph(nodes, name, inputs, [output], initializer=initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, out / f"{name}.onnx")

    projection = numpy_helper.from_array(
        rng.standard_normal((3, EMBED_DIM)).astype(np.float32), "projection"
    )
    save(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "projection"], ["raw"]),
            helper.make_node("LpNormalization", ["raw"], ["embeddings"], axis=1, p=2),
        ],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [projection],
        "image_encoder",
    )
    words = numpy_helper.from_array(
        rng.standard_normal((len(VOCAB), EMBED_DIM)).astype(np.float32), "words"
    )
    save(
        [
            helper.make_node("Gather", ["words", "tokens"], ["vectors"]),
            helper.make_node("ReduceMean", ["vectors"], ["raw"], axes=[1], keepdims=0),
            helper.make_node("LpNormalization", ["raw"], ["embeddings"], axis=1, p=2),
        ],
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["N", "L"])],
        [words],
        "text_encoder",
    )
    if network:  # a stand-in similarity network: a weighted sum of the codes' product
        weights = numpy_helper.from_array(WEIGHTS, "weights")
        scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N"])
        graph = helper.make_graph(
            [
                helper.make_node("Mul", ["image_codes", "text_codes"], ["product"]),
                helper.make_node("MatMul", ["product", "weights"], ["scores"]),
            ],
            "pair_scorer",
            [
                helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", EMBED_DIM])
                for name in ("image_codes", "text_codes")
            ],
            [scores],
            initializer=[weights],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, out / "pair_scorer.onnx")
    spec = ExportSpec(
        image=ImageSpec(size=IMAGE_SIZE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        text=TextSpec(max_len=MAX_LEN),
        embed_dim=EMBED_DIM,
        similarity="network" if network else "dot",
        pair_scorer="pair_scorer.onnx" if network else None,
    )
    (out / "preprocess.json").write_text(json.dumps(spec.to_dict()))
    (out / "vocab.json").write_text(json.dumps({"words": VOCAB}))
    (out / "parity.json").write_text(json.dumps(parity_report(network)))
    return out


def parity_report(network: bool = False) -> dict:
    """The parts of export's ``parity.json`` that register checks: verdict, tolerance and the
    recorded max |ONNX Runtime - PyTorch| of each ONNX file."""

    def section() -> dict:
        return {"max_abs_diff": 2e-7, "by_batch_size": {"1": 2e-7, "4": 1e-7}, "count": 12}

    return {
        "passed": True,
        "failures": [],
        "similarity": "network" if network else "dot",
        "format_version": 1,
        "parity": {
            "tolerance": 1e-4,
            **{name: section() for name in ("image", "text", "scorer")},
        },
    }


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_eval_dir(out: Path, rsum: float) -> Path:
    out.mkdir(parents=True)
    recalls = {f"{d}_r{k}": rsum / 6 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    metrics = {
        **recalls,
        "i2t_medr": 2.0,
        "t2i_medr": 3.0,
        "i2t_meanr": 4.5,
        "t2i_meanr": 5.5,
        "rsum": rsum,
        "n_images": 12,
        "n_captions": 60,
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "evaluation.json").write_text(json.dumps({"protocol": "full", "split": "test"}))
    (out / "report.html").write_text("<html><body>report</body></html>")
    (out / "recall_curve.json").write_text(json.dumps({"k": [1, 5], "i2t": [1.0, 2.0]}))
    for name in ("report.png", "recall_curve.png"):
        (out / name).write_bytes(png_bytes((10, 20, 30)))
    return out


def write_train_dir(out: Path) -> Path:
    out.mkdir(parents=True)
    # register treats model.pt as an opaque artifact; its bytes need not be a real model here.
    (out / "model.pt").write_bytes(b"state_dict and config")
    history = [
        {"epoch": 1, "lr": 0.01, "train_loss": 3.0, "val_rsum": 10.0},
        {"epoch": 2, "lr": 0.01, "train_loss": 2.0, "val_rsum": 20.0},
    ]
    (out / "history.json").write_text(json.dumps(history))
    (out / "metrics.json").write_text(json.dumps({"val_rsum": 20.0, "best_epoch": 2}))
    return out


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the md5 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Stages:
    """Upstream outputs in a folder: one training and export dir, an evaluate dir per rsum."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.train = write_train_dir(root / "finetune")
        self.export = write_onnx_encoders(root / "export")
        self.network_export = write_onnx_encoders(root / "network-export", network=True)
        self.data_dvc = root / "data.dvc"
        self.data_dvc.write_text(
            "outs:\n- md5: 91720f6acf9fdd68854db09bf69fde34.dir\n  size: 1\n  path: data\n"
        )

    def evaluation(self, rsum: float) -> Path:
        out = self.root / f"evaluate-{rsum}"
        return out if out.exists() else write_eval_dir(out, rsum)

    def register(self, cfg: RegisterConfig, rsum: float, network: bool = False, **kwargs):
        return register(
            cfg,
            params=PARAMS,
            train_dir=self.train,
            eval_dir=self.evaluation(rsum),
            export_dir=self.network_export if network else self.export,
            data_dvc=self.data_dvc,
            **kwargs,
        )


def make_cfg(tracking_uri: str | None, **overrides) -> RegisterConfig:
    values = dict(
        tracking_uri=tracking_uri,
        experiment="imtext-test",
        model_name="imtext-test-model",
        alias="champion",
        gate_metric="rsum",
        gate_min_delta=0.5,
        retries=2,
        retry_backoff_s=0.01,
    )
    return RegisterConfig(**(values | overrides))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean working directory outside any git repository, MLflow pointed nowhere by default."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setenv("IMTEXT_GIT_COMMIT", GIT_COMMIT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    # An unreachable server must fail in seconds: no hidden retries, short timeouts.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return work


@pytest.fixture
def stages(tmp_path: Path) -> Stages:
    return Stages(tmp_path / "stages")


@pytest.fixture
def cfg(workdir: Path) -> RegisterConfig:
    return make_cfg(f"sqlite:///{workdir / 'mlflow.db'}")


def client_for(cfg: RegisterConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)


def champion_of(cfg: RegisterConfig) -> str | None:
    version = client_for(cfg).get_registered_model(cfg.model_name).aliases.get(cfg.alias)
    return None if version is None else str(version)


# ---------------------------------------------------------------- register


def test_register_logs_run_and_tags_version(cfg, stages, workdir):
    stages.evaluation(60.0)
    before = snapshot(stages.root)
    messages = []
    registered = stages.register(cfg, 60.0, log=messages.append)
    assert snapshot(stages.root) == before  # the inputs are read, never written

    assert (registered.name, registered.version) == (cfg.model_name, "1")
    assert registered.metrics["rsum"] == 60.0 and registered.model_uri.endswith("/1")
    client = client_for(cfg)
    version = client.get_model_version(cfg.model_name, "1")
    assert version.run_id == registered.run_id
    expected_tags = {
        "imtext.git_commit": GIT_COMMIT,
        "imtext.data_md5": "91720f6acf9fdd68854db09bf69fde34.dir",
        "imtext.params_sha256": params_sha256(PARAMS),
        "imtext.gate_metric": "rsum",
        "imtext.gate_value": "60.0",
        "imtext.similarity": "dot",
    }
    assert expected_tags.items() <= version.tags.items()

    run = client.get_run(registered.run_id)
    assert run.info.status == "FINISHED"
    assert expected_tags.items() <= run.data.tags.items()
    assert run.data.tags["mlflow.source.git.commit"] == GIT_COMMIT
    assert run.data.params["finetune.lr"] == "0.001"
    assert run.data.params["finetune.loss_weights"] == "[2.0, 1.0, 0.1]"
    assert run.data.params["finetune.patience"] == "null"
    assert run.data.metrics["rsum"] == 60.0 and run.data.metrics["n_captions"] == 60
    history = client.get_metric_history(registered.run_id, "finetune.val_rsum")
    assert [(m.step, m.value) for m in history] == [(1, 10.0), (2, 20.0)]

    artifacts = {a.path for a in client.list_artifacts(registered.run_id, "evaluation")}
    artifacts |= {a.path for a in client.list_artifacts(registered.run_id, "training")}
    artifacts |= {a.path for a in client.list_artifacts(registered.run_id)}
    assert {
        "evaluation/report.html",
        "evaluation/report.png",
        "evaluation/recall_curve.json",
        "evaluation/metrics.json",
        "training/model.pt",
        "training/history.json",
        "export",
        "params.json",
    } <= artifacts
    # Artifacts of the embedded store sit next to its database, not in some ./mlruns.
    assert (workdir / "mlartifacts").is_dir() and not (workdir / "mlruns").exists()
    assert version.source.startswith("models:/")
    assert any("registered" in m for m in messages)


def test_register_rejects_missing_inputs_before_contacting_mlflow(stages, workdir):
    cfg = make_cfg("http://127.0.0.1:9")  # never contacted: inputs are checked first
    with pytest.raises(ImtextError, match="no numeric 'ndcg'"):
        stages.register(make_cfg(cfg.tracking_uri, gate_metric="ndcg"), 60.0)
    (stages.export / "parity.json").write_text(json.dumps({"passed": False, "failures": ["x"]}))
    with pytest.raises(ImtextError, match="did not pass its checks"):
        stages.register(cfg, 60.0)
    (stages.export / "parity.json").write_text(json.dumps({"passed": True}))
    (stages.export / "text_encoder.onnx").rename(stages.root / "moved.onnx")
    with pytest.raises(ImtextError, match="text_encoder.onnx: ONNX encoder not found"):
        stages.register(cfg, 60.0)


# ---------------------------------------------------------------- promote


def test_first_version_is_promoted(cfg, stages):
    stages.register(cfg, 60.0)
    decision = promote(cfg, 1)
    assert decision.promoted and decision.previous_champion is None
    assert decision.candidate_metric == 60.0 and decision.champion_metric is None
    assert champion_of(cfg) == "1"
    tags = client_for(cfg).get_model_version(cfg.model_name, "1").tags
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.previous_champion"] == "none"
    assert tags["promotion.candidate_rsum"] == "60.0"
    assert tags["promotion.champion_rsum"] == "none"
    assert "promotion.time" in tags and "promotion.forced_reason" not in tags


def test_a_store_other_than_the_process_default_registers_and_promotes(stages, workdir):
    # MLflow resolves a new version's source through its global URI (sqlite:///mlflow.db in the
    # working directory here); the explicit store must be used all the same.
    other = make_cfg(f"sqlite:///{workdir.parent / 'elsewhere' / 'store.db'}")
    (workdir.parent / "elsewhere").mkdir()
    assert stages.register(other, 60.0).version == "1"
    assert promote(other, 1).promoted and champion_of(other) == "1"
    assert not (workdir / "mlflow.db").exists()


def test_registering_leaves_the_tracking_uri_variable_as_it_was(stages, workdir, monkeypatch):
    target = f"sqlite:///{workdir / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", target)
    stages.register(make_cfg(None), 60.0)
    assert os.environ["MLFLOW_TRACKING_URI"] == target
    assert preview_promotion(make_cfg(None), 1).promoted


def test_gate_refuses_equal_and_worse_and_promotes_better(cfg, stages):
    for rsum in (60.0, 60.4, 50.0, 61.0):  # versions 1..4; min delta 0.5
        stages.register(cfg, rsum)
    assert promote(cfg, 1).promoted
    again = promote(cfg, 1)
    assert again.promoted and again.previous_champion == "1" and "already" in again.reason

    preview = preview_promotion(cfg, 2)  # reads the gate, writes nothing
    assert not preview.promoted and preview.champion_metric == 60.0
    assert "promotion.decision" not in client_for(cfg).get_model_version(cfg.model_name, "2").tags
    assert preview_promotion(cfg, 4).promoted and champion_of(cfg) == "1"

    equal = promote(cfg, 2)  # +0.4 is not more than 0.5
    assert not equal.promoted and champion_of(cfg) == "1"
    assert (equal.candidate_metric, equal.champion_metric, equal.previous_champion) == (
        60.4,
        60.0,
        "1",
    )
    assert "60.4" in equal.reason and "60" in equal.reason and "does not beat" in equal.reason

    worse = promote(cfg, "3")
    assert not worse.promoted and champion_of(cfg) == "1"
    assert "50" in worse.reason and "60" in worse.reason
    tags = client_for(cfg).get_model_version(cfg.model_name, "3").tags
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.champion_rsum"] == "60.0"
    assert tags["promotion.candidate_rsum"] == "50.0"
    assert tags["promotion.previous_champion"] == "1"

    better = promote(cfg, 4)
    assert better.promoted and champion_of(cfg) == "4"
    assert better.previous_champion == "1" and "beats" in better.reason
    assert client_for(cfg).get_model_version(cfg.model_name, "4").tags["promotion.decision"] == (
        "promoted"
    )


def test_force_promotes_with_a_recorded_reason(cfg, stages):
    stages.register(cfg, 60.0)
    stages.register(cfg, 40.0)
    promote(cfg, 1)
    with pytest.raises(ConfigError, match="reason"):
        promote(cfg, 2, force_reason="  ")
    assert champion_of(cfg) == "1"

    decision = promote(cfg, 2, force_reason="rollback: v1 mislabels red squares")
    assert decision.promoted and champion_of(cfg) == "2"
    assert "forced" in decision.reason and "does not beat" in decision.reason
    tags = client_for(cfg).get_model_version(cfg.model_name, "2").tags
    assert tags["promotion.decision"] == "forced"
    assert tags["promotion.forced_reason"] == "rollback: v1 mislabels red squares"
    assert tags["promotion.previous_champion"] == "1"


def test_promote_without_the_gate_metric_is_a_clear_error(cfg, stages):
    stages.register(cfg, 60.0)
    with pytest.raises(ImtextError, match="version 1 of 'imtext-test-model' has no metric 'ndcg'"):
        promote(make_cfg(cfg.tracking_uri, gate_metric="ndcg"), 1)
    with pytest.raises(RegistryError, match="has no version 7"):
        promote(cfg, 7)
    assert client_for(cfg).get_registered_model(cfg.model_name).aliases == {}


# ---------------------------------------------------------------- the champion serves


def test_champion_loads_and_embeds_texts_and_images(cfg, stages, monkeypatch):
    stages.register(cfg, 60.0)
    promote(cfg, 1)

    model = load_champion(cfg.model_name, tracking_uri=cfg.tracking_uri)
    texts = model.predict(pd.DataFrame({"text": ["a red square", "a blue circle on grey"]}))
    assert texts.shape[0] == 2 and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-4)
    images = model.predict(
        pd.DataFrame({"image": [png_bytes((200, 0, 0)), png_bytes((0, 0, 200), (9, 9))]})
    )
    assert images.shape == texts.shape
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-4)
    from mlflow.exceptions import MlflowException

    # Both columns: each row is a pair, scored by the dot product of its embeddings.
    pair_images = [png_bytes((200, 0, 0)), png_bytes((0, 0, 200), (9, 9))]
    pairs = model.predict(pd.DataFrame({"image": pair_images, "text": ["a blue circle", "a"]}))
    one_by_one = [
        model.predict(pd.DataFrame({"image": [im]}))[0] @ model.predict({"text": [tx]})[0]
        for im, tx in zip(pair_images, ["a blue circle", "a"], strict=True)
    ]
    assert pairs.shape == (2, 1)
    np.testing.assert_allclose(pairs[:, 0], one_by_one, atol=1e-5)
    with pytest.raises(MlflowException, match="expected the column 'text'"):
        model.predict(pd.DataFrame({"caption": ["a"]}))
    with pytest.raises(MlflowException, match="text 0: no words"):
        model.predict(pd.DataFrame({"text": ["?!"]}))
    with pytest.raises(MlflowException, match="image row 0: not a PNG or JPEG"):
        model.predict(pd.DataFrame({"image": [b"not an image"]}))

    # What a serving process does: resolve the alias from the URI alone.
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking_uri)
    served = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@champion")
    np.testing.assert_allclose(served.predict({"text": ["a red square"]}), texts[:1], atol=1e-6)


def test_a_similarity_network_scores_pairs_and_never_replaces_an_embedding_champion(cfg, stages):
    from mlflow.exceptions import MlflowException

    stages.register(cfg, 60.0)
    promote(cfg, 1)
    network = stages.register(cfg, 90.0, network=True)
    client = client_for(cfg)
    assert client.get_model_version(cfg.model_name, "2").tags["imtext.similarity"] == "network"
    assert not preview_promotion(cfg, 2).promoted  # the pipeline's gate sees it too
    decision = promote(cfg, 2)
    assert not decision.promoted and decision.incompatible
    assert "'network' (pair scores only)" in decision.reason
    assert f"e.g. {cfg.model_name}-network" in decision.reason
    with pytest.raises(ConfigError, match="cannot force version 2"):
        promote(cfg, 2, force_reason="it is better")
    assert champion_of(cfg) == "1"
    assert client.get_model_version(cfg.model_name, "2").tags["promotion.decision"] == "refused"

    # Under a name of its own it is the champion, and it answers pairs only.
    own = make_cfg(cfg.tracking_uri, model_name=f"{cfg.model_name}-network")
    stages.register(own, 90.0, network=True)
    assert promote(own, 1).promoted
    model = load_champion(own.model_name, tracking_uri=cfg.tracking_uri)
    with pytest.raises(MlflowException, match="similarity network: it scores .* pairs"):
        model.predict(pd.DataFrame({"text": ["a red square"]}))
    images = [png_bytes((200, 0, 0)), png_bytes((0, 200, 0))]
    scores = model.predict(pd.DataFrame({"image": images, "text": ["a red square", "a"]}))
    from imtext.export.runtime import OnnxEncoders

    encoders = OnnxEncoders.load(stages.network_export)
    codes = encoders.embed_images([Image.open(io.BytesIO(b)) for b in images])
    text_codes = encoders.embed_texts(["a red square", "a"])
    np.testing.assert_allclose(scores[:, 0], (codes * text_codes) @ WEIGHTS, rtol=1e-5)
    assert not np.allclose(scores[:, 0], (codes * text_codes).sum(1))
    assert network.version == "2"


def test_load_champion_without_a_champion_says_so(cfg, stages):
    stages.register(cfg, 60.0)
    with pytest.raises(RegistryError, match="no version of 'imtext-test-model' holds alias"):
        load_champion(cfg.model_name, tracking_uri=cfg.tracking_uri)


# ---------------------------------------------------------------- an unreachable server


def test_unreachable_server_fails_fast_with_advice_and_changes_nothing(stages, workdir, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cfg = make_cfg(uri)
    stages.evaluation(60.0)
    before = snapshot(tmp_path)
    start = time.monotonic()
    with pytest.raises(RegistryUnavailableError) as caught:
        stages.register(cfg, 60.0)
    assert time.monotonic() - start < 30
    message = str(caught.value)
    assert uri in message and "did not answer (1 attempt(s))" in message
    assert "imtext register" in message and str(stages.train) in message
    assert "MLFLOW_TRACKING_URI" in message
    with pytest.raises(RegistryUnavailableError, match=uri):
        promote(cfg, 1)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- retries and provenance


def test_retry_settings_are_the_libraries_own_and_the_users_win(monkeypatch):
    cfg = make_cfg(None, retries=4, retry_backoff_s=0.5)
    assert retry_environment(cfg) == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # whole seconds in MLflow: rounded up
        "AWS_MAX_ATTEMPTS": "4",
        "AWS_RETRY_MODE": "standard",
    }
    for key in retry_environment(cfg):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "9")  # the user's choice stays
    with retry_settings(cfg):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
        assert os.environ["AWS_MAX_ATTEMPTS"] == "9"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["AWS_MAX_ATTEMPTS"] == "9"


def test_failures_are_translated_into_messages_that_name_the_uri():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    down = MlflowException("API request failed", error_code=INTERNAL_ERROR)
    refusal = MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST)
    assert is_unavailable(down) and is_unavailable(ConnectionError("refused"))
    assert not is_unavailable(refusal)
    with pytest.raises(RegistryUnavailableError, match="create the run: MLflow at http://h did"):
        with translated("create the run", "http://h", "start it"):
            raise down
    with pytest.raises(RegistryError, match="x: MLflow at http://h refused: no such model") as e:
        with translated("x", "http://h"):
            raise refusal
    assert not isinstance(e.value, RegistryUnavailableError)


def test_provenance_helpers(tmp_path, monkeypatch):
    assert flatten_params({"a": {"x": 1, "y": [1, 2], "z": None, "s": "t"}}) == {
        "a.x": "1",
        "a.y": "[1, 2]",
        "a.z": "null",
        "a.s": "t",
    }
    assert params_sha256({"b": 1, "a": 2}) == params_sha256({"a": 2, "b": 1})
    assert history_metrics([{"epoch": 3, "loss": 1.5, "note": "x"}], "t.") == [("t.loss", 1.5, 3)]

    dvc = tmp_path / "data.dvc"
    assert data_md5(dvc) is None and data_md5(None) is None
    dvc.write_text("outs:\n- md5: abc.dir\n  path: data\n- md5: def\n  path: extra\n")
    assert data_md5(dvc) == "data=abc.dir,extra=def"
    dvc.write_text("outs: [")
    with pytest.raises(ImtextError, match="not a readable DVC file"):
        data_md5(dvc)

    # No git on PATH (an image without it): the commit comes from the environment.
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("IMTEXT_GIT_COMMIT", "feedbeef")
    assert git_commit(tmp_path) == "feedbeef"
    monkeypatch.delenv("IMTEXT_GIT_COMMIT")
    assert git_commit(tmp_path) == "unknown"


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(make_cfg(None)) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(make_cfg(None)) == "http://env:5000"
    assert resolve_tracking_uri(make_cfg("http://cfg:5000")) == "http://cfg:5000"
    assert resolve_tracking_uri(make_cfg("http://cfg:5000"), "http://arg") == "http://arg"
    db = tmp_path / "m.db"
    assert local_artifact_root(f"sqlite:///{db}") == (tmp_path / "mlartifacts").as_uri()
    assert local_artifact_root("http://server:5000") is None
