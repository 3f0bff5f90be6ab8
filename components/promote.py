"""KFP component ``promote``: move the serving alias to the new version, behind the metric gate."""

from typing import NamedTuple

from kfp import dsl

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(
    params: str,
    overrides: list,
    tracking_uri: str,
    model_name: str,
    model_version: str,
) -> NamedTuple("PromoteOutputs", [("promoted", bool), ("decision", str)]):
    """Point the alias (register.alias, e.g. champion) at the version if it beats the champion.

    The gate is checked again here, against the champion of this moment, and the decision and its
    evidence are written as tags on the version.

    Args:
        params: The text of params.yaml (section register is used).
        overrides: section.key=value settings applied over params.
        tracking_uri: MLflow tracking URI; empty: register.tracking_uri, else $MLFLOW_TRACKING_URI.
        model_name: Registered model name; empty: register.model_name.
        model_version: The version register created.

    Returns:
        promoted: Whether the alias now points at the version.
        decision: The reason, with both metric values.
    """
    from collections import namedtuple

    from imtext.config import stage_config_from_params
    from imtext.pipeline_steps import step_params
    from imtext.registry import promote as promote_stage

    values = step_params(params, overrides, model_name)
    decision = promote_stage(
        stage_config_from_params("register", values),
        model_version,
        tracking_uri=tracking_uri or None,
        log=print,
    )
    outputs = namedtuple("PromoteOutputs", ["promoted", "decision"])
    return outputs(decision.promoted, decision.reason)
