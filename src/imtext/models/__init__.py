"""The dual-path network: a ResNet image branch, a deep text CNN, one shared instance classifier."""

from imtext.models.discriminator import ModalityDiscriminator
from imtext.models.two_branch import (
    SimilarityNetwork,
    TwoBranchEmbedding,
    TwoBranchOutput,
    branch,
    score_head,
)

__all__ = [
    "ModalityDiscriminator",
    "SimilarityNetwork",
    "TwoBranchEmbedding",
    "TwoBranchOutput",
    "branch",
    "score_head",
]
