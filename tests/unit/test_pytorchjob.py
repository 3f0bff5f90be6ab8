"""The multi-node finetune step's PyTorchJob: the manifest it builds from k8s/training/, and how it
creates, waits for and reports the job.

No cluster exists here, so the Kubernetes API is a stub implementing the two CustomObjectsApi
methods the step calls, raising the real client's ``ApiException``; the manifest itself is
validated like k8s/ in tests/pipeline/test_k8s.py.
"""

from __future__ import annotations

import json

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from imtext.errors import ImtextError
from imtext.pytorchjob import finetune_job, job_name, run_finetune_job, run_job
from tests.conftest import REPO

TEMPLATE = yaml.safe_load((REPO / "k8s" / "training" / "finetune-pytorchjob.yaml").read_text())


def a_job(nodes: int = 3, gpus: int = 0) -> dict:
    return finetune_job(
        TEMPLATE,
        name="imtext-finetune-r1",
        namespace="team-a",
        image="registry.example/imtext:abc",
        nodes=nodes,
        workdir="/workspace/runs/r1/finetune",
        gpus_per_node=gpus,
    )


class StubCustomObjects:
    """``CustomObjectsApi``'s create and get; the job's conditions come from ``states``."""

    def __init__(self, states: list[list[dict]], create_error: ApiException | None = None):
        self.states, self.create_error = list(states), create_error
        self.created: list[dict] = []
        self.on_get = lambda: None

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs")
        assert namespace == body["metadata"]["namespace"]
        if self.create_error is not None:
            raise self.create_error
        self.created.append(body)
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs")
        self.on_get()
        conditions = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"metadata": {"name": name}, "status": {"conditions": conditions}}


def cond(kind: str, reason: str = "", message: str = "", status: str = "True") -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": message}


RUNNING = [cond("Created"), cond("Running")]
SUCCEEDED = [cond("Created"), cond("Running", status="False"), cond("Succeeded", "Done", "ok")]


