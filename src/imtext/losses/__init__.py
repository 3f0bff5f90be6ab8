"""Losses of the dual-path model: instance loss (Stage I and II), ranking loss (Stage II), their sum.

Every loss is a pure function of tensors; this package imports only torch.
"""

from imtext.losses.dual_path import dual_path_loss
from imtext.losses.instance import instance_loss
from imtext.losses.ranking import hardest_negative_indices, paired_ranking_loss, ranking_loss

__all__ = [
    "dual_path_loss",
    "hardest_negative_indices",
    "instance_loss",
    "paired_ranking_loss",
    "ranking_loss",
]

from imtext.losses.adversarial import (
    GradientReversal,
    adversarial_lambda,
    grad_reverse,
    modality_loss,
)
from imtext.losses.contrastive import infonce_loss
from imtext.losses.neighbourhood import (
    neighbourhood_loss,
    pairwise_distance,
    topk_hinge_mean,
    topk_ranking_loss,
)
from imtext.losses.similarity import similarity_loss

__all__ += [
    "GradientReversal",
    "adversarial_lambda",
    "grad_reverse",
    "infonce_loss",
    "modality_loss",
    "neighbourhood_loss",
    "pairwise_distance",
    "similarity_loss",
    "topk_hinge_mean",
    "topk_ranking_loss",
]
