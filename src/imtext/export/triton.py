"""A Triton model repository of an export directory: what KServe's Triton runtime serves.

    python -m imtext.export.triton EXPORT_DIR OUT_DIR --version N [--int8]

writes

    OUT_DIR/text_encoder/config.pbtxt       tokens int64 [L] -> embeddings float32 [D]
    OUT_DIR/text_encoder/N/model.onnx
    OUT_DIR/text_encoder/preprocess.json    how a sentence becomes `tokens` (with vocab.json)
    OUT_DIR/text_encoder/vocab.json
    OUT_DIR/image_encoder/config.pbtxt      images float32 [3, S, S] -> embeddings float32 [D]
    OUT_DIR/image_encoder/N/model.onnx
    OUT_DIR/image_encoder/preprocess.json   how an image becomes `images`

N is the registered model version, so Triton's model metadata (``GET /v2/models/text_encoder``)
and every infer response (``model_version``) name the version that answered, as ``imtext serve``
does. Both encoders go into one repository, served by one InferenceService (k8s/kserve/): a text
embedding and an image embedding are comparable only when both come from the same version, and one
repository rolls forward as a whole.

The configurations are written rather than left to Triton's auto-completion so that the batch
limit is ours and the shapes are checked here, against the ONNX graph as ONNX Runtime reads it
(Triton runs it with ONNX Runtime too): the first dimension of every input and output must be the
dynamic batch, the others must agree with ``preprocess.json``. Triton ignores the JSON files and
``.imtext-output``; clients read the JSON files to tokenize and preprocess as the export does.

Only embedding models (``similarity: dot``) are accepted: a similarity network's encoders output
codes that only its pair scorer turns into a score, which this repository does not serve.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imtext._fs import atomic_directory
from imtext.errors import ImtextError
from imtext.export.runtime import (
    CPU,
    DOT,
    PREPROCESS_FILE,
    ExportSpec,
    InputError,
    check_verified,
    make_session,
)

TEXT_MODEL = "text_encoder"
IMAGE_MODEL = "image_encoder"
#: The file name Triton's ONNX Runtime backend loads from a version directory.
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"
#: The largest batch Triton forms (dynamic batching) or accepts in one request.
DEFAULT_MAX_BATCH = 64
#: ONNX Runtime tensor types -> Triton data types, for the types the encoders use.
TRITON_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}


@dataclass(frozen=True)
class Tensor:
    """One input or output of a Triton model: its dims exclude the batch dimension."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def config_pbtxt(
    name: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor], max_batch: int
) -> str:
    """The text of a Triton ``config.pbtxt`` for an ONNX model whose first dimension is the batch."""

    def tensors(kind: str, items: Sequence[Tensor]) -> list[str]:
        lines = [f"{kind} ["]
        for i, t in enumerate(items):
            dims = ", ".join(str(d) for d in t.dims)
            comma = "," if i < len(items) - 1 else ""
            lines += [
                "  {",
                f'    name: "{t.name}"',
                f"    data_type: {t.data_type}",
                f"    dims: [ {dims} ]",
                "  }" + comma,
            ]
        return lines + ["]"]

    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch}",
        *tensors("input", inputs),
        *tensors("output", outputs),
        # Concurrent requests are merged into one run of up to max_batch_size rows.
        "dynamic_batching { }",
    ]
    return "\n".join(lines) + "\n"


def batched_dims(shape: Sequence[object], expected: tuple[int, ...], where: str) -> tuple[int, ...]:
    """The dims Triton is told for a tensor of ONNX ``shape`` (batch first): ``expected``, after
    checking that the batch dimension is dynamic and every fixed dimension equals ``expected``'s."""
    if not shape or isinstance(shape[0], int):
        raise ImtextError(
            f"{where}: shape {list(shape)} has no dynamic batch dimension first, which Triton's "
            "batching needs; export the model again with imtext export"
        )
    rest = tuple(shape[1:])
    if len(rest) != len(expected) or any(
        isinstance(d, int) and d != e for d, e in zip(rest, expected, strict=True)
    ):
        raise ImtextError(
            f"{where}: shape {list(shape)} does not match [batch, {', '.join(map(str, expected))}] "
            f"from {PREPROCESS_FILE}; the export is inconsistent, export the model again"
        )
    return expected


