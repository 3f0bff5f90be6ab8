"""The models, by ``model.method``, and :func:`build_model`, which builds the one a config names.

``dual_path``: the paper's network, a ResNet image branch, a deep text CNN and one shared instance
classifier (module ``dual_path``). ``two_branch`` and ``similarity``: the two-branch networks on
the same encoders (module ``methods``, over the layers of module ``two_branch``).
"""

from imtext.config import ModelConfig
from imtext.models.discriminator import ModalityDiscriminator
from imtext.models.dual_path import DualPathModel
from imtext.models.methods import SimilarityModel, TwoBranchModel
from imtext.models.two_branch import (
    SimilarityNetwork,
    TwoBranchEmbedding,
    TwoBranchOutput,
    branch,
    score_head,
)

#: ``model.method`` -> the model class it names; each extends :class:`DualPathModel`.
MODELS: dict[str, type[DualPathModel]] = {
    "dual_path": DualPathModel,
    "two_branch": TwoBranchModel,
    "similarity": SimilarityModel,
}


def build_model(cfg: ModelConfig, vocab_size: int, n_classes: int) -> DualPathModel:
    """The model of ``cfg.method``, freshly initialised: a :class:`DualPathModel` or one of its
    two-branch extensions."""
    return MODELS[cfg.method](cfg, vocab_size, n_classes)


__all__ = [
    "MODELS",
    "ModalityDiscriminator",
    "SimilarityNetwork",
    "TwoBranchEmbedding",
    "TwoBranchOutput",
    "branch",
    "build_model",
    "score_head",
]
