"""The learned temperature of the in-batch contrastive loss, a part of the model.

It lives with the model, not with the loss (``imtext.losses.contrastive.infonce_loss``, which
takes the 0-d tensor): a model file that carries a trained temperature rebuilds it without
importing the losses. The inverse temperature is learned as its logarithm, as in CLIP: a positive
scale for any parameter value, and multiplicative steps under a fixed learning rate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: CLIP's initial temperature (0.07, from Wu et al. 2018) and its cap on the logit scale (100),
#: the same cap as ``infonce_loss``'s default (a test checks that they agree).
INIT_TEMPERATURE = 0.07
MAX_SCALE = 100.0


class LogitScale(nn.Module):
    """The learned ``log(1 / temperature)`` of ``infonce_loss``, a 0-d parameter.

    Register it on the model (``model.logit_scale = LogitScale()``) so that the optimiser, the
    checkpoint and DDP see it like any weight, and call :meth:`clamp_` after every optimiser step,
    as open_clip does: the parameter then never leaves ``[0, log max_scale]``, where the loss's own
    clamp is the identity and the gradient always flows. (Clamping only inside the loss would leave a
    parameter that crossed the cap with zero gradient, stuck there for good.)
    """

    def __init__(self, init_temperature: float = INIT_TEMPERATURE, max_scale: float = MAX_SCALE):
        super().__init__()
        if not 0 < init_temperature <= 1 or not math.isfinite(max_scale) or max_scale < 1:
            raise ValueError(
                "init_temperature must be in (0, 1] and max_scale a finite number >= 1, got "
                f"{init_temperature!r}, {max_scale!r}"
            )
        self.max_scale = float(max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    def forward(self) -> Tensor:
        """The 0-d log-scale parameter, to pass to ``infonce_loss``."""
        return self.log_scale

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(0.0, math.log(self.max_scale))

    def extra_repr(self) -> str:
        return f"max_scale={self.max_scale}"
