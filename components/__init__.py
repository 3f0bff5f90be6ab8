"""One thin KFP component per imtext stage, all in the project image (see ``image.py``).

Each component marshals its parameters and artifact paths into one call of an imtext stage
function; ``imtext`` is imported only inside component bodies, which run in the image.
"""

from components.digest import digest
from components.evaluate import evaluate
from components.export import export
from components.finetune import finetune
from components.finetune_job import finetune_job
from components.image import IMAGE
from components.prepare import prepare
from components.pretrain import pretrain
from components.promote import promote
from components.register import register

__all__ = [
    "IMAGE",
    "digest",
    "evaluate",
    "export",
    "finetune",
    "finetune_job",
    "prepare",
    "pretrain",
    "promote",
    "register",
]
