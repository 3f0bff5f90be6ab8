"""Refuse to deploy an overlay whose secrets still hold the placeholders of k8s/base.

    python k8s/check_secrets.py OVERLAY [--allow-placeholders]

Renders OVERLAY with `kubectl kustomize` (as `kubectl apply -k` would) and checks every Secret in
it: no value may contain the placeholder marker "change-me" or be empty, MLflow passwords need 12
characters (MLflow refuses shorter ones), and the PostgreSQL user and password must be URL-safe
(they are spliced into MLflow's database URI). Exit status 0 when all pass, 1 naming each secret
and key that does not, 2 when the overlay does not render. `make deploy` runs it before
`kubectl apply -k`. --allow-placeholders reports the same and exits 0: for a throw-away cluster
(kind, minikube) only.

Needs kubectl (or $KUBECTL) and PyYAML (in the project's .venv; else `pip install pyyaml`).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import re
import subprocess
import sys

PLACEHOLDER = "change-me"
MLFLOW_PASSWORDS = {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"}
MLFLOW_MIN_PASSWORD = 12
URL_SAFE_KEYS = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")  # RFC 3986 unreserved: needs no percent-encoding
HOW = "replace it in your own overlay (k8s/README.md, 'Secrets')"


def render(overlay: str) -> list[dict]:
    try:
        import yaml
    except ImportError:
        raise SystemExit(
            "check_secrets: needs PyYAML: `make install`, or `pip install pyyaml`"
        ) from None
    kubectl = os.environ.get("KUBECTL", "kubectl")
    try:
        result = subprocess.run(
            [kubectl, "kustomize", overlay], capture_output=True, text=True, timeout=120
        )
    except FileNotFoundError:
        raise SystemExit(
            f"check_secrets: {kubectl} not found: install kubectl or set $KUBECTL"
        ) from None
    if result.returncode != 0:
        print(f"check_secrets: `{kubectl} kustomize {overlay}` failed:", file=sys.stderr)
        print(result.stderr.strip(), file=sys.stderr)
        sys.exit(2)
    return [doc for doc in yaml.safe_load_all(result.stdout) if isinstance(doc, dict)]


def secret_values(secret: dict) -> dict[str, str | None]:
    """key -> value (None when `data` is not base64 of UTF-8 text)."""
    values: dict[str, str | None] = {}
    for key, encoded in (secret.get("data") or {}).items():
        try:
            values[key] = base64.b64decode(encoded or "", validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            values[key] = None
    values.update(
        {k: "" if v is None else str(v) for k, v in (secret.get("stringData") or {}).items()}
    )
    return values


def problems(objects: list[dict]) -> list[str]:
    """One line per secret key that must not be deployed as it is."""
    found = []
    for secret in (o for o in objects if o.get("kind") == "Secret"):
        name = secret.get("metadata", {}).get("name", "?")
        for key, value in sorted(secret_values(secret).items()):
            where = f"Secret {name}, key {key}"
            if value is None:
                continue  # binary data (a keystore, ...): nothing here is a placeholder
            if PLACEHOLDER in value.lower():
                found.append(f"{where}: still a placeholder (contains {PLACEHOLDER!r}): {HOW}")
            elif not value.strip():
                found.append(f"{where}: empty: {HOW}")
            elif key in MLFLOW_PASSWORDS and len(value) < MLFLOW_MIN_PASSWORD:
                found.append(
                    f"{where}: {len(value)} characters; MLflow needs at least "
                    f"{MLFLOW_MIN_PASSWORD}: {HOW}"
                )
            elif key in URL_SAFE_KEYS and not URL_SAFE.fullmatch(value):
                found.append(
                    f"{where}: has characters that are not URL-safe; MLflow puts it in a "
                    f"database URI: use letters, digits and . _ ~ - only"
                )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overlay", help="kustomize directory to check, e.g. k8s/overlays/gpu")
    parser.add_argument(
        "--allow-placeholders",
        action="store_true",
        help="report but do not fail (a throw-away local cluster only)",
    )
    args = parser.parse_args(argv)
    objects = render(args.overlay)
    found = problems(objects)
    secrets = sum(o.get("kind") == "Secret" for o in objects)
    if not found:
        print(f"check_secrets: {args.overlay}: {secrets} secrets, no placeholders")
        return 0
    label = "warning" if args.allow_placeholders else "error"
    for line in found:
        print(f"check_secrets: {label}: {args.overlay}: {line}", file=sys.stderr)
    if args.allow_placeholders:
        print(
            "check_secrets: --allow-placeholders: not for a cluster that matters", file=sys.stderr
        )
        return 0
    print(
        f"check_secrets: {args.overlay}: {len(found)} secret value(s) not fit to deploy; "
        "refusing to deploy it",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
