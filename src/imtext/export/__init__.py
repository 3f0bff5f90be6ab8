"""The ``export`` stage: ONNX encoders of a trained model, verified against PyTorch.

``imtext.export.stage`` runs the stage: ``imtext.export.onnx`` writes the encoders and
``imtext.export.verify`` checks them (torch, onnx); ``imtext.export.runtime`` embeds raw images and
sentences with them (numpy, PIL, onnxruntime, no torch). Names are resolved lazily so that
importing the runtime, which serving does, never imports torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OnnxEncoders", "export"]


def __getattr__(name: str) -> Any:
    if name == "export":
        from imtext.export.stage import export

        return export
    if name == "OnnxEncoders":
        from imtext.export.runtime import OnnxEncoders

        return OnnxEncoders
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
