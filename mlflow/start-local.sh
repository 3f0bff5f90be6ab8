#!/usr/bin/env bash
# Start an MLflow tracking server on this machine, the same way the cluster runs it (k8s/): a
# database backend store and an artifact proxy (--serve-artifacts), here with SQLite and a local
# directory, or S3 when ARTIFACTS_DESTINATION is set.
#
#   mlflow/start-local.sh                  # http://127.0.0.1:5000, state in mlflow/local/
#   PORT=5001 mlflow/start-local.sh
#   ARTIFACTS_DESTINATION=s3://mlflow-artifacts MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000 \
#     AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... mlflow/start-local.sh
#
# HOST                   interface to bind (default 127.0.0.1: this machine only)
# PORT                   default 5000
# MLFLOW_LOCAL_DIR       state directory (default mlflow/local, ignored by git)
# BACKEND_STORE_URI      default sqlite:///<MLFLOW_LOCAL_DIR>/mlflow.db
# ARTIFACTS_DESTINATION  where the proxy stores artifacts (default <MLFLOW_LOCAL_DIR>/artifacts);
#                        for s3://..., the server (not the clients) needs AWS_ACCESS_KEY_ID,
#                        AWS_SECRET_ACCESS_KEY and, for MinIO or moto, MLFLOW_S3_ENDPOINT_URL
# WORKERS                server worker processes (default 1)
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION  default false: MLflow's background job runner (GenAI
#                        scorers, trace roll-ups; 7 more processes) has nothing to do for imtext
#
# The server runs in the foreground; Ctrl-C stops it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
host="${HOST:-127.0.0.1}"
port="${PORT:-5000}"
state="${MLFLOW_LOCAL_DIR:-$root/mlflow/local}"
mkdir -p "$state"
state="$(cd "$state" && pwd)"  # absolute, so the URIs below do not depend on the cwd
backend="${BACKEND_STORE_URI:-sqlite:///$state/mlflow.db}"
artifacts="${ARTIFACTS_DESTINATION:-$state/artifacts}"

if [[ -x "$root/.venv/bin/mlflow" ]]; then
    mlflow="$root/.venv/bin/mlflow"
elif command -v mlflow > /dev/null; then
    mlflow="$(command -v mlflow)"
else
    echo "start-local: no mlflow: run \`make install\` first (it creates .venv)" >&2
    exit 1
fi

case "$artifacts" in
    s3://*)
        if [[ -z "${AWS_ACCESS_KEY_ID:-}" || -z "${AWS_SECRET_ACCESS_KEY:-}" ]]; then
            echo "start-local: $artifacts needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" >&2
            exit 1
        fi
        ;;
    *://*) ;;
    *) mkdir -p "$artifacts" ;;
esac

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

cat << MSG
MLflow tracking server: backend $backend, artifacts $artifacts (proxied by the server)
In another shell:
  export MLFLOW_TRACKING_URI=http://$host:$port
MSG

exec "$mlflow" server \
    --backend-store-uri "$backend" \
    --artifacts-destination "$artifacts" \
    --serve-artifacts \
    --host "$host" \
    --port "$port" \
    --workers "${WORKERS:-1}"
