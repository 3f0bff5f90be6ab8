"""Create, or set the password of, the MLflow user that pipeline steps log in as.

Run by the Job imtext-mlflow-setup (mlflow-setup-job.yaml) in MLflow's own image, so it uses the
standard library only. It signs in as the admin and makes MLFLOW_TRACKING_USERNAME exist with
MLFLOW_TRACKING_PASSWORD (both from the secret imtext-credentials): run it again after changing
that secret. The user is not an admin; with default_permission = READ it may read everything and
manage what it creates (the experiment and the registered model of the first pipeline run).

Environment: MLFLOW_TRACKING_URI, MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD,
MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD.
"""

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

NEEDED = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


def call(base: str, admin: str, method: str, path: str, body: dict | None = None) -> int:
    """HTTP status of one request to the server as the admin (errors come back as statuses)."""
    request = urllib.request.Request(
        f"{base}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": admin, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:300]
        if error.code != 404:
            print(f"{method} {path}: HTTP {error.code}: {detail}", file=sys.stderr)
        return error.code


def main() -> int:
    missing = [name for name in NEEDED if not os.environ.get(name)]
    if missing:
        print(f"create_user.py: set {', '.join(missing)}", file=sys.stderr)
        return 2
    env = {name: os.environ[name] for name in NEEDED}
    user, password = env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    if user == env["MLFLOW_AUTH_ADMIN_USERNAME"]:
        print(
            f"MLFLOW_TRACKING_USERNAME is the admin {user!r}: give the pipeline a user of its own "
            "(secret imtext-credentials)",
            file=sys.stderr,
        )
        return 2
    base = env["MLFLOW_TRACKING_URI"].rstrip("/")
    login = f"{env['MLFLOW_AUTH_ADMIN_USERNAME']}:{env['MLFLOW_AUTH_ADMIN_PASSWORD']}"
    admin = "Basic " + base64.b64encode(login.encode()).decode()

    # The server may still be starting (or migrating its database); the Job's
    # activeDeadlineSeconds bounds the wait.
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=10):
                break
        except OSError as error:
            print(f"waiting for {base}/health: {error}")
            time.sleep(5)

    users = "/api/2.0/mlflow/users"
    status = call(base, admin, "GET", f"{users}/get?" + urllib.parse.urlencode({"username": user}))
    if status == 200:
        body = {"username": user, "password": password}
        status = call(base, admin, "PATCH", f"{users}/update-password", body)
        action = "password set"
    elif status == 404:
        status = call(
            base, admin, "POST", f"{users}/create", {"username": user, "password": password}
        )
        action = "created"
    if status != 200:
        print(f"MLflow user {user!r}: failed (HTTP {status})", file=sys.stderr)
        return 1
    print(f"MLflow user {user!r}: {action}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
