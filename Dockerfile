# syntax=docker/dockerfile:1.7
#
# The one imtext image: the package, its pinned dependencies and the GPU build of ONNX Runtime.
# Every Kubeflow component, the PyTorchJob in k8s/ and `docker run IMAGE finetune ...` use it.
#
#   docker/build-push.sh          # builds and pushes $IMTEXT_IMAGE (default ghcr.io/imtext/imtext:VERSION)
#
# Base: nvidia/cuda "base" flavour of CUDA 13.0, the CUDA major of the torch wheels in
# requirements.lock (nvidia-cuda-runtime 13.0.x, cuDNN cu13, NCCL cu13). It brings the CUDA runtime
# (cudart), the forward-compat libraries and the NVIDIA_* settings the container toolkit reads; the
# math libraries, cuDNN and NCCL come as the exact wheels torch and onnxruntime-gpu were tested with,
# so the larger "runtime"/"cudnn-runtime" flavours would only add a second, unused copy of them
# (about 2 GB). Needs an NVIDIA driver >= 580 on the node; runs on CPU-only nodes as well.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu22.04

# ---------------------------------------------------------------------------------------------
# pybase: Ubuntu 22.04 has no supported Python 3.11 (only a 3.11.0 release candidate), so take it
# from the deadsnakes PPA. Both later stages start here, so the venv's interpreter path matches.
# (Ubuntu 22.04 also leaves uid 1000 free for the runtime user; 24.04 images have `ubuntu` there.)
FROM ${CUDA_IMAGE} AS pybase
ARG DEBIAN_FRONTEND=noninteractive
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates gnupg software-properties-common; \
    add-apt-repository -y ppa:deadsnakes/ppa; \
    apt-get install -y --no-install-recommends python3.11 python3.11-venv tini; \
    apt-get purge -y --auto-remove software-properties-common gnupg; \
    rm -rf /var/lib/apt/lists/*; \
    python3.11 --version

# ---------------------------------------------------------------------------------------------
# build: everything goes into /opt/venv, which the runtime stage copies as a whole.
FROM pybase AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv /opt/venv
WORKDIR /build

# Layer 1, the dependencies (about 5 GB, torch + CUDA wheels): it depends on pyproject.toml and
# requirements.lock only, so a code change rebuilds and pushes just the small layer 2.
# Together the two layers are `pip install -c requirements.lock '.[gpu]'`: the project's
# dependencies plus its `gpu` extra, every version constrained by the lock file.
#
# The onnxruntime clash: onnxruntime (a dependency) and onnxruntime-gpu (the gpu extra) ship the
# same `onnxruntime` package directory, so whichever is installed last overwrites the other, and
# uninstalling one deletes files of the other. So remove both, then install only the GPU build
# with --no-deps (its dependencies are already in at the locked versions). It also runs on CPU.
COPY pyproject.toml requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eux; \
    python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["gpu"]))' \
        > requirements-image.txt; \
    pip install -c requirements.lock -r requirements-image.txt; \
    pip uninstall -y onnxruntime onnxruntime-gpu; \
    pip install --no-deps "$(grep '^onnxruntime-gpu==' requirements-image.txt)"

# Layer 2, the package itself (its dependencies are all in place: --no-deps keeps the swap above).
COPY README.md ./
COPY src ./src
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eux; \
    pip install --no-deps -c requirements.lock '.[gpu]'; \
    python -c 'import onnxruntime as ort; assert "CUDAExecutionProvider" in ort.get_available_providers(), ort.get_available_providers()'; \
    python -c 'import importlib.metadata as m; assert not any(d.metadata["Name"] == "onnxruntime" for d in m.distributions()), "CPU onnxruntime still installed"'; \
    python -c 'import imtext.cli, kfp, mlflow, dvc, torch'; \
    imtext --help > /dev/null

# ---------------------------------------------------------------------------------------------
# runtime
FROM pybase AS runtime
ARG CUDA_IMAGE
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG CREATED=unknown
# The commit the image was built from: .git stays out of the build context, so the registered
# versions learn it from this variable (imtext.registry.provenance.git_commit).
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="imtext" \
      org.opencontainers.image.description="Image-text retrieval (dual-path CNN, instance loss): the imtext package, the base image of every pipeline component" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${CUDA_IMAGE}"

# A fixed non-root uid/gid, the same as runAsUser/fsGroup in k8s/.
RUN groupadd --gid 1000 imtext \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/imtext --shell /bin/bash imtext

COPY --from=build /opt/venv /opt/venv

# PATH: `python`, `python3`, `imtext`, `torchrun`, `dvc`, `mlflow` are the venv's, so KFP's
# lightweight components (`python3 -m kfp.dsl.executor_main`) run with imtext and kfp importable.
# LD_LIBRARY_PATH: onnxruntime-gpu dlopens cuDNN/cuBLAS/cuFFT by soname; point it at the wheels'
# copies (torch finds them by its own rpath). PYTHONPATH: `components` importable from any cwd.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/imtext \
    MPLCONFIGDIR=/tmp/matplotlib \
    IMTEXT_GIT_COMMIT=${GIT_COMMIT}

# The KFP v2 launcher stages artifacts under /gcs, /minio and /s3 (a fixed contract of its Python
# components), which a non-root user could not create.
RUN mkdir -p /gcs /minio /s3 && chown 1000:1000 /gcs /minio /s3

# The pipeline definition beside the package; owned by root, so read-only for the runtime user
# (stages write to mounted volumes or artifact paths, never into /app).
WORKDIR /app
COPY params.yaml dvc.yaml ./
COPY components ./components
COPY pipelines ./pipelines

USER 1000:1000
# tini reaps the DataLoader workers and forwards SIGTERM (pod deletion) to the stage.
ENTRYPOINT ["tini", "--", "imtext"]
CMD ["--help"]
