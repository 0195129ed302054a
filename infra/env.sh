# Source this to talk to tinymod's local services: `source infra/env.sh`.
# Ports can be moved with TINYMOD_PREFECT_PORT / TINYMOD_MLFLOW_PORT / TINYMOD_S3_PORT.
TINYMOD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export TINYMOD_ROOT
export PATH="$TINYMOD_ROOT/.venv/bin:$PATH"
export PREFECT_HOME="$TINYMOD_ROOT/.prefect"
export PREFECT_API_URL="http://127.0.0.1:${TINYMOD_PREFECT_PORT:-4200}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export TINYMOD_MLFLOW_URL="http://127.0.0.1:${TINYMOD_MLFLOW_PORT:-5000}"
export TINYMOD_S3_URL="http://127.0.0.1:${TINYMOD_S3_PORT:-9000}"
