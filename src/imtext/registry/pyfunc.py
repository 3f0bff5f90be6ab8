"""The registered model: the ONNX encoders of ``export`` as an MLflow pyfunc.

Serving loads ``models:/<model_name>@champion`` and calls ``predict`` on a table with the columns

* ``text``: captions (str) -> their text embeddings;
* ``image``: encoded PNG or JPEG files (bytes; base64 text also accepted, as JSON carries it)
  -> their image embeddings;
* both: one (image, caption) pair per row -> the model's score of each pair.

One column returns a float32 array of shape ``[rows, embed_dim]`` whose rows are L2-normalised (as
``imtext.export.runtime`` returns them), so image-text similarity is a dot product. Both columns
return ``[rows, 1]`` scores. The similarity network (``model.method: similarity``) has no
embedding: its versions answer pairs only (tag ``imtext.similarity: network``), and a one-column
request is rejected with a message saying so. A table with neither column is rejected.

The model holds the whole export directory (encoders, ``preprocess.json``, ``vocab.json``,
``parity.json``) as its artifact ``export``; at load time ``imtext.export.runtime.OnnxEncoders``
(onnxruntime, no torch) runs it. The imtext source is packed into the model (``code/imtext``) so a
serving environment built from the model's requirements alone can import it.

Trust: ``mlflow.pyfunc.load_model`` (and ``mlflow models serve``) imports that packed source and
runs the stored model file, so whoever can write to the artifact store could run code there.
:func:`load_verified` never does: it checks every file against :func:`model_digest` recorded at
registration, then builds the model from the *installed* imtext and the export's data files.
``imtext.registry.load_champion`` serves that way; see ``mlflow/README.md``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.metadata
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from mlflow.types import ColSpec, Schema, TensorSpec

_logger = logging.getLogger(__name__)

#: Name of the model's artifact holding the export directory.
EXPORT_ARTIFACT = "export"
TEXT_COLUMN = "text"
IMAGE_COLUMN = "image"
#: ``query_column`` of a table with both columns: score each row's (image, caption) pair.
PAIRS = "pairs"

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", TEXT_COLUMN, required=False),
            ColSpec("binary", IMAGE_COLUMN, required=False),
        ]
    ),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
)

#: Distributions the model needs at serving time (pinned to what is installed when it is logged).
SERVING_DISTRIBUTIONS = ("mlflow", "onnxruntime", "numpy", "pillow", "pandas", "pyyaml")


class ImtextEncoders(mlflow.pyfunc.PythonModel):
    """Text and image embeddings from imtext's ONNX encoders; see the module docstring."""

    def load_context(self, context: Any) -> None:
        # Imported here, not at module level: the runtime needs onnxruntime, which logging a model
        # does not, and it is the torch-free half of imtext.export.
        from imtext.export.runtime import OnnxEncoders

        self.encoders = OnnxEncoders.load(Path(context.artifacts[EXPORT_ARTIFACT]))

    # The DataFrame hint is one MLflow infers no schema from, so SIGNATURE alone checks the input.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> np.ndarray:
        """Answer one request; every failure reaches the client as a one-line message (MLflow's
        scoring server sends the stack trace of anything but an :class:`MlflowException`)."""
        from imtext.export.runtime import InputError

        try:
            return self.answer(as_table(model_input))
        except MlflowException:
            raise
        except InputError as exc:
            # A bad request (e.g. a caption without words) is the caller's to fix: a 400, not a 500.
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        except Exception as exc:
            # The trace stays in the server's log; the client learns only that the model failed.
            _logger.exception("imtext model: predict failed")
            raise MlflowException(
                f"the model failed on this request ({type(exc).__name__}); the server log has "
                "the details",
                error_code=INTERNAL_ERROR,
            ) from None

    def answer(self, table: pd.DataFrame) -> np.ndarray:
        """Embeddings or pair scores of a checked request table (see the module docstring)."""
        column = query_column(table)
        if column != PAIRS and not self.encoders.indexable:
            raise MlflowException.invalid_parameter_value(
                "this model is a similarity network: it scores (image, caption) pairs and has no "
                "embedding to return; send the columns 'image' and 'text' together, one pair per row"
            )
        size = self.encoders.spec.image.size
        if column in (PAIRS, IMAGE_COLUMN):
            # Each is decoded at reduced size before the next: the request never holds a large one.
            images = [decode_image(data, row, size) for row, data in enumerate(table[IMAGE_COLUMN])]
        if column == PAIRS:
            texts = [str(text) for text in table[TEXT_COLUMN]]
            return self.encoders.score_pairs(images, texts).astype(np.float32)[:, None]
        if column == TEXT_COLUMN:
            embeddings = self.encoders.embed_texts([str(text) for text in table[TEXT_COLUMN]])
        else:
            embeddings = self.encoders.embed_images(images)
        return np.asarray(embeddings, dtype=np.float32)


