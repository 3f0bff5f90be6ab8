"""The compiled Kubeflow pipeline: steps and order, cluster settings, the gate, and the import rules
of components/ and pipelines/ (checked on the source with ast)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imtext.cli.pipeline import add_pipeline_parser
from imtext.errors import ConfigError, ImtextError
from imtext.pipeline_steps import step_params
from tests.conftest import REPO

STEPS = ("digest", "prepare", "pretrain", "finetune", "evaluate", "export", "register", "promote")
GPU_STEPS = {"pretrain", "finetune", "evaluate"}
SECRET = "imtext-credentials"


def cli(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="imtext")
    add_pipeline_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pipeline", *argv])
    args.func(args)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[dict, dict]:
    """``imtext pipeline compile``'s output: (pipeline spec, Kubernetes platform spec)."""
    out = tmp_path_factory.mktemp("compiled") / "imtext-pipeline.yaml"
    cli("compile", "--repo", str(REPO), "--out", str(out))
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec: dict) -> dict[str, tuple[dict, str | None]]:
    """Every task by name, with the trigger condition of the sub-DAG it sits in (if any)."""
    tasks = {}
    root = spec["root"]["dag"]["tasks"]
    for name, task in root.items():
        component = spec["components"][task["componentRef"]["name"]]
        if "dag" in component:
            condition = task.get("triggerPolicy", {}).get("condition")
            for inner_name, inner in component["dag"]["tasks"].items():
                tasks[inner_name] = ({**inner, "parent": name}, condition)
        else:
            tasks[name] = (task, None)
    return tasks


def executor(spec: dict, task: dict) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


def test_eight_steps_in_dag_order(package):
    spec, _ = package
    tasks = all_tasks(spec)
    assert set(tasks) == set(STEPS)
    root = spec["root"]["dag"]["tasks"]

    def upstream(name: str) -> set[str]:
        task = tasks[name][0]
        direct = set(task.get("dependentTasks", []))
        if "parent" in task:  # a task in a sub-DAG waits for what its sub-DAG waits for
            direct |= set(root[task["parent"]].get("dependentTasks", []))
        return direct | {u for d in direct for u in upstream(d)}

    for i, name in enumerate(STEPS):
        assert upstream(name) == set(STEPS[:i]), name


def test_prepare_is_keyed_on_the_data_digest_which_is_never_cached(package):
    """KFP's cache key of a step holds its inputs: the digest makes prepare's change with the
    data (tests/pipeline/test_kfp_local.py runs it)."""
    spec, _ = package
    tasks = all_tasks(spec)
    argument = tasks["prepare"][0]["inputs"]["parameters"]["data_digest"]
    assert argument == {
        "taskOutputParameter": {"producerTask": "digest", "outputParameterKey": "Output"}
    }
    assert tasks["digest"][0]["inputs"]["parameters"]["data"] == {"componentInputParameter": "data"}
    assert not tasks["digest"][0].get("cachingOptions", {}).get("enableCache")


def test_promote_is_gated_on_registers_verdict(package):
    spec, _ = package
    tasks = all_tasks(spec)
    assert all(condition is None for name, (_, condition) in tasks.items() if name != "promote")
    promote, condition = tasks["promote"]
    assert condition == "inputs.parameter_values['pipelinechannel--register-Output'] == true"
    gate = spec["root"]["dag"]["tasks"][promote["parent"]]
    assert gate["dependentTasks"] == ["register"]
    # promote gets the version register created.
    argument = promote["inputs"]["parameters"]["model_version"]["componentInputParameter"]
    assert argument == "pipelinechannel--register-model_version"


def test_one_image_and_no_runtime_installs(package):
    from components import IMAGE

    spec, _ = package
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == len(STEPS)
    for name, ex in executors.items():
        container = ex["container"]
        assert container["image"] == IMAGE, name
        command = " ".join(container["command"] + container.get("args", []))
        assert "pip install" not in command, name


