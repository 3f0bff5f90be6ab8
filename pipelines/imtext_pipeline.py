"""The imtext DAG: digest -> prepare -> pretrain -> finetune -> evaluate -> export -> register
-> promote.

``digest`` never comes from KFP's cache: it computes the content digest of the data, an input of
``prepare``, so that ``prepare`` and everything after it are taken from the cache only when the
data is the same, not merely its location. ``promote`` runs only when ``register`` found the
candidate better than the serving champion (the ``dsl.If`` gate); ``register`` and ``promote``
never come from KFP's cache, since they change the model registry. The same DAG runs on a
cluster (compiled with the settings of :mod:`pipelines.cluster`) and on a workstation with KFP's
local runner (without them).
"""

import json
from pathlib import Path
from typing import NamedTuple

import yaml
from kfp import dsl
from kfp.dsl import HTML, Artifact, Markdown

from components import (
    IMAGE,
    digest,
    evaluate,
    export,
    finetune,
    finetune_job,
    prepare,
    pretrain,
    promote,
    register,
)
from pipelines.cluster import GPUS_PER_STEP, RETRY_STEPS, configure_for_cluster
from pipelines.errors import PipelineError

PIPELINE_NAME = "imtext"
DESCRIPTION = (
    "Image-text retrieval (dual-path CNN, instance loss): prepare, two training stages, evaluate, "
    "ONNX export, MLflow registration, and promotion to the serving alias behind the metric gate."
)
REPO = Path(__file__).resolve().parents[1]
#: The parameters compiled into the pipeline as the default of its ``params`` argument.
PARAMS_FILE = REPO / "params.yaml"
#: Where a cluster run reads the raw data unless told otherwise (the built-in dataset, uploaded
#: with ``aws s3 sync data/shapes s3://imtext-data/datasets/shapes``).
DEFAULT_DATA = "s3://imtext-data/datasets/shapes"
#: The PyTorchJob a multi-node finetune starts (``finetune_nodes > 1``): the kustomize component's
#: manifest, read when compiling; the step sets its name, image, replicas and command.
JOB_TEMPLATE = REPO / "k8s" / "training" / "finetune-pytorchjob.yaml"


class PipelineOutputs(NamedTuple):
    evaluation: Artifact
    recall_table: Markdown
    report: HTML
    gate_metric: float
    model_version: str
    beats_champion: bool
    gate: str
    mlflow_run_url: str