def as_table(model_input: Any) -> pd.DataFrame:
    """``model_input`` as a pandas DataFrame: a DataFrame, a dict of columns or a list of rows."""
    if isinstance(model_input, pd.DataFrame):
        return model_input
    try:
        return pd.DataFrame(model_input)
    except (ValueError, TypeError) as exc:
        raise MlflowException.invalid_parameter_value(
            f"expected a table with a 'text' or an 'image' column, got {type(model_input).__name__}"
            f" ({exc})"
        ) from None


def query_column(table: pd.DataFrame) -> str:
    """What the request asks: ``text`` or ``image`` embeddings, or :data:`PAIRS` scores."""
    present = [
        column
        for column in (TEXT_COLUMN, IMAGE_COLUMN)
        if column in table.columns and table[column].notna().any()
    ]
    if not present:
        raise MlflowException.invalid_parameter_value(
            "expected the column 'text' (captions), 'image' (PNG/JPEG bytes) or both (pairs to "
            f"score), got columns {list(table.columns)}"
        )
    for column in present:
        if table[column].isna().any():
            raise MlflowException.invalid_parameter_value(f"column {column!r} has empty rows")
    return present[0] if len(present) == 1 else PAIRS


def decode_image(data: Any, row: int, size: int) -> Any:
    """An RGB PIL image from encoded bytes (or their base64 text), for an encoder whose input is
    ``size`` x ``size``: pixel count checked from the header, large images decoded at reduced size
    (:func:`imtext.export.runtime.open_image`)."""
    from imtext.export.runtime import InputError, open_image

    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except binascii.Error:
            raise MlflowException.invalid_parameter_value(
                f"image row {row}: text that is not base64; send the encoded file's bytes"
            ) from None
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MlflowException.invalid_parameter_value(
            f"image row {row}: expected the bytes of a PNG or JPEG file, got {type(data).__name__}"
        )
    try:
        return open_image(bytes(data), size)
    except InputError as exc:
        raise MlflowException.invalid_parameter_value(f"image row {row}: {exc}") from None


def serving_requirements() -> list[str]:
    """Pinned pip requirements of the serving environment (the versions installed here)."""
    pins = []
    for name in SERVING_DISTRIBUTIONS:
        version = _installed_version(name)
        if version is not None:
            pins.append(f"{name}=={version}")
    if _installed_version("onnxruntime") is None and _installed_version("onnxruntime-gpu"):
        # GPU images install onnxruntime-gpu instead; it provides the same module.
        pins.append(f"onnxruntime-gpu=={_installed_version('onnxruntime-gpu')}")
    return pins


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def imtext_source_dir() -> Path:
    """The installed ``imtext`` package directory (packed into the model as code)."""
    import imtext

    return Path(imtext.__file__).resolve().parent


#: The model file MLflow runs to build the model at load time ("models from code"): the model is
#: this import, not a pickle, so loading it executes no serialized bytes.
MODEL_CODE = """\
import mlflow.models

from imtext.registry.pyfunc import ImtextEncoders

mlflow.models.set_model(ImtextEncoders())
"""