def test_resources_gpus_and_scheduling(package):
    spec, platform = package
    for name, (task, _) in all_tasks(spec).items():
        label = executor(spec, task)
        resources = spec["deploymentSpec"]["executors"][label]["container"]["resources"]
        for key in ("CpuRequest", "CpuLimit", "MemoryRequest", "MemoryLimit"):
            assert resources[f"resource{key}"], (name, key)
        if name in GPU_STEPS:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "1"
            assert platform[label]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                platform[label]["tolerations"]
            )
            assert platform[label]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        else:
            assert "accelerator" not in resources, name
            assert "nodeSelector" not in platform.get(label, {}), name


def test_retries_on_training_and_no_caching_for_the_registry(package):
    spec, _ = package
    for name, (task, _) in all_tasks(spec).items():
        retries = task.get("retryPolicy", {}).get("maxRetryCount", 0)
        assert (retries > 0) == (name in ("pretrain", "finetune")), name
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (name not in ("digest", "register", "promote")), name


def test_training_steps_keep_checkpoints_on_the_workspace_volume_per_run(package):
    """A retried pod finds its predecessor's checkpoint: the PVC at /workspace, the directory
    named by the run id from the pod's label (not an input, which would defeat the cache)."""
    from imtext.pipeline_steps import RUN_ID_ENV, WORKSPACE_ENV

    spec, platform = package
    for name, (task, _) in all_tasks(spec).items():
        label = executor(spec, task)
        config = platform.get(label, {})
        env = spec["deploymentSpec"]["executors"][label]["container"].get("env", [])
        if name in ("pretrain", "finetune"):
            (mount,) = config["pvcMount"]
            assert (mount["constant"], mount["mountPath"]) == ("imtext-workspace", "/workspace")
            assert env == [{"name": WORKSPACE_ENV, "value": "/workspace"}]
            assert config["fieldPathAsEnv"] == [
                {"name": RUN_ID_ENV, "fieldPath": "metadata.labels['pipeline/runid']"}
            ]
            assert "run_id" not in task["inputs"]["parameters"]
        else:
            assert "pvcMount" not in config and not env, name


def test_no_step_of_the_cluster_build_takes_the_run_id_as_an_input(package):
    """The backend resolves ``{{$.pipeline_job_uuid}}`` before it computes a step's cache key: an
    input holding it would make every training step a cache miss. The local build passes it (the
    local runner keys its cache on the unresolved inputs), the cluster steps read their pod label."""
    from pipelines.imtext_pipeline import build_pipeline

    spec, _ = package
    for name, (task, _) in all_tasks(spec).items():
        assert "pipeline_job_uuid" not in json.dumps(task.get("inputs", {})), name
    local = build_pipeline("{}", for_cluster=False).pipeline_spec.root.dag.tasks
    assert "pipeline_job_uuid" in str(local["pretrain"].inputs.parameters["kfp_run_id"])


def test_pipeline_run_id_comes_from_the_input_else_the_pod_label():
    from imtext.pipeline_steps import RUN_ID_ENV, pipeline_run_id

    assert pipeline_run_id("abc", {RUN_ID_ENV: "label"}) == "abc"
    assert pipeline_run_id("", {RUN_ID_ENV: " label "}) == "label"
    assert pipeline_run_id(" ", {}) is None


