"""Everything MLflow: the run of a candidate, its registered version, and the gated serving alias.

* :func:`register` logs params, metrics, history, report, ``model.pt`` and the ONNX encoders (as a
  pyfunc) to one run and registers a new version of the model;
* :func:`promote` moves the alias (``champion``) to a version only if it beats the champion on the
  gate metric, and records why on the version; concurrent promotions take turns through a lock
  kept in the registry (:mod:`.lock`); :func:`preview_promotion` says what it would do;
* :func:`load_champion` loads ``models:/<name>@champion`` as a pyfunc that embeds texts and images,
  after checking its files against the hash recorded at registration, and runs the installed
  imtext, never the copy stored with the model (trust model: ``mlflow/README.md``).

``register`` verifies the export itself (:mod:`.export_check`) before it creates a version.

Every request to the tracking server or object store is retried by MLflow and botocore themselves
(their settings derived from ``register.retries``) and ends, when the server stays away, in a
:class:`RegistryUnavailableError` that says what to do.

:func:`tracked_training` (:mod:`.runs`) is the pipeline's MLflow run while it trains: opened by
the first training step, resumed by the next and by ``register``; its ``log`` is the training
loop's ``log(metrics, step)``.
"""

from imtext.registry.promotion import (
    PromotionDecision,
    alias_version,
    load_champion,
    load_model_version,
    preview_promotion,
    promote,
)
from imtext.registry.retry import RegistryError, RegistryUnavailableError
from imtext.registry.runs import resolve_tracking_uri, tracked_training
from imtext.registry.tracking import RegisteredVersion, register

__all__ = [
    "PromotionDecision",
    "RegisteredVersion",
    "RegistryError",
    "RegistryUnavailableError",
    "alias_version",
    "load_champion",
    "load_model_version",
    "preview_promotion",
    "promote",
    "register",
    "resolve_tracking_uri",
    "tracked_training",
]