def test_the_manifest_is_the_template_with_this_runs_settings():
    job = a_job(nodes=3)
    assert job["metadata"]["name"] == "imtext-finetune-r1"
    assert job["metadata"]["namespace"] == "team-a"
    assert job["metadata"]["labels"] == TEMPLATE["metadata"]["labels"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    assert job["spec"]["runPolicy"] == TEMPLATE["spec"]["runPolicy"]
    for replica in replicas.values():
        (c,) = replica["template"]["spec"]["containers"]
        assert c["image"] == "registry.example/imtext:abc"
        (command,) = c["args"]
        assert "--prepared /workspace/runs/r1/finetune/prepared" in command
        assert "--init /workspace/runs/r1/finetune/init/model.pt" in command
        assert "--out /workspace/runs/r1/finetune/out --params" in command
        assert {"name": "NPROC_PER_NODE", "value": "1"} in c["env"]
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert TEMPLATE["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1  # not modified


def test_gpu_nodes_get_one_process_per_gpu_and_gpu_scheduling():
    for replica in a_job(nodes=2, gpus=4)["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        (c,) = pod["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
        assert {"name": "NPROC_PER_NODE", "value": "4"} in c["env"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            pod["tolerations"]
        )


def test_one_node_is_not_a_job():
    with pytest.raises(ImtextError, match="finetune nodes: 1; a PyTorchJob is for 2 or more"):
        a_job(nodes=1)


def test_job_names_are_dns_labels_unique_per_run():
    name = job_name("4F1C_77ab-" + "9" * 80)
    assert name.startswith("imtext-finetune-4f1c-77ab-") and len(name) <= 63
    assert job_name("a") != job_name("b")


def test_a_succeeded_job_is_waited_for(capsys):
    api = StubCustomObjects([[], [cond("Created")], RUNNING, SUCCEEDED])
    sleeps: list[float] = []
    state = run_job(api, a_job(), poll_s=7, sleep=sleeps.append)
    assert [c["type"] for c in state["status"]["conditions"]][-1] == "Succeeded"
    assert len(api.created) == 1 and sleeps == [7, 7, 7]
    log = capsys.readouterr().out
    assert "PyTorchJob team-a/imtext-finetune-r1: created (1 Master, 2 Worker)" in log
    assert "pending" in log and ": Running" in log and "Succeeded (Done: ok)" in log


def test_a_failed_job_fails_the_step_with_the_jobs_own_message():
    failed = [*RUNNING, cond("Failed", "PyTorchJobFailed", "PyTorchJob imtext-finetune-r1 is "
                             "failed because 1 Worker replica(s) failed.")]  # fmt: skip
    api = StubCustomObjects([RUNNING, failed])
    with pytest.raises(ImtextError) as info:
        run_job(api, a_job(), sleep=lambda s: None)
    message = str(info.value)
    assert message.startswith("PyTorchJob team-a/imtext-finetune-r1 failed: PyTorchJobFailed: ")
    assert "because 1 Worker replica(s) failed" in message
    assert "kubectl logs -n team-a -l training.kubeflow.org/job-name=imtext-finetune-r1" in message


def test_a_retried_step_waits_for_the_job_its_first_attempt_created(capsys):
    api = StubCustomObjects([SUCCEEDED], ApiException(status=409, reason="Conflict"))
    run_job(api, a_job(), sleep=lambda s: None)
    assert api.created == [] and "exists already; waiting for it" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("status", "says"),
    [(404, "install the Kubeflow Training Operator"), (403, "apply k8s/base/rbac.yaml")],
)
def test_a_refused_job_says_what_to_do(status, says):
    api = StubCustomObjects([[]], ApiException(status=status, reason="Nope"))
    with pytest.raises(ImtextError, match=f"HTTP {status} Nope; .*{says}"):
        run_job(api, a_job(), sleep=lambda s: None)


def test_the_step_stages_inputs_runs_the_job_and_hands_on_its_outputs(tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "train.npz").write_bytes(b"npz")
    init = tmp_path / "pretrain" / "model.pt"
    init.parent.mkdir()
    init.write_bytes(b"pretrained")
    env = {"IMTEXT_WORKSPACE": str(tmp_path / "ws"), "IMTEXT_RUN_ID": "r1"}
    workdir = tmp_path / "ws" / "runs" / "r1" / "finetune"
    api = StubCustomObjects([RUNNING, SUCCEEDED])

    def the_pods_train() -> None:  # what torchrun's rank 0 leaves on the volume
        assert (workdir / "prepared" / "train.npz").read_bytes() == b"npz"
        assert (workdir / "init" / "model.pt").read_bytes() == b"pretrained"
        assert yaml.safe_load((workdir / "params.yaml").read_text()) == {"finetune": {"epochs": 2}}
        out = workdir / "out"
        out.mkdir(exist_ok=True)
        for name in ("model.pt", "checkpoint.pt", "history.json"):
            (out / name).write_text(name)
        records = [{"stage": "finetune", "step": 6, "epoch": 1, "val_rsum": 10.0},
                   {"stage": "finetune", "step": 12, "epoch": 2, "val_rsum": 12.5}]  # fmt: skip
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "metrics.json").write_text(json.dumps({"val_rsum": 12.5}))

    api.on_get = the_pods_train
    model = tmp_path / "model"
    logged: list[tuple[dict, int]] = []
    metrics = run_finetune_job(
        {"finetune": {"epochs": 2}}, prepared, init, model,
        template=TEMPLATE, image="img:1", nodes=2, gpus_per_node=0, env=env, api=api,
        namespace="team-a", log=lambda m: None, also_log=lambda m, s: logged.append((m, s)),
    )  # fmt: skip
    assert metrics == {"val_rsum": 12.5}
    # The job's records reach the MLflow logger as the training loop would have passed them.
    assert logged == [({"epoch": 1, "val_rsum": 10.0}, 6), ({"epoch": 2, "val_rsum": 12.5}, 12)]
    assert {p.name for p in model.iterdir()} == {
        "model.pt", "checkpoint.pt", "history.json", "log.jsonl", "metrics.json"
    }  # fmt: skip
    (job,) = api.created
    assert job["metadata"]["name"] == "imtext-finetune-r1"
    assert not workdir.exists()


def test_the_step_needs_the_workspace(tmp_path):
    with pytest.raises(ImtextError, match="IMTEXT_WORKSPACE is not set"):
        run_finetune_job(
            {}, tmp_path, tmp_path / "m.pt", tmp_path / "out", template=TEMPLATE, image="i",
            nodes=2, gpus_per_node=0, env={}, api=object(), namespace="n",
        )  # fmt: skip
