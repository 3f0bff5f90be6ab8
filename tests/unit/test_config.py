from __future__ import annotations

import dataclasses

import pytest
import yaml

from imtext.config import (
    STAGE_CONFIGS,
    PrepareConfig,
    config_from_dict,
    load_stage_config,
    read_params,
)
from imtext.errors import ConfigError
from tests.conftest import DEFAULT_PREPARE, REPO, write_params


def test_repository_params_load_for_every_stage():
    for stage, cls in STAGE_CONFIGS.items():
        assert isinstance(load_stage_config(stage, REPO / "params.yaml"), cls)


def test_params_yaml_and_dvc_yaml_agree_with_the_dataclasses():
    params = read_params(REPO / "params.yaml")
    assert set(params) == set(STAGE_CONFIGS)
    for stage, cls in STAGE_CONFIGS.items():
        assert set(params[stage]) == {f.name for f in dataclasses.fields(cls)}
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        assert name in STAGE_CONFIGS, f"dvc stage {name} has no config dataclass"
        assert name in stage["params"] and set(stage["params"]) <= set(STAGE_CONFIGS)
        assert f"imtext {name} " in stage["cmd"]


def test_values_are_typed(tmp_path):
    cfg = load_stage_config("prepare", write_params(tmp_path / "p.yaml", max_len=40))
    assert cfg == dataclasses.replace(DEFAULT_PREPARE, max_len=40)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"min_count": "2"}, "prepare.min_count: expected an integer"),
        ({"use_restval": 1}, "prepare.use_restval: expected true or false"),
        ({"min_count": True}, "prepare.min_count: expected an integer"),
        ({"image_format": "gif"}, "prepare.image_format: 'gif' is not one of 'png', 'jpeg'"),
        ({"max_len": 0}, "prepare.max_len: must be at least 1"),
        ({"workers": 2.5}, "prepare.workers: expected an integer"),
    ],
)
def test_wrong_values_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", "'")):
        load_stage_config("prepare", write_params(tmp_path / "p.yaml", **overrides))


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'min_cout'"):
        load_stage_config("prepare", write_params(tmp_path / "p.yaml", min_cout=3))


def test_missing_key_is_named():
    values = dataclasses.asdict(DEFAULT_PREPARE)
    del values["workers"]
    with pytest.raises(ConfigError, match="missing key 'workers'"):
        config_from_dict(PrepareConfig, values, "params.yaml: prepare")


def test_missing_section_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="parameter file not found"):
        load_stage_config("prepare", tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("other: {}\n")
    with pytest.raises(ConfigError, match="missing section 'prepare'"):
        load_stage_config("prepare", tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("prepare: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_stage_config("prepare", tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping of stage sections"):
        read_params(tmp_path / "list.yaml")


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_PREPARE.min_count = 3  # type: ignore[misc]


def test_overrides_are_parsed_as_yaml_and_checked():
    from imtext.config import apply_overrides, stage_config_from_params

    params = read_params(REPO / "params.yaml")
    changed = apply_overrides(
        params, ["finetune.epochs=2", "evaluate.split=val", "model.word2vec=null"]
    )
    assert changed["finetune"]["epochs"] == 2 and params["finetune"]["epochs"] != 2
    assert stage_config_from_params("evaluate", changed).split == "val"
    assert changed["model"]["word2vec"] is None
    for bad, message in [
        ("finetune.epoch=2", "no key 'epoch' in section 'finetune'"),
        ("train.epochs=2", "no section 'train'"),
        ("epochs=2", "expected section.key=value"),
        ("finetune.epochs", "expected section.key=value"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(params, [bad])
    with pytest.raises(ConfigError, match=r"finetune\.epochs: expected an integer"):
        stage_config_from_params("finetune", apply_overrides(params, ["finetune.epochs=two"]))


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN"])
@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("finetune", "lr"),
        ("register", "gate_min_delta"),
        ("model", "dropout"),
        ("export", "parity_tolerance"),
    ],
)
def test_non_finite_floats_are_refused_naming_the_setting(section, key, text):
    from imtext.config import apply_overrides, stage_config_from_params

    params = apply_overrides(read_params(REPO / "params.yaml"), [f"{section}.{key}={text}"])
    with pytest.raises(
        ConfigError, match=rf"params.yaml: {section}\.{key}: expected a finite number"
    ):
        stage_config_from_params(section, params, "params.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # The former boolean: an error that lists the values, not a silent guess at a method.
        ("export.quantize=true", "export.quantize: True is not one of 'static', 'dynamic', 'none'"),
        ("export.quantize=int8", "export.quantize: 'int8' is not one of"),
        ("export.calibration_images=0", "export.calibration_images: must be at least 1, got 0"),
    ],
)
def test_export_quantization_settings_are_checked(override, message):
    from imtext.config import apply_overrides, stage_config_from_params

    params = apply_overrides(read_params(REPO / "params.yaml"), [override])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        stage_config_from_params("export", params, "params.yaml")
    cfg = stage_config_from_params("export", read_params(REPO / "params.yaml"))
    assert (cfg.quantize, cfg.calibration_images) == ("static", 512)