def test_credentials_come_from_the_secret_only(package):
    spec, platform = package
    s3 = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    expected = {
        "digest": s3,
        "prepare": s3,
        "register": {
            "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        },
    }
    # The training steps log to the tracking server while they train.
    for step in ("pretrain", "finetune", "promote"):
        expected[step] = expected["register"]
    for name, (task, _) in all_tasks(spec).items():
        secrets = platform.get(executor(spec, task), {}).get("secretAsEnv", [])
        if name not in expected:
            assert secrets == [], name
            continue
        (secret,) = secrets
        assert secret["secretName"] == SECRET
        assert {m["envVar"] for m in secret["keyToEnv"]} == expected[name]
        keys = {m["secretKey"] for m in secret["keyToEnv"]}
        assert keys <= {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"} | {
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert not [p for p in parameters if "secret" in p.lower() or "key" in p.lower()]
    assert set(parameters) == {
        "data",
        "annotations",
        "images",
        "data_format",
        "skip_bad",
        "params",
        "overrides",
        "tracking_uri",
        "model_name",
        "device",
    }


def test_params_default_is_the_repository_params_yaml(package):
    spec, _ = package
    default = spec["root"]["inputDefinitions"]["parameters"]["params"]["defaultValue"]
    assert "\n" not in default  # the compiler copies defaults into a comment at the top
    assert yaml.safe_load(default) == yaml.safe_load((REPO / "params.yaml").read_text())


def test_local_build_leaves_out_the_cluster_settings():
    from pipelines.imtext_pipeline import build_pipeline

    pipeline = build_pipeline("{}", for_cluster=False)
    assert "kubernetes" not in pipeline.platform_spec.platforms
    for ex in pipeline.pipeline_spec.deployment_spec["executors"].values():
        assert "resources" not in ex["container"]
    for task in pipeline.pipeline_spec.root.dag.tasks.values():
        assert not task.retry_policy.max_retry_count


def test_image_comes_from_the_environment(tmp_path):
    out = tmp_path / "p.yaml"
    env = {**os.environ, "IMTEXT_IMAGE": "registry.example/imtext:abc123"}
    subprocess.run(
        [sys.executable, "-m", "pipelines.compile", str(out)], cwd=REPO, env=env, check=True
    )
    spec = next(yaml.safe_load_all(out.read_text()))
    images = {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/imtext:abc123"}


def test_compile_rejects_bad_params(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"prepare": {"min_count": 1}}))
    with pytest.raises(ConfigError, match="prepare: missing key"):
        cli("compile", "--repo", str(REPO), "--params", str(bad), "--out", str(tmp_path / "x"))


def test_step_params():
    text = json.dumps({"finetune": {"epochs": 6, "lr": 0.1}, "register": {"model_name": "a"}})
    assert step_params(text, ["finetune.epochs=2"])["finetune"] == {"epochs": 2, "lr": 0.1}
    assert step_params(text, [], "b")["register"]["model_name"] == "b"
    assert step_params("finetune:\n  epochs: 1  # YAML too\n", []) == {"finetune": {"epochs": 1}}
    with pytest.raises(ConfigError, match="params: not valid YAML"):
        step_params("{", [])
    with pytest.raises(ConfigError, match="no key 'epoch'"):
        step_params(text, ["finetune.epoch=2"])


def test_help_texts(capsys):
    for command in ("compile", "run", "submit"):
        with pytest.raises(SystemExit):
            cli(command, "--help")
        text = capsys.readouterr().out
        assert "--repo" in text
    with pytest.raises(SystemExit):
        cli("submit", "--help")
    assert "KF_PIPELINES_TOKEN" in capsys.readouterr().out


# --- who may import what (DESIGN.md) -----------------------------------------------------------


def imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, node))
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def module_level(tree: ast.Module) -> set[str]:
    return {
        top(name)
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name, _ in imports(node)
    }


def sources(folder: str) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, folder
    return files


def test_pipelines_never_import_imtext_or_torch():
    for path in sources("pipelines"):
        names = {top(name) for name, _ in imports(ast.parse(path.read_text()))}
        assert not names & {"imtext", "torch"}, path


def test_components_import_kfp_at_module_level_and_imtext_only_in_bodies():
    for path in sources("components"):
        tree = ast.parse(path.read_text())
        allowed = {"kfp", "components", "os", "typing"}
        assert module_level(tree) <= allowed, path
        for function in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            body = {top(name) for name, _ in imports(function)}
            assert "torch" not in body, path
            # The body is what runs in the image: it reaches torch only through imtext.
            assert body <= {"imtext", "pathlib", "json", "shutil", "tempfile", "collections"}, (
                path,
                body,
            )


def test_src_never_imports_components_or_pipelines():
    for path in sources("src"):
        names = {top(name) for name, _ in imports(ast.parse(path.read_text()))}
        assert not names & {"components", "pipelines"}, path


