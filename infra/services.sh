#!/usr/bin/env bash
# tinymod's local services, on loopback:   infra/services.sh start | stop | status
#
#   Prefect server    SQLite under .prefect/             http://127.0.0.1:4200
#   Prefect worker    process work pool `tinymod-local`, deployment distill-pipeline/local
#   MLflow server     the pipeline's own store (.mlflow/mlflow.db + .mlflow/artifacts)  http://127.0.0.1:5000
#   S3 endpoint       localbucket, buckets as folders under .cache/s3/  http://127.0.0.1:9000
#
# Logs and pids are in .cache/services/. Then: `source infra/env.sh` and
# `prefect deployment run distill-pipeline/local --watch`.
set -euo pipefail
cd "$(dirname "$0")/.."
source infra/env.sh
RUN=.cache/services
POOL=tinymod-local
mkdir -p "$RUN" "$PREFECT_HOME" .mlflow/artifacts .cache/s3

launch() {  # launch NAME COMMAND...: in its own session, so `stop` can signal the whole group
    local name=$1; shift
    if [[ -f $RUN/$name.pid ]] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
        echo "$name: already running (pid $(cat "$RUN/$name.pid"))"; return
    fi
    setsid "$@" >"$RUN/$name.log" 2>&1 < /dev/null &
    echo $! >"$RUN/$name.pid"
    echo "$name: started (pid $!, log $RUN/$name.log)"
}

wait_http() {  # wait_http NAME URL SECONDS
    local deadline=$((SECONDS + $3))
    until python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$2" 2>/dev/null; do
        if ((SECONDS > deadline)); then echo "$1: not ready at $2 after $3 s; see $RUN/$1.log" >&2; exit 1; fi
        sleep 1
    done
    echo "$1: ready at $2"
}

start() {
    launch prefect-server prefect server start --host 127.0.0.1 --port "${TINYMOD_PREFECT_PORT:-4200}"
    launch mlflow env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server \
        --backend-store-uri "sqlite:///$TINYMOD_ROOT/.mlflow/mlflow.db" \
        --artifacts-destination "$TINYMOD_ROOT/.mlflow/artifacts" \
        --host 127.0.0.1 --port "${TINYMOD_MLFLOW_PORT:-5000}"
    launch s3 localbucket --host 127.0.0.1 --port "${TINYMOD_S3_PORT:-9000}" .cache/s3
    wait_http prefect-server "${PREFECT_API_URL}/health" 120
    prefect --no-prompt work-pool create "$POOL" --type process --overwrite >/dev/null
    prefect --no-prompt deploy --all >"$RUN/deploy.log" 2>&1 || { cat "$RUN/deploy.log" >&2; exit 1; }
    echo "deployment: distill-pipeline/local on pool $POOL"
    launch worker prefect worker start --pool "$POOL"
    wait_http mlflow "$TINYMOD_MLFLOW_URL/health" 120
    wait_http s3 "$TINYMOD_S3_URL/" 30
    echo
    echo "Prefect UI: http://127.0.0.1:${TINYMOD_PREFECT_PORT:-4200}   MLflow UI: $TINYMOD_MLFLOW_URL   S3: $TINYMOD_S3_URL"
    echo "Next: source infra/env.sh && prefect deployment run distill-pipeline/local --watch"
}

stop() {
    # All at once, each signal to every process group that is still alive, so stopping takes as
    # long as the slowest service, not their sum. The worker ignores SIGTERM; SIGINT stops it.
    local names=() pids=()
    for name in worker s3 mlflow prefect-server; do
        local pidfile=$RUN/$name.pid
        [[ -f $pidfile ]] || continue
        local pid; pid=$(cat "$pidfile")
        rm -f "$pidfile"
        kill -0 "$pid" 2>/dev/null || continue
        names+=("$name"); pids+=("$pid")
    done
    for signal in INT TERM KILL; do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && { kill -"$signal" -- "-$pid" 2>/dev/null || true; alive=1; }; done
        ((alive)) || break
        for _ in $(seq 40); do
            alive=0
            for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
            ((alive)) || break
            sleep 0.25
        done
    done
    for name in "${names[@]}"; do echo "$name: stopped"; done
}

status() {
    for name in prefect-server worker mlflow s3; do
        if [[ -f $RUN/$name.pid ]] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
            echo "$name: running (pid $(cat "$RUN/$name.pid"))"
        else
            echo "$name: stopped"
        fi
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: infra/services.sh start | stop | status" >&2; exit 2 ;;
esac
