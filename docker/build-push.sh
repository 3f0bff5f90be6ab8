#!/usr/bin/env bash
# Build the imtext image from the repository's Dockerfile and push it.
#
#   docker/build-push.sh               # build + push $IMTEXT_IMAGE
#   PUSH=0 docker/build-push.sh        # build only (load into the local engine)
#   IMTEXT_IMAGE=registry.example/team/imtext:0.1.0-rc1 docker/build-push.sh
#
# IMTEXT_IMAGE   the image reference; the single source of it for the pipeline, k8s/ and this
#                script. Default: ghcr.io/imtext/imtext:<version in pyproject.toml>.
# PUSH           1 (default) pushes after building; 0 builds only.
# PLATFORM       default linux/amd64 (the CUDA wheels of requirements.lock are x86_64).
# CONTAINER_ENGINE  docker (default, needs buildx) or podman.
#
# Prints the pushed reference, and with docker its digest form (IMAGE@sha256:...) to pin in a run.
# Log in to the registry first (`docker login ghcr.io`); no credentials are read here.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

version="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)"
if [[ -z "$version" ]]; then
    echo "build-push: no version in pyproject.toml" >&2
    exit 1
fi
image="${IMTEXT_IMAGE:-ghcr.io/imtext/imtext:${version}}"
name="${image##*/}"  # the last path component holds the tag (a registry may have a :port)
if [[ "$name" != *:* || "$name" == *@* ]]; then
    echo "build-push: $image needs a tag and no digest (for example :$version)" >&2
    exit 1
fi
if [[ "$name" == *:latest ]]; then
    echo "build-push: refusing the tag 'latest' ($image): pipeline runs must name an exact image" >&2
    exit 1
fi

engine="${CONTAINER_ENGINE:-docker}"
platform="${PLATFORM:-linux/amd64}"
push="${PUSH:-1}"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git status --porcelain 2>/dev/null || true)" ]]; then
    revision="${revision}-dirty"
fi
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

build_args=(
    --platform "$platform"
    --build-arg "VERSION=$version"
    --build-arg "VCS_REF=$revision"
    --build-arg "GIT_COMMIT=$revision"
    --build-arg "CREATED=$created"
    --tag "$image"
    --file Dockerfile
)

echo "build-push: building $image (imtext $version, revision $revision, $platform)" >&2
if [[ "$engine" == "docker" ]]; then
    if [[ "$push" == "1" ]]; then
        docker buildx build "${build_args[@]}" --push .
    else
        docker buildx build "${build_args[@]}" --load .
    fi
else
    "$engine" build "${build_args[@]}" .
    if [[ "$push" == "1" ]]; then
        "$engine" push "$image"
    fi
fi

echo "$image"
if [[ "$push" == "1" && "$engine" == "docker" ]]; then
    digest="$(docker buildx imagetools inspect "$image" --format '{{json .Manifest.Digest}}' 2>/dev/null | tr -d '"' || true)"
    if [[ -n "$digest" ]]; then
        echo "${image%:*}@${digest}"
    fi
fi