@pytest.mark.parametrize("command", ["compile", "run", "submit"])
def test_settings_that_do_not_fit_together_fail_before_any_step(tmp_path, command):
    """The dual-path model cannot be trained by the logistic loss: refused up front."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["finetune"]["ranking"] = "logistic"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    argv = {
        "compile": ["--params", str(bad), "--out", str(tmp_path / "out" / "p.yaml")],
        "run": [
            "--set", "finetune.ranking=logistic", "--out", str(tmp_path / "out"),
            "--data", str(tmp_path),
        ],
        "submit": ["--set", "finetune.ranking=logistic", "--host", "http://127.0.0.1:9"],
    }[command]  # fmt: skip
    with pytest.raises(ConfigError, match=r"finetune: ranking: 'logistic' trains the pair scores"):
        cli(command, "--repo", str(REPO), *argv)
    assert not (tmp_path / "out").exists()


def test_a_training_step_trains_in_its_output_locally_and_on_the_volume_on_a_cluster(tmp_path):
    from imtext.pipeline_steps import step_workdir

    out = tmp_path / "finetune" / "model"
    assert step_workdir("finetune", out, {}) == out
    cluster = {"IMTEXT_WORKSPACE": "/workspace", "IMTEXT_RUN_ID": "4f1c-77"}
    assert step_workdir("finetune", out, cluster) == Path("/workspace/runs/4f1c-77/finetune")
    for bad in ("", " ", "..", "a/b"):
        with pytest.raises(ImtextError, match="IMTEXT_RUN_ID is .*not a run id"):
            step_workdir("pretrain", out, {**cluster, "IMTEXT_RUN_ID": bad})


def test_a_finished_stage_is_handed_on_and_its_workdir_removed(tmp_path):
    from imtext.pipeline_steps import TRAIN_OUTPUTS, hand_on

    work, out = tmp_path / "runs" / "r1" / "pretrain", tmp_path / "out"
    work.mkdir(parents=True)
    for name in TRAIN_OUTPUTS:
        (work / name).write_text(name)
    (tmp_path / "runs" / "r1" / "finetune").mkdir()  # another step's: left alone
    hand_on(work, out)
    assert {p.name: p.read_text() for p in out.iterdir()} == {n: n for n in TRAIN_OUTPUTS}
    assert not work.exists() and (tmp_path / "runs" / "r1" / "finetune").is_dir()


@pytest.fixture(scope="module")
def multi_node(tmp_path_factory) -> tuple[dict, dict]:
    """``imtext pipeline compile --finetune-nodes 3``: (pipeline spec, Kubernetes platform spec)."""
    out = tmp_path_factory.mktemp("compiled") / "multi.yaml"
    cli("compile", "--repo", str(REPO), "--out", str(out), "--finetune-nodes", "3")
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_multi_node_finetune_is_a_pytorchjob_step_whose_model_flows_on(multi_node):
    from components import IMAGE

    spec, platform = multi_node
    tasks = all_tasks(spec)
    assert set(tasks) == set(STEPS) - {"finetune"} | {"finetune-job"}
    job, _ = tasks["finetune-job"]
    constants = {k: v["runtimeValue"]["constant"] for k, v in job["inputs"]["parameters"].items()
                 if "runtimeValue" in v}  # fmt: skip
    assert constants["nodes"] == 3 and constants["gpus_per_node"] == 1
    assert constants["image"] == IMAGE
    template = yaml.safe_load((REPO / "k8s" / "training" / "finetune-pytorchjob.yaml").read_text())
    assert json.loads(constants["job_template"]) == template
    assert job["inputs"]["artifacts"]["init"]["taskOutputArtifact"]["producerTask"] == "pretrain"
    for consumer in ("evaluate", "export", "register"):
        model = tasks[consumer][0]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
        assert model == {"producerTask": "finetune-job", "outputArtifactKey": "model"}, consumer
    # The step waits; the job's pods hold the GPUs. It mounts the workspace the pods share.
    label = executor(spec, job)
    resources = spec["deploymentSpec"]["executors"][label]["container"]["resources"]
    assert "accelerator" not in resources
    assert platform[label]["pvcMount"][0]["mountPath"] == "/workspace"
    assert job["retryPolicy"]["maxRetryCount"] > 0  # a retry waits for the same job


def test_the_local_runner_keeps_the_single_process_finetune():
    from pipelines.errors import PipelineError
    from pipelines.imtext_pipeline import build_pipeline

    with pytest.raises(PipelineError, match="local runner trains in one process"):
        build_pipeline("{}", for_cluster=False, finetune_nodes=2)
    local = build_pipeline("{}", for_cluster=False, retries=1)
    assert "finetune" in local.pipeline_spec.root.dag.tasks
    assert local.pipeline_spec.root.dag.tasks["finetune"].retry_policy.max_retry_count == 1
