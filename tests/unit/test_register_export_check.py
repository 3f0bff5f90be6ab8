"""``register`` checks the export itself before creating a version: parity.json is only a claim.

The tracking URI of these tests is a port nothing listens on: every refusal happens before any
request, so no version can have been created.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from imtext.errors import ImtextError
from imtext.registry.export_check import verify_export
from tests.unit.test_registry import Stages, make_cfg, parity_report, write_onnx_encoders

NOWHERE = "http://127.0.0.1:9"


@pytest.fixture
def stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Stages:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMTEXT_GIT_COMMIT", "0" * 40)
    return Stages(tmp_path / "stages")


def register_refused(stages: Stages, export_dir: Path) -> str:
    """The message of the ImtextError that registering ``export_dir`` raises."""
    stages.export = export_dir
    with pytest.raises(ImtextError) as error:
        stages.register(make_cfg(NOWHERE), 60.0)
    return str(error.value)


def test_the_stand_in_exports_pass(stages):
    verify_export(stages.export)
    verify_export(stages.network_export)


def test_junk_onnx_with_a_hand_written_passed_is_refused_naming_parity_json(stages):
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        (stages.export / name).write_bytes(b"not a model at all")
    (stages.export / "parity.json").write_text(json.dumps({"passed": True}))
    message = register_refused(stages, stages.export)
    assert f"{stages.export / 'parity.json'}: not the report `imtext export` writes" in message
    assert "run `imtext export` again" in message


def test_junk_onnx_with_a_copied_report_is_refused_naming_the_onnx_file(stages):
    (stages.export / "image_encoder.onnx").write_bytes(b"\x08\x07junk")
    message = register_refused(stages, stages.export)
    assert f"{stages.export / 'image_encoder.onnx'}: onnxruntime cannot load it" in message


def test_a_truncated_encoder_is_refused(stages):
    path = stages.export / "text_encoder.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert f"{path}: onnxruntime cannot load it" in register_refused(stages, stages.export)


def test_an_encoder_with_the_right_signature_but_a_constant_output_is_refused(stages):
    import onnx
    from onnx import numpy_helper

    path = stages.export / "text_encoder.onnx"
    model = onnx.load(path)
    (words,) = [t for t in model.graph.initializer if t.name == "words"]
    table = numpy_helper.to_array(words)
    words.CopyFrom(numpy_helper.from_array(np.tile(table[:1], (len(table), 1)), "words"))
    onnx.save(model, path)
    message = register_refused(stages, stages.export)
    assert f"{path}: the same output for different inputs on 4 probe inputs" in message


def test_a_report_that_contradicts_itself_or_another_export_is_refused(stages):
    parity = stages.export / "parity.json"
    report = parity_report()
    report["parity"]["text"]["max_abs_diff"] = 0.5  # above the tolerance, yet "passed"
    parity.write_text(json.dumps(report))
    assert "parity.text.max_abs_diff 0.5 is not a number within" in register_refused(
        stages, stages.export
    )
    parity.write_text(json.dumps(parity_report(network=True)))  # the other export's report
    assert "records similarity 'network' but" in register_refused(stages, stages.export)
    report = parity_report()
    report["parity"]["tolerance"] = float("nan")
    parity.write_text(json.dumps(report))
    assert "parity.tolerance nan is not a positive number" in register_refused(
        stages, stages.export
    )


def test_a_dot_export_whose_pair_scorer_is_not_a_dot_product_is_refused(stages, tmp_path):
    relabelled = write_onnx_encoders(tmp_path / "relabelled", network=True)
    spec = json.loads((relabelled / "preprocess.json").read_text())
    spec["similarity"] = "dot"
    (relabelled / "preprocess.json").write_text(json.dumps(spec))
    (relabelled / "parity.json").write_text(json.dumps(parity_report(network=False)))
    message = register_refused(stages, relabelled)
    assert f"{relabelled / 'pair_scorer.onnx'}: scores differ from the dot products" in message
    shutil.rmtree(relabelled)
