"""The Triton model repository of an export (k8s/kserve/ serves it with KServe's Triton runtime).

No Triton here: ``config.pbtxt`` is parsed with protobuf's own text-format parser against the
fields of Triton's ``ModelConfig`` that it uses (names and enum values as in Triton's
model_config.proto), and each ``model.onnx`` is run by ONNX Runtime (Triton's ONNX backend) with
a batch shaped as the configuration says.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from imtext.errors import ImtextError
from imtext.export.runtime import CPU, OnnxEncoders, encode_text, make_session
from imtext.export.triton import (
    CONFIG_FILE,
    IMAGE_MODEL,
    MODEL_FILE,
    TEXT_MODEL,
    main,
    write_triton_repository,
)
from tests.unit.test_registry import EMBED_DIM, IMAGE_SIZE, MAX_LEN, VOCAB, write_onnx_encoders

#: Triton's DataType enum (model_config.proto), in its order.
DATA_TYPES = (
    "TYPE_INVALID TYPE_BOOL TYPE_UINT8 TYPE_UINT16 TYPE_UINT32 TYPE_UINT64 TYPE_INT8 TYPE_INT16 "
    "TYPE_INT32 TYPE_INT64 TYPE_FP16 TYPE_FP32 TYPE_FP64 TYPE_STRING TYPE_BF16"
).split()
NUMPY_TYPES = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64}


def model_config_class():
    """A protobuf message class with the ModelConfig fields our configs use, so that protobuf's
    text-format parser rejects a syntax error, an unknown field or an unknown data type."""
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="triton_subset.proto", package="inference")
    file.enum_type.add(name="DataType").value.extend(
        descriptor_pb2.EnumValueDescriptorProto(name=n, number=i) for i, n in enumerate(DATA_TYPES)
    )

    def message(name, fields):
        m = file.message_type.add(name=name)
        for number, (field, kind, label, type_name) in enumerate(fields, start=1):
            m.field.add(name=field, number=number, type=kind, label=label, type_name=type_name)

    one, many = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    tensor = [
        ("name", f.TYPE_STRING, one, None),
        ("data_type", f.TYPE_ENUM, one, ".inference.DataType"),
        ("dims", f.TYPE_INT64, many, None),
    ]
    message("ModelInput", tensor)
    message("ModelOutput", tensor)
    message("ModelDynamicBatching", [])
    message(
        "ModelConfig",
        [
            ("name", f.TYPE_STRING, one, None),
            ("platform", f.TYPE_STRING, one, None),
            ("backend", f.TYPE_STRING, one, None),
            ("max_batch_size", f.TYPE_INT32, one, None),
            ("input", f.TYPE_MESSAGE, many, ".inference.ModelInput"),
            ("output", f.TYPE_MESSAGE, many, ".inference.ModelOutput"),
            ("dynamic_batching", f.TYPE_MESSAGE, one, ".inference.ModelDynamicBatching"),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


ModelConfig = model_config_class()


def read_config(path):
    return text_format.Parse(path.read_text(), ModelConfig())


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_onnx_encoders(tmp_path_factory.mktemp("triton") / "export")


def test_the_config_parser_rejects_what_triton_would():
    """Guards the tests below: the parser is strict."""
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "x"\nmax_batch: 4\n', ModelConfig())  # unknown field
    with pytest.raises(text_format.ParseError):
        text_format.Parse('input [ { name: "x" data_type: TYPE_FLOAT } ]', ModelConfig())
    with pytest.raises(text_format.ParseError):
        text_format.Parse('input [ { name: "x" dims: [ 3, 4 } ]', ModelConfig())


def test_repository_layout_and_configs_match_the_onnx_models(export, tmp_path):
    repo = tmp_path / "repo"
    written = write_triton_repository(export, repo, version=7, max_batch=16)
    assert written == {TEXT_MODEL: repo / TEXT_MODEL, IMAGE_MODEL: repo / IMAGE_MODEL}
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == [IMAGE_MODEL, TEXT_MODEL]
    expected_dims = {TEXT_MODEL: [MAX_LEN], IMAGE_MODEL: [3, IMAGE_SIZE, IMAGE_SIZE]}
    for name, source in ((TEXT_MODEL, "text_encoder.onnx"), (IMAGE_MODEL, "image_encoder.onnx")):
        model_dir = repo / name
        # Triton reads numeric subdirectories as versions: exactly one, the registry's.
        assert [p.name for p in model_dir.iterdir() if p.is_dir()] == ["7"]
        onnx_path = model_dir / "7" / MODEL_FILE
        assert onnx_path.read_bytes() == (export / source).read_bytes()
        config = read_config(model_dir / CONFIG_FILE)
        assert config.name == name and config.backend == "onnxruntime"
        assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
        (tensor_in,) = config.input
        (tensor_out,) = config.output
        assert list(tensor_in.dims) == expected_dims[name]
        assert list(tensor_out.dims) == [EMBED_DIM]
        # What Triton's ONNX backend would do with a full batch shaped as the config says.
        session = make_session(onnx_path, [CPU], threads=1)
        assert [i.name for i in session.get_inputs()] == [tensor_in.name]
        in_type = DATA_TYPES[tensor_in.data_type]
        out_type = DATA_TYPES[tensor_out.data_type]
        batch = np.ones((config.max_batch_size, *tensor_in.dims), dtype=NUMPY_TYPES[in_type])
        (result,) = session.run([tensor_out.name], {tensor_in.name: batch})
        assert result.shape == (config.max_batch_size, *tensor_out.dims)
        assert result.dtype == NUMPY_TYPES[out_type]
    # Clients preprocess as the export says: its files travel with the models.
    assert json.loads((repo / TEXT_MODEL / "vocab.json").read_text())["words"] == VOCAB
    for name in (TEXT_MODEL, IMAGE_MODEL):
        assert (repo / name / "preprocess.json").read_bytes() == (
            export / "preprocess.json"
        ).read_bytes()


def test_triton_embeddings_equal_the_exports(export, tmp_path):
    """The repository's models, fed as a Triton client would, embed as OnnxEncoders does."""
    repo = tmp_path / "repo"
    write_triton_repository(export, repo, version=1)
    encoders = OnnxEncoders.load(export, providers=[CPU])
    texts = ["a red square", "grey circle"]
    tokens = np.stack([encode_text(t, encoders.vocab, encoders.spec.text) for t in texts])
    session = make_session(repo / TEXT_MODEL / "1" / MODEL_FILE, [CPU], threads=1)
    (served,) = session.run(["embeddings"], {"tokens": tokens})
    np.testing.assert_allclose(served, encoders.embed_texts(texts), rtol=1e-6, atol=1e-6)


