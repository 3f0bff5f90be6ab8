"""Instance loss: every training image (or CUHK-PEDES identity) is a class of one shared classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def instance_loss(
    image_logits: Tensor, text_logits: Tensor, labels: Tensor, text_labels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of both branches against the instance labels, returned as two terms.

    ``image_logits`` and ``text_logits`` are (B, C): the outputs of ONE classifier whose weights are
    shared by the image and text branches (the sharing lives in the model). They are raw logits: no
    L2 normalisation, no temperature. ``labels`` is (B,) integer: the instance class of row ``b`` of
    both tensors (the image index, or the person identity for CUHK-PEDES; all captions of an image
    carry its label). ``text_labels`` (B,), when given, labels the text rows instead: in Stage II
    half of the texts are mined negatives, each labelled by its own image's class. Returns ``(image_term, text_term)``, each the mean cross-entropy over the
    batch, kept apart so that Stage II can weight and log them separately.

    Worked example (B = 2, C = 2, labels = [0, 1])::

        image_logits = [[2, 0], [0, 0]]
            row 0: -log(e^2 / (e^2 + 1)) = log(1 + e^-2) = 0.126928
            row 1: -log(1 / 2)           = log 2         = 0.693147
            image_term = (0.126928 + 0.693147) / 2       = 0.410038
        text_logits = [[0, 0], [0, log 3]]
            row 0: log 2                                  = 0.693147
            row 1: -log(3 / (1 + 3)) = log(4 / 3)         = 0.287682
            text_term = (0.693147 + 0.287682) / 2         = 0.490415
    """
    if image_logits.ndim != 2:
        raise ValueError(f"image_logits must be (B, C), got shape {tuple(image_logits.shape)}")
    if text_logits.shape != image_logits.shape:
        raise ValueError(
            "text_logits must have the shape of image_logits (same batch, same shared classifier): "
            f"got text_logits {tuple(text_logits.shape)} and image_logits {tuple(image_logits.shape)}"
        )
    if text_logits.dtype != image_logits.dtype:
        raise ValueError(
            f"text_logits dtype {text_logits.dtype} differs from image_logits dtype {image_logits.dtype}"
        )
    batch, classes = image_logits.shape
    if batch == 0 or classes == 0:
        raise ValueError(f"image_logits must be non-empty, got shape {tuple(image_logits.shape)}")
    labels = _checked_labels(labels, batch, classes, image_logits.device, "labels")
    if text_labels is None:
        text_labels = labels
    else:
        text_labels = _checked_labels(
            text_labels, batch, classes, image_logits.device, "text_labels"
        )
    return F.cross_entropy(image_logits, labels), F.cross_entropy(text_logits, text_labels)


def _checked_labels(
    labels: Tensor, batch: int, classes: int, device: torch.device, name: str
) -> Tensor:
    if labels.shape != (batch,):
        raise ValueError(
            f"{name} must be (B,) = ({batch},) to match the logits, got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    labels = labels.to(device=device, dtype=torch.long)
    # Checked here because an out-of-range target is a device-side assert on CUDA (which poisons the
    # whole process), and -100 would be silently ignored by cross_entropy's default ignore_index.
    if bool(((labels < 0) | (labels >= classes)).any()):
        raise ValueError(
            f"{name} must lie in [0, {classes}) (the classifier width C), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return labels