def compact_params(text: str) -> str:
    """params.yaml text as one line of JSON (YAML reads it back): the compiler writes each default
    into a comment at the top of the package, which a multi-line default would break."""
    try:
        params = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineError(f"params: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(params, dict):
        raise PipelineError("params: expected a mapping of stage sections")
    return json.dumps(params, separators=(",", ":"))


def job_template() -> str:
    """:data:`JOB_TEMPLATE` as one line of JSON."""
    try:
        return json.dumps(yaml.safe_load(JOB_TEMPLATE.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(
            f"{JOB_TEMPLATE}: cannot read the PyTorchJob template ({exc})"
        ) from None


def build_pipeline(
    params: str | None = None,
    *,
    for_cluster: bool = True,
    retries: int = 0,
    finetune_nodes: int = 1,
):
    """The pipeline, with ``params`` (the text of a params.yaml; default: the repository's) as the
    default of its ``params`` argument; ``for_cluster`` adds the settings of
    :mod:`pipelines.cluster` (resources, GPUs, retries, the workspace volume, the credentials
    secret). Without them, ``retries`` is how often KFP's local runner retries a failed training
    step, at once (it resumes from its checkpoint).

    With ``finetune_nodes`` > 1 (cluster only) Stage II is the ``finetune-job`` step: a
    PyTorchJob of that many pods on the Kubeflow Training Operator instead of one process.
    """
    if finetune_nodes < 1:
        raise PipelineError(f"finetune nodes: {finetune_nodes}; expected 1 or more")
    if finetune_nodes > 1 and not for_cluster:
        raise PipelineError(
            f"finetune nodes: {finetune_nodes}; the local runner trains in one process "
            "(a PyTorchJob needs a cluster): leave it at 1"
        )
    template = job_template() if finetune_nodes > 1 else ""
    default_params = compact_params(
        PARAMS_FILE.read_text(encoding="utf-8") if params is None else params
    )
    # KFP reads a parameter's default from the signature, so a mutable default is the API here.
    no_overrides: list = []

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    def imtext_pipeline(
        data: str = DEFAULT_DATA,
        annotations: str = "dataset.json",
        images: str = "images",
        data_format: str = "karpathy",
        skip_bad: bool = False,
        params: str = default_params,
        overrides: list = no_overrides,
        tracking_uri: str = "",
        model_name: str = "",
        device: str = "auto",
    ) -> PipelineOutputs:
        """Train, evaluate, export and register an imtext model; promote it if it is better.

        Args:
            data: Raw data: s3://bucket/prefix, or a directory the steps can read.
            annotations: Annotation file under the data location (Karpathy JSON or reid_raw.json).
            images: Directory under the data location that image paths are relative to.
            data_format: karpathy (Flickr30k, COCO, shapes) or cuhk-pedes.
            skip_bad: Leave out unusable images and captions instead of failing.
            params: params.yaml as JSON or YAML text (a dict argument cannot hold its nulls);
                the default is the file the pipeline was compiled with.
            overrides: section.key=value settings applied over params, e.g. finetune.epochs=2.
            tracking_uri: MLflow tracking URI; empty: register.tracking_uri, else the secret's.
            model_name: Registered model name; empty: register.model_name.
            device: Training and evaluation device: auto, cpu, cuda or cuda:N.
        """
        settings = {"params": params, "overrides": overrides}
        digest_task = digest(data=data)
        prepare_task = prepare(
            data=data,
            data_digest=digest_task.output,
            annotations=annotations,
            images=images,
            data_format=data_format,
            skip_bad=skip_bad,
            **settings,
        )
        prepared = prepare_task.outputs["prepared"]
        # One MLflow run per pipeline run: pretrain opens it, finetune resumes it, register
        # logs the model to it (imtext.registry.runs). On a cluster the run id reaches the steps
        # from their pod's label (IMTEXT_RUN_ID, pipelines/cluster.py), not as an input: the
        # backend resolves the placeholder before it computes the cache key, so an input holding
        # it would make every training step a cache miss.
        run_id = "" if for_cluster else dsl.PIPELINE_JOB_ID_PLACEHOLDER
        tracking = {"tracking_uri": tracking_uri, "kfp_run_id": run_id}
        pretrain_task = pretrain(prepared=prepared, device=device, **tracking, **settings)
        stage_two = {
            "prepared": prepared,
            "init": pretrain_task.outputs["model"],
            "mlflow_run_id": pretrain_task.outputs["mlflow_run_id"],
            **tracking,
            **settings,
        }
        if finetune_nodes > 1:
            finetune_task = finetune_job(
                nodes=finetune_nodes,
                gpus_per_node=GPUS_PER_STEP,
                job_template=template,
                image=IMAGE,
                **stage_two,
            )
        else:
            finetune_task = finetune(device=device, **stage_two)
        model = finetune_task.outputs["model"]
        evaluate_task = evaluate(model=model, prepared=prepared, device=device, **settings)
        export_task = export(model=model, prepared=prepared, **settings)
        # Export needs nothing of evaluate's, but only a model that evaluated is worth exporting,
        # and one chain keeps the run in the order of the CLI and dvc.yaml.
        export_task.after(evaluate_task)
        register_task = register(
            model=model,
            evaluation=evaluate_task.outputs["evaluation"],
            onnx=export_task.outputs["onnx"],
            tracking_uri=tracking_uri,
            model_name=model_name,
            mlflow_run_id=finetune_task.outputs["mlflow_run_id"],
            **settings,
        )
        with dsl.If(register_task.outputs["Output"] == True, "beats-champion"):  # noqa: E712
            promote_task = promote(
                model_version=register_task.outputs["model_version"],
                tracking_uri=tracking_uri,
                model_name=model_name,
                **settings,
            )
        tasks = {
            "digest": digest_task,
            "prepare": prepare_task,
            "pretrain": pretrain_task,
            "finetune-job" if finetune_nodes > 1 else "finetune": finetune_task,
            "evaluate": evaluate_task,
            "export": export_task,
            "register": register_task,
            "promote": promote_task,
        }
        for name in ("digest", "register", "promote"):
            tasks[name].set_caching_options(enable_caching=False)
        if for_cluster:
            configure_for_cluster(tasks)
        elif retries:
            for name in sorted(set(RETRY_STEPS) & set(tasks)):
                tasks[name].set_retry(num_retries=retries, backoff_duration="0s")
        return PipelineOutputs(
            evaluation=evaluate_task.outputs["evaluation"],
            recall_table=evaluate_task.outputs["recall_table"],
            report=evaluate_task.outputs["report"],
            gate_metric=evaluate_task.outputs["Output"],
            model_version=register_task.outputs["model_version"],
            beats_champion=register_task.outputs["Output"],
            gate=register_task.outputs["gate"],
            mlflow_run_url=finetune_task.outputs["mlflow_run_url"],
        )

    return imtext_pipeline
