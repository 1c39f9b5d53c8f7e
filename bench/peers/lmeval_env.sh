#!/usr/bin/env bash
# Build the virtual environment lm-evaluation-harness runs in for bench/eval_throughput.py (never the project's
# .venv): lm-eval with its hf backend on the CPU build of torch. Usage: lmeval_env.sh [VENV]
set -euo pipefail
VENV="${1:-$(cd "$(dirname "$0")/../.." && pwd)/.bench-envs/lmeval}"
STAMP="$VENV/.lm-eval-0.4.13.installed"
[ -f "$STAMP" ] && exit 0
PY="${PYTHON:-python3}"
"$PY" -m venv "$VENV"
CONSTRAINTS="$(mktemp)"
echo "torch==2.13.0" > "$CONSTRAINTS"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" "lm-eval==0.4.13" "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import lm_eval, torch, transformers" >/dev/null
rm -f "$CONSTRAINTS"
touch "$STAMP"
