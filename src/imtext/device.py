"""The one place a ``--device`` string becomes a torch device.

Training, evaluation and any other stage that runs torch take ``device`` as a string argument
(library code never picks hardware on its own); this turns it into a ``torch.device`` or a clear
error. A top-level module beside ``config`` and ``errors``: every layer that runs torch may use it
without importing another layer.
"""

from __future__ import annotations

import torch

from imtext.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise any torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"--device: {name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device
