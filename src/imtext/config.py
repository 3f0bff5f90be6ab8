"""One typed configuration per stage, read strictly from ``params.yaml``.

Each stage owns a frozen dataclass; ``params.yaml`` has one section per stage whose keys are exactly
that dataclass's fields. Unknown keys, missing keys and values of the wrong type are errors that name
the section and key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from imtext.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of the ``prepare`` stage (annotations + images -> prepared splits)."""

    #: Encoded caption length in tokens; ``null`` picks the format's default
    #: (32 for Karpathy JSON, 56 for CUHK-PEDES, as in the Dual-Path paper).
    max_len: int | None
    #: A word enters the vocabulary when it occurs at least this often in the *training* split.
    min_count: int
    #: Keep at most this many captions per image (COCO protocol: 5); ``null`` keeps all.
    captions_per_image: int | None
    #: Treat Karpathy ``restval`` images as training images (the usual 113,287-image COCO train set).
    use_restval: bool
    #: Images whose shorter side is longer are downscaled to it (the paper stores short side 256).
    image_short_side: int
    #: Encoding of the stored images: ``png`` (lossless) or ``jpeg`` (quality 95, for photographs).
    image_format: Literal["png", "jpeg"]
    #: Threads decoding and re-encoding images (Pillow releases the GIL while it does so).
    workers: int

    def __post_init__(self) -> None:
        for name in ("max_len", "min_count", "captions_per_image", "image_short_side", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"prepare.{name}: must be at least 1, got {value}")


STAGE_CONFIGS: dict[str, type] = {"prepare": PrepareConfig}


def read_params(path: str | Path) -> dict[str, Any]:
    """Read ``params.yaml`` into a dict of sections, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: parameter file not found; pass --params with the path to params.yaml"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        params = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections at the top level")
    return params


def config_from_dict(cls: type[T], values: Any, where: str) -> T:
    """Build the frozen dataclass ``cls`` from ``values``, rejecting unknown, missing or mistyped keys.

    ``where`` names the source in messages, e.g. ``"params.yaml: prepare"``.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; valid keys are {', '.join(sorted(fields))}"
        )
    missing = [name for name in fields if name not in values]
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}; add it to the section")
    hints = typing.get_type_hints(cls)
    checked = {name: _check_type(values[name], hints[name], f"{where}.{name}") for name in fields}
    return cls(**checked)


def load_stage_config(stage: str, params_path: str | Path) -> Any:
    """Load the typed config of ``stage`` from its section of ``params_path``."""
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_CONFIGS)}")
    params = read_params(params_path)
    if stage not in params:
        raise ConfigError(f"{params_path}: missing section {stage!r}")
    return config_from_dict(STAGE_CONFIGS[stage], params[stage], f"{params_path}: {stage}")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-JSON form of a stage config (for checkpoints, metadata and MLflow params)."""
    return dataclasses.asdict(cfg)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not valid")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return origin(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a bug in a dataclass
