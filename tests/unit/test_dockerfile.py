"""Static checks of the image definition: Dockerfile, .dockerignore and docker/build-push.sh.

No container engine is needed: the Dockerfile is parsed as text, and build-push.sh runs against a
stub `docker` that records its arguments.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|API_KEY", re.I)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comment lines dropped."""
    result: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # Docker drops comment lines, also inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
        current = ""
    return result


def stages(parsed: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (FROM included), in order."""
    result: list[list[tuple[str, str]]] = []
    for keyword, args in parsed:
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def global_args(parsed) -> dict[str, str]:
    """ARG defaults declared before the first FROM (the only ones FROM lines can use)."""
    args = {}
    for keyword, value in parsed:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in value:
            name, default = value.split("=", 1)
            args[name] = default
    return args


def resolve(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def external_images(parsed, global_args) -> list[str]:
    """Images pulled from a registry: FROM targets that are not earlier stages, COPY --from=IMAGE."""
    names: set[str] = set()
    images = []
    for keyword, value in parsed:
        if keyword == "FROM":
            words = value.split()
            words = [w for w in words if not w.startswith("--platform")]
            image = resolve(words[0], global_args)
            if image not in names:
                images.append(image)
            if len(words) >= 3 and words[1].upper() == "AS":
                names.add(words[2])
        elif keyword == "COPY":
            match = re.search(r"--from=(\S+)", value)
            if match and match.group(1) not in names and not match.group(1).isdigit():
                images.append(match.group(1))
    return images


def test_base_image_is_a_cuda_runtime_matching_the_torch_wheels(parsed, global_args):
    first_from = next(value for keyword, value in parsed if keyword == "FROM")
    base = resolve(first_from.split()[0], global_args)
    match = re.fullmatch(
        r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(base|runtime|cudnn-runtime)-ubuntu(\d+\.\d+)", base
    )
    assert match, f"base image {base} is not an nvidia/cuda runtime image (no devel images)"
    lock = (REPO / "requirements.lock").read_text()
    locked_cuda = re.search(r"^nvidia-cuda-runtime==(\d+)\.(\d+)", lock, re.M)
    assert locked_cuda, "requirements.lock pins no nvidia-cuda-runtime (torch's CUDA wheels)"
    assert match.group(1) == locked_cuda.group(1), (
        f"base image CUDA {match.group(1)} differs from the CUDA {locked_cuda.group(1)} of torch"
    )


def test_every_external_image_has_a_tag_that_is_not_latest(parsed, global_args):
    images = external_images(parsed, global_args)
    assert images
    for image in images:
        name = image.rsplit("/", 1)[-1]
        assert ":" in name or "@" in name, f"{image}: no tag"
        assert not name.endswith(":latest"), f"{image}: 'latest' is not reproducible"
    assert "latest" not in re.findall(r":(\w+)", DOCKERFILE.read_text())


def test_final_stage_runs_as_a_non_root_user(parsed):
    final = stages(parsed)[-1]
    users = [value for keyword, value in final if keyword == "USER"]
    assert users, "the runtime stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    keywords = [keyword for keyword, _ in final]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")


def test_installs_the_package_with_the_lock_file_and_the_gpu_onnxruntime(parsed):
    runs = [value for keyword, value in parsed if keyword == "RUN"]
    installs = [cmd for run in runs for cmd in re.split(r";|&&", run) if "pip install" in cmd]
    package_installs = [cmd for cmd in installs if re.search(r"'?\.(\[[a-z,]*gpu[a-z,]*\])'?", cmd)]
    assert package_installs, "the package is not installed with its gpu extra ('.[gpu]')"
    for cmd in installs:
        if "--no-deps" not in cmd:
            assert "-c requirements.lock" in cmd, f"unconstrained install: {cmd.strip()}"
    # The gpu extra (onnxruntime-gpu) is in pyproject.toml; the Dockerfile reads it from there.
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(req.startswith("onnxruntime-gpu==") for req in extra["optional-dependencies"]["gpu"])
    text = " ".join(runs)
    assert 'optional-dependencies"]["gpu"]' in text or ".[gpu]" in text


def test_the_onnxruntime_clash_ends_with_only_the_gpu_build(parsed):
    commands = [
        cmd.strip()
        for keyword, value in parsed
        if keyword == "RUN"
        for cmd in re.split(r";|&&", value)
    ]
    uninstall = next(i for i, c in enumerate(commands) if c.startswith("pip uninstall"))
    assert {"onnxruntime", "onnxruntime-gpu"} <= set(shlex.split(commands[uninstall]))
    reinstall = next(
        i
        for i, c in enumerate(commands)
        if i > uninstall and c.startswith("pip install") and "onnxruntime-gpu" in c
    )
    assert "--no-deps" in commands[reinstall]
    later = [c for c in commands[reinstall + 1 :] if c.startswith("pip install")]
    assert all("--no-deps" in c for c in later), "a later install would bring onnxruntime back"
    assert any("CUDAExecutionProvider" in c for c in commands[reinstall:])


def test_no_credentials_in_env_or_args(parsed):
    for keyword, value in parsed:
        if keyword in {"ENV", "ARG"}:
            names = re.findall(r"(?:^|\s)(\w+)(?==)", value) or [value.split()[0]]
            for name in names:
                assert not CREDENTIAL_NAME.search(name), f"{keyword} {name}: credentials in image"
    text = DOCKERFILE.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert "PRIVATE KEY" not in text


def test_runtime_stage_layout(parsed):
    final = stages(parsed)[-1]
    copied = " ".join(value for keyword, value in final if keyword == "COPY")
    for entry in ("params.yaml", "dvc.yaml", "components", "pipelines", "/opt/venv"):
        assert entry in copied, f"{entry} not copied into the runtime stage"
    assert any(keyword == "WORKDIR" for keyword, _ in final)
    env = " ".join(value for keyword, value in final if keyword == "ENV")
    assert re.search(r"PATH=/opt/venv/bin:", env), "the venv's python must come first on PATH"
    entrypoint = next(value for keyword, value in final if keyword == "ENTRYPOINT")
    assert json.loads(entrypoint)[-1] == "imtext"  # exec form, the CLI last
    labels = " ".join(value for keyword, value in parsed if keyword == "LABEL")
    for key in ("title", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_keeps_local_state_out_and_the_needed_files_in():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for entry in (".git", ".venv", "data", "artifacts", "mlruns", ".dvc/cache", "**/*.env"):
        assert entry in patterns, f"{entry} is not in .dockerignore"
    copied = re.findall(r"^COPY (?!--from)(.+?) \S+$", DOCKERFILE.read_text(), re.M)
    for sources in copied:
        for source in sources.split():
            if not source.startswith("--"):
                assert source.rstrip("/") not in patterns, f"{source} is copied but ignored"
                assert (REPO / source).exists(), f"COPY {source}: no such file"


# docker/build-push.sh ---------------------------------------------------------------------------

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
DEFAULT_IMAGE = f"ghcr.io/imtext/imtext:{VERSION}"


def stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def build_push(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run build-push.sh with stub `docker` and `git` first on PATH; return the docker calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "docker.log"
    stub(
        bin_dir / "docker",
        f'echo "$*" >> {log}\n'
        'if [[ "$*" == *"imagetools inspect"* ]]; then echo \'"sha256:0123"\'; fi\n',
    )
    stub(bin_dir / "git", 'if [[ "$1" == rev-parse ]]; then echo abc123; fi\n')
    full_env = {
        **{k: v for k, v in os.environ.items() if k not in {"IMTEXT_IMAGE", "PUSH"}},
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        **env,
    }
    result = subprocess.run(
        ["bash", str(REPO / "docker" / "build-push.sh")],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def test_build_push_defaults_to_the_versioned_ghcr_reference(tmp_path):
    result, calls = build_push(tmp_path)
    assert result.returncode == 0, result.stderr
    build = calls[0]
    assert build.startswith("buildx build") and build.endswith("--push .")
    assert f"--tag {DEFAULT_IMAGE}" in build
    assert f"--build-arg VERSION={VERSION}" in build and "--build-arg VCS_REF=abc123" in build
    assert result.stdout.splitlines() == [DEFAULT_IMAGE, "ghcr.io/imtext/imtext@sha256:0123"]


def test_build_push_takes_the_reference_from_imtext_image(tmp_path):
    image = "registry.example:5000/team/imtext:0.1.0-rc1"
    result, calls = build_push(tmp_path, IMTEXT_IMAGE=image, PUSH="0")
    assert result.returncode == 0, result.stderr
    assert f"--tag {image}" in calls[0] and calls[0].endswith("--load .")
    assert len(calls) == 1  # no push, no digest lookup
    assert result.stdout.strip() == image


@pytest.mark.parametrize("image", ["ghcr.io/imtext/imtext:latest", "ghcr.io/imtext/imtext"])
def test_build_push_refuses_latest_and_untagged_references(tmp_path, image):
    result, calls = build_push(tmp_path, IMTEXT_IMAGE=image)
    assert result.returncode != 0 and calls == []
    assert image in result.stderr