def test_rewriting_replaces_its_own_repository_but_never_a_foreign_directory(export, tmp_path):
    repo = tmp_path / "repo"
    write_triton_repository(export, repo, version=1)
    write_triton_repository(export, repo, version=2)
    assert [p.name for p in (repo / TEXT_MODEL).iterdir() if p.is_dir()] == ["2"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ImtextError, match="not written by imtext"):
        write_triton_repository(export, foreign, version=1)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(ImtextError, match="an input of this run"):
        write_triton_repository(export, export.parent, version=1)


@pytest.mark.parametrize("version", [0, -1, True, "3"])
def test_a_version_must_be_a_positive_integer(export, tmp_path, version):
    with pytest.raises(ImtextError, match="positive integers"):
        write_triton_repository(export, tmp_path / "repo", version=version)
    assert not (tmp_path / "repo").exists()


def test_a_similarity_network_is_refused(tmp_path):
    network = write_onnx_encoders(tmp_path / "network", network=True)
    with pytest.raises(ImtextError, match="no embeddings to serve"):
        write_triton_repository(network, tmp_path / "repo", version=1)


def test_an_unverified_export_or_missing_int8_is_refused(export, tmp_path):
    with pytest.raises(ImtextError, match="no INT8 encoders"):
        write_triton_repository(export, tmp_path / "repo", version=1, int8=True)
    failed = write_onnx_encoders(tmp_path / "failed")
    report = json.loads((failed / "parity.json").read_text())
    report.update(passed=False, failures=["text parity 0.1 > 1e-4"])
    (failed / "parity.json").write_text(json.dumps(report))
    with pytest.raises(ImtextError, match="text parity 0.1"):
        write_triton_repository(failed, tmp_path / "repo", version=1)


def rewrite_input_shape(path, dims):
    """Give the ONNX model at ``path`` the input shape ``dims`` (ints fixed, strings symbolic)."""
    import onnx

    model = onnx.load(path)
    shape = model.graph.input[0].type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add(**({"dim_value": d} if isinstance(d, int) else {"dim_param": d}))
    onnx.save(model, path)


def test_a_fixed_batch_or_a_shape_unlike_preprocess_json_is_refused(tmp_path):
    fixed_batch = write_onnx_encoders(tmp_path / "fixed")
    rewrite_input_shape(fixed_batch / "text_encoder.onnx", [1, MAX_LEN])
    with pytest.raises(ImtextError, match="no dynamic batch dimension"):
        write_triton_repository(fixed_batch, tmp_path / "repo", version=1)
    wrong_size = write_onnx_encoders(tmp_path / "wrong")
    rewrite_input_shape(wrong_size / "image_encoder.onnx", ["N", 3, IMAGE_SIZE * 2, "W"])
    with pytest.raises(ImtextError, match=r"does not match \[batch, 3, 16, 16\]"):
        write_triton_repository(wrong_size, tmp_path / "repo", version=1)
    assert not (tmp_path / "repo").exists()


def test_the_command_line(export, tmp_path, capsys):
    assert main([str(export), str(tmp_path / "repo"), "--version", "3"]) == 0
    assert (
        f"{TEXT_MODEL}: {tmp_path / 'repo' / TEXT_MODEL}/3/{MODEL_FILE}" in capsys.readouterr().out
    )
    assert main([str(tmp_path / "nothing"), str(tmp_path / "repo2"), "--version", "3"]) == 1
    assert "error:" in capsys.readouterr().err
    # No torch: the serving image and KServe tooling may run it without the training stack.
    code = "import sys, imtext.export.triton; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
