"""`imtext pipeline submit` against a fake Kubeflow Pipelines API on 127.0.0.1: the requests it
sends (experiment lookup and creation, then the run with the pipeline spec and its arguments)."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from imtext.cli.pipeline import TOKEN_ENV, add_pipeline_parser
from imtext.errors import ImtextError
from tests.conftest import REPO

pytestmark = pytest.mark.slow


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: dict | None


@dataclass
class FakeKfp:
    """Records every request; answers the experiment and run endpoints of the v2beta1 API."""

    url: str = ""
    requests: list[Request] = field(default_factory=list)
    experiments: list[dict] = field(default_factory=list)
    fail_runs_with: int | None = None

    def handle(self, request: Request) -> tuple[int, dict]:
        self.requests.append(request)
        if request.path == "/apis/v2beta1/healthz":
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if request.path == "/apis/v2beta1/experiments" and request.method == "GET":
            return 200, {"experiments": self.experiments, "total_size": len(self.experiments)}
        if request.path == "/apis/v2beta1/experiments" and request.method == "POST":
            experiment = {"experiment_id": "exp-1", **request.body}
            self.experiments.append(experiment)
            return 200, experiment
        if request.path == "/apis/v2beta1/runs" and request.method == "POST":
            if self.fail_runs_with:
                return self.fail_runs_with, {"error": "denied", "code": 7, "message": "denied"}
            return 200, {"run_id": "run-1", "state": "PENDING", **request.body}
        return 404, {"error": "not found", "code": 5, "message": "not found"}


@pytest.fixture
def fake_kfp() -> Iterator[FakeKfp]:
    fake = FakeKfp()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parsed = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            request = Request(
                self.command,
                parsed.path,
                parse_qs(parsed.query),
                {k.lower(): v for k, v in self.headers.items()},
                json.loads(raw) if raw else None,
            )
            status, payload = fake.handle(request)
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


def submit(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="imtext")
    add_pipeline_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pipeline", "submit", "--repo", str(REPO), *argv])
    args.func(args)


def test_submit_creates_the_experiment_and_a_run_with_spec_and_arguments(
    fake_kfp, monkeypatch, capsys
):
    monkeypatch.setenv(TOKEN_ENV, "secret-token")
    submit(
        "--host",
        fake_kfp.url,
        "--experiment",
        "flickr30k",
        "--run-name",
        "nightly",
        "--param",
        "data=s3://imtext-data/flickr30k",
        "--param",
        "annotations=dataset_flickr30k.json",
        "--param",
        "images=flickr30k-images",
        "--param",
        "skip_bad=true",
        "--set",
        "finetune.epochs=30",
    )
    health, lookup, create_experiment, create_run = fake_kfp.requests
    assert health.path == "/apis/v2beta1/healthz"
    assert (lookup.method, lookup.path) == ("GET", "/apis/v2beta1/experiments")
    assert "flickr30k" in lookup.query["filter"][0]
    assert create_experiment.method == "POST"
    assert create_experiment.body["display_name"] == "flickr30k"

    assert (create_run.method, create_run.path) == ("POST", "/apis/v2beta1/runs")
    assert create_run.headers["authorization"] == "Bearer secret-token"
    run = create_run.body
    assert run["display_name"] == "nightly"
    assert run["experiment_id"] == "exp-1"
    assert run["runtime_config"]["parameters"] == {
        "data": "s3://imtext-data/flickr30k",
        "annotations": "dataset_flickr30k.json",
        "images": "flickr30k-images",
        "skip_bad": True,
        "overrides": ["finetune.epochs=30"],
    }
    # With a platform spec, KFP sends both documents of the package.
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    assert spec["pipelineInfo"]["name"] == "imtext"
    steps = set(spec["root"]["dag"]["tasks"])
    assert {"prepare", "pretrain", "finetune", "evaluate", "export", "register"} <= steps
    # The cluster settings travel with the spec; the credentials are never arguments.
    assert "imtext-credentials" in json.dumps(platform)
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(run["runtime_config"])
    default = spec["root"]["inputDefinitions"]["parameters"]["params"]["defaultValue"]
    assert yaml.safe_load(default) == yaml.safe_load((REPO / "params.yaml").read_text())
    assert f"{fake_kfp.url}/#/runs/details/run-1" in capsys.readouterr().out


def test_submit_reuses_an_existing_experiment_and_works_without_a_token(fake_kfp, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    fake_kfp.experiments.append({"experiment_id": "exp-7", "display_name": "imtext"})
    submit("--host", fake_kfp.url)
    methods = [(r.method, r.path) for r in fake_kfp.requests]
    assert methods == [
        ("GET", "/apis/v2beta1/healthz"),
        ("GET", "/apis/v2beta1/experiments"),
        ("POST", "/apis/v2beta1/runs"),
    ]
    run = fake_kfp.requests[-1]
    assert "authorization" not in run.headers
    assert run.body["experiment_id"] == "exp-7"
    assert run.body["display_name"].startswith("imtext ")
    assert run.body["runtime_config"].get("parameters", {}) == {}


def test_submit_reports_a_refused_run_in_one_line(fake_kfp):
    fake_kfp.fail_runs_with = 403
    with pytest.raises(ImtextError, match=f"{fake_kfp.url}: could not create the run: .*403"):
        submit("--host", fake_kfp.url)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--param", "dataset=s3://x"], "no parameter 'dataset'; it has annotations, data"),
        (["--param", "skip_bad=maybe"], "skip_bad takes a boolean value"),
        (["--param", "data"], "expected NAME=VALUE"),
        (["--param", "params={}"], "use --params FILE and --set"),
        (["--set", "finetune.epoch=2"], "no key 'epoch' in section 'finetune'"),
    ],
)
def test_bad_arguments_fail_before_any_request(fake_kfp, argv, message):
    with pytest.raises(ImtextError, match=message):
        submit("--host", fake_kfp.url, *argv)
    assert [r.path for r in fake_kfp.requests if r.path != "/apis/v2beta1/healthz"] == []


def test_submit_needs_an_endpoint(monkeypatch):
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    with pytest.raises(ImtextError, match="pass --host URL or set KF_PIPELINES_ENDPOINT"):
        submit()
