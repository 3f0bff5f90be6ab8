"""The image branch: a torchvision ResNet without its classifier, then the paper's head.

Head (Dual-Path paper): Linear (no bias) -> BN -> ReLU -> Linear (no bias) -> BN [-> ReLU]. The
paper's test-time feature is the last BN's output, before its ReLU (``model.embedding: pre_relu``);
``post_relu`` keeps the ReLU, whose L2-normalised outputs all lie in the positive orthant (see
docs/training.md for what that costs). Dropout follows before the shared instance classifier.

The stem: torchvision's (7x7 stride-2 conv and a stride-2 max-pool, built for 224 px) leaves a
64 px image 2x2 after the last stage; ``no_maxpool`` drops the pool (4x4), ``cifar`` also makes the
first conv 3x3 with stride 1 (8x8), each at about four times the compute of the one before.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from imtext.errors import ConfigError

#: Feature width of each supported backbone's global pool.
BACKBONE_DIM = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
}


#: Stems of the image backbone (``model.image_stem``).
STEMS = ("standard", "no_maxpool", "cifar")


def build_backbone(name: str, stem: str = "standard") -> nn.Module:
    """A randomly initialised torchvision ResNet returning globally pooled features (N, dim)."""
    if name not in BACKBONE_DIM:
        raise ConfigError(
            f"image_backbone: unknown {name!r}; choose one of {', '.join(BACKBONE_DIM)}"
        )
    if stem not in STEMS:
        raise ConfigError(f"image_stem: unknown {stem!r}; choose one of {', '.join(STEMS)}")
    net = getattr(torchvision.models, name)(weights=None)
    net.fc = nn.Identity()
    if stem in ("no_maxpool", "cifar"):
        net.maxpool = nn.Identity()
    if stem == "cifar":
        # Same parameter names as the standard stem, so the rest of the network is unchanged.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return net


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load torchvision ImageNet weights for ``backbone`` from a local file (never downloaded).

    The file is a state_dict as torchvision publishes it (e.g. ``resnet50-11ad3fa6.pth``); its
    ``fc`` classifier is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"model.image_weights: {path} not found; put the torchvision weights file there "
            "or set image_weights to null to start from random weights"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise ConfigError(
            f"model.image_weights: {path} is not a PyTorch weights file ({exc})"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(
            f"model.image_weights: {path} holds a {type(state).__name__}, not a state_dict of "
            "torchvision ResNet weights"
        )
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k: v.shape for k, v in backbone.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshapen = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k])
    if missing or unexpected or misshapen:
        raise ConfigError(
            f"model.image_weights: {path} does not fit the backbone (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, other shapes {misshapen[:3]}); check model.image_backbone"
        )
    backbone.load_state_dict(state, strict=False)


def projection_head(
    in_dim: int, out_dim: int, layers: int, final_relu: bool = True
) -> nn.Sequential:
    """``layers`` x (Linear without bias -> BatchNorm1d -> ReLU), the last ReLU only with
    ``final_relu`` (without it the output is the last BatchNorm's: signed, pre-ReLU)."""
    modules: list[nn.Module] = []
    for i in range(layers):
        modules += [
            nn.Linear(in_dim if i == 0 else out_dim, out_dim, bias=False),
            nn.BatchNorm1d(out_dim),
        ]
        if final_relu or i < layers - 1:
            modules.append(nn.ReLU(inplace=True))
    return nn.Sequential(*modules)


class ImageBranch(nn.Module):
    """Images (N, 3, H, W), normalised -> features (N, embed_dim), not normalised (post-ReLU with
    ``final_relu``, else the head's last BatchNorm output)."""

    def __init__(
        self,
        backbone: str,
        embed_dim: int,
        weights: str | None = None,
        stem: str = "standard",
        final_relu: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, stem)
        if weights:
            if stem == "cifar":
                raise ConfigError(
                    "model.image_weights: ImageNet weights fit the standard 7x7 stem, not the "
                    "'cifar' stem; use image_stem standard or no_maxpool, or image_weights null"
                )
            load_backbone_weights(self.backbone, weights)
        self.head = projection_head(
            BACKBONE_DIM[backbone], embed_dim, layers=2, final_relu=final_relu
        )
        self.frozen_backbone = False

    def freeze_backbone(self, frozen: bool) -> None:
        """Freeze the CNN (the paper's Stage I): no gradients, and its BatchNorm statistics stay
        fixed (eval mode), which is PyTorch's usual reading of a frozen pretrained network."""
        self.frozen_backbone = frozen
        self.backbone.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageBranch:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.frozen_backbone:
            with torch.no_grad():
                pooled = self.backbone(images)
        else:
            pooled = self.backbone(images)
        return self.head(pooled)