@contextmanager
def encoders_model(export_dir: Path) -> Iterator[dict[str, Any]]:
    """The arguments of ``mlflow.pyfunc.save_model`` / ``log_model`` that make the pyfunc model
    of ``export_dir``, valid within the block (the packed source is a temporary copy)."""
    with tempfile.TemporaryDirectory(prefix="imtext-code-") as tmp:
        code = Path(tmp) / "imtext"
        # Bytecode caches are machine-specific noise in a model's artifacts.
        shutil.copytree(imtext_source_dir(), code, ignore=shutil.ignore_patterns("__pycache__"))
        model_file = Path(tmp) / "imtext_encoders.py"
        model_file.write_text(MODEL_CODE, encoding="utf-8")
        with warnings.catch_warnings():
            # An input example would make MLflow run the encoders while logging; SIGNATURE states
            # the input instead, so its advice to add one is noise here.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            yield {
                "python_model": str(model_file),
                "artifacts": {EXPORT_ARTIFACT: str(export_dir)},
                "code_paths": [str(code)],
                "signature": SIGNATURE,
                "pip_requirements": serving_requirements(),
            }


def save_encoders_model(export_dir: Path, path: Path, mlflow_model: Model | None = None) -> None:
    """Write the pyfunc model of ``export_dir`` to the new directory ``path``."""
    with encoders_model(export_dir) as arguments:
        mlflow.pyfunc.save_model(path=str(path), mlflow_model=mlflow_model, **arguments)


def model_digest(path: Path) -> str:
    """sha256 over every file under ``path``: each file's path relative to it and the sha256 of
    its bytes, in sorted order. Equal for a model directory and its download; a changed, added,
    removed or renamed file changes it. A symbolic link counts as its target path, never followed.
    """
    path = Path(path)
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*"), key=lambda p: p.relative_to(path).as_posix()):
        name = item.relative_to(path).as_posix()
        if item.is_symlink():
            content = b"symlink:" + str(item.readlink()).encode()
        elif item.is_file():
            content = _file_sha256(item).encode()
        else:
            continue
        digest.update(name.encode() + b"\0" + content + b"\n")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class InstalledModel:
    """The pyfunc implementation :func:`load_verified` builds: an :class:`ImtextEncoders` from the
    installed imtext, with the artifacts of a downloaded model as its context."""

    def __init__(self, python_model: ImtextEncoders, context: Any) -> None:
        # ``python_model`` is the attribute PyFuncModel.unwrap_python_model reads.
        self.python_model, self.context = python_model, context

    def predict(self, data: Any, params: dict | None = None) -> np.ndarray:
        return self.python_model.predict(self.context, data, params)


def load_verified(path: Path, expected_digest: str) -> mlflow.pyfunc.PyFuncModel:
    """The pyfunc model in the downloaded directory ``path``, run by the installed imtext.

    Raises :class:`ValueError` when the files under ``path`` do not hash to ``expected_digest``
    (they changed after registration). Nothing under ``path`` is imported or executed: only
    ``MLmodel`` (YAML, for the signature) and the export's ONNX and JSON files are read.
    """
    from mlflow.pyfunc import PyFuncModel, PythonModelContext

    path = Path(path)
    found = model_digest(path)
    if found != expected_digest:
        raise ValueError(
            f"{path}: its files hash to {found}, not to {expected_digest} recorded at "
            "registration, so they changed in the artifact store: do not serve them; find out who "
            "wrote them, then register a trusted export again"
        )
    meta = Model.load(str(path / "MLmodel"))
    recorded = meta.flavors.get("python_function", {}).get("artifacts", {}).get(EXPORT_ARTIFACT)
    relative = (recorded or {}).get("path") if isinstance(recorded, dict) else None
    # MLflow names the folder after the export directory it copied; it must stay inside the model.
    export = (path / str(relative)).resolve()
    if not relative or not export.is_relative_to(path.resolve()) or not export.is_dir():
        raise ValueError(
            f"{path}: not an imtext encoders model (MLmodel names no export folder inside it); "
            "register the export with `imtext register`"
        )
    context = PythonModelContext(artifacts={EXPORT_ARTIFACT: str(export)}, model_config={})
    python_model = ImtextEncoders()
    python_model.load_context(context)
    return PyFuncModel(model_meta=meta, model_impl=InstalledModel(python_model, context))
