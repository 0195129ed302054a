#!/usr/bin/env bash
# Create .venv with the whole pinned stack. Needs only python3.11 and a package registry.
# torch comes from the local CPU wheel folder that pip is configured with (pip config's
# find-links); uv does not read pip's config, so it is passed explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -m uv --version >/dev/null 2>&1 && ! command -v uv >/dev/null 2>&1; then
    echo "bootstrap: installing uv" >&2
    python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
fi
if command -v uv >/dev/null 2>&1; then UV=(uv); else UV=(python3 -m uv); fi

links="${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}"
links_args=()
for folder in $links; do links_args+=(--find-links "$folder"); done

"${UV[@]}" venv --quiet --allow-existing --python 3.11 .venv
# Bytecode compiled at install: environments that set PYTHONDONTWRITEBYTECODE would otherwise
# recompile torch and transformers in every process (a DeepSpeed job starts several).
"${UV[@]}" pip sync --quiet --compile-bytecode --python .venv/bin/python "${links_args[@]}" requirements.lock
"${UV[@]}" pip install --quiet --python .venv/bin/python --no-deps -e .
# DeepSpeed's CPU op, compiled once here rather than in the pipeline's first job (tasks/training.py).
.venv/bin/python -c "from tasks.training import build_deepspeed_ops; build_deepspeed_ops()"
touch .venv/.installed