def model_tensors(path: Path, spec: ExportSpec, expected: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(input, output) of the encoder ``path`` as ONNX Runtime reads it, with Triton's dims."""
    try:
        session = make_session(path, [CPU], threads=1)
    except Exception as exc:  # onnxruntime raises its own types for a missing or corrupt file
        raise ImtextError(f"{path}: ONNX Runtime cannot load it ({exc}); export again") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1 or outputs[0].name != spec.output:
        raise ImtextError(
            f"{path}: expected one input and the output {spec.output!r}, got inputs "
            f"{[i.name for i in inputs]} and outputs {[o.name for o in outputs]}"
        )
    tensors = []
    for tensor, dims in ((inputs[0], expected), (outputs[0], (spec.embed_dim,))):
        if tensor.type not in TRITON_TYPES:
            raise ImtextError(f"{path}: {tensor.name} has type {tensor.type}, not an encoder's")
        where = f"{path}: {tensor.name}"
        tensors.append(
            Tensor(tensor.name, TRITON_TYPES[tensor.type], batched_dims(tensor.shape, dims, where))
        )
    return tensors[0], tensors[1]


def write_triton_repository(
    export_dir: Path,
    out_dir: Path,
    *,
    version: int,
    int8: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, Path]:
    """Write the Triton repository of the verified ``export_dir`` to ``out_dir`` (replaced only if
    new, empty or imtext's own; see the module docstring for the layout). ``int8`` serves the
    INT8 encoders (``export.quantize``: static or dynamic). Returns each model's directory by name."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ImtextError(f"version: Triton versions are positive integers, got {version!r}")
    if max_batch < 1:
        raise ImtextError(f"max_batch: must be at least 1, got {max_batch}")
    try:
        check_verified(export_dir / "parity.json")
        spec = ExportSpec.read(export_dir / PREPROCESS_FILE)
    except InputError as exc:
        raise ImtextError(str(exc)) from None
    if spec.similarity != DOT:
        raise ImtextError(
            f"{export_dir}: a similarity network (similarity {spec.similarity!r}) has no "
            "embeddings to serve; only its pair scorer gives a score, which Triton is not set up "
            "to serve here: serve it with imtext serve"
        )
    if int8 and not spec.int8:
        raise ImtextError(f"{export_dir}: no INT8 encoders; export with export.quantize: static")
    size = spec.image.size
    models = {
        TEXT_MODEL: (
            spec.int8["text_encoder"] if int8 else spec.text.encoder,
            (spec.text.max_len,),
            [PREPROCESS_FILE, spec.text.vocabulary],
        ),
        IMAGE_MODEL: (
            spec.int8["image_encoder"] if int8 else spec.image.encoder,
            (3, size, size),
            [PREPROCESS_FILE],
        ),
    }
    for onnx_file, _, extras in models.values():
        for file in [onnx_file, *extras]:
            if not (export_dir / file).is_file():
                raise ImtextError(f"{export_dir / file}: not found; is {export_dir} an export?")
    with atomic_directory(out_dir, inputs=[export_dir]) as tmp:
        for name, (onnx_file, dims, extras) in models.items():
            source = export_dir / onnx_file
            tensor_in, tensor_out = model_tensors(source, spec, dims)
            (tmp / name / str(version)).mkdir(parents=True)
            shutil.copyfile(source, tmp / name / str(version) / MODEL_FILE)
            for file in extras:
                shutil.copyfile(export_dir / file, tmp / name / file)
            (tmp / name / CONFIG_FILE).write_text(
                config_pbtxt(name, [tensor_in], [tensor_out], max_batch), encoding="utf-8"
            )
    return {name: out_dir / name for name in models}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imtext.export.triton",
        description="Write the Triton model repository (text_encoder, image_encoder) of an export.",
    )
    parser.add_argument("export_dir", type=Path, help="output directory of imtext export")
    parser.add_argument("out_dir", type=Path, help="the repository to write (new or imtext's own)")
    parser.add_argument(
        "--version", type=int, required=True, help="registered model version: Triton's version"
    )
    parser.add_argument("--int8", action="store_true", help="serve the INT8 encoders (CPU)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    args = parser.parse_args(argv)
    try:
        written = write_triton_repository(
            args.export_dir,
            args.out_dir,
            version=args.version,
            int8=args.int8,
            max_batch=args.max_batch,
        )
    except ImtextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name}: {path}/{args.version}/{MODEL_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
