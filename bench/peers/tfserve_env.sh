#!/usr/bin/env bash
# Builds the virtual environment that runs the `transformers serve` peer of bench/serve_throughput.py.
#
#   bash bench/peers/tfserve_env.sh [VENV_DIR]     (default: .bench-envs/tfserve in the repository)
#
# Hugging Face transformers' own OpenAI-compatible server lives here and never in the project's .venv. Installed:
# transformers 5.23.0 with its "serving" extra (fastapi, uvicorn, starlette, pydantic, openai, rich, accelerate; the
# `transformers serve` command refuses to start without them) and the CPU wheel of torch 2.13.0. torch is always
# constrained: an unpinned torch would pull the CUDA build (several GB). The constraints below are the full set
# that was installed and run together (pip freeze; it lists torch as 2.13.0+cpu, the local CPU build). Idempotent:
# a stamp file marks a finished build. Silent on success; on failure the pip log goes to stderr. About a minute
# from nothing on a 2-core machine with a warm pip cache.
set -euo pipefail

VENV="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.bench-envs/tfserve}"
STAMP="$VENV/.transformers-serving-5.23.0-torch-2.13.0.installed"
[[ -f "$STAMP" ]] && exit 0

PY="${PYTHON:-python3}"
mkdir -p "$(dirname "$VENV")"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
CONSTRAINTS="$WORK/constraints.txt"
cat > "$CONSTRAINTS" <<'PINS'
torch==2.13.0
accelerate==1.15.0
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
click==8.5.1
fastapi==0.165.0
filelock==4.3.1
fsspec==2026.9.0
h11==0.16.0
hf-xet==1.8.0
httpcore2==2.16.2
httpx2==2.16.2
huggingface_hub==2.4.0
idna==3.20
Jinja2==3.1.6
jiter==0.19.0
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mdurl==0.1.2
mpmath==1.3.0
networkx==3.6.1
numpy==2.4.6
openai==3.57.0
opentelemetry-api==1.45.2
packaging==26.4
psutil==7.2.2
pydantic==2.14.4
pydantic_core==2.50.5
Pygments==2.21.0
PyYAML==6.0.4
regex==2026.11.19
rich==15.0.0
safetensors==0.8.0
shellingham==1.5.4
sniffio==1.3.1
starlette==1.10.0
sympy==1.14.0
tokenizers==0.23.3
tqdm==4.70.1
transformers==5.23.0
truststore==0.10.5
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
uvicorn==0.54.0
PINS

if ! "$VENV/bin/pip" install -q -c "$CONSTRAINTS" "transformers[serving]==5.23.0" torch==2.13.0 \
        >"$WORK/pip.log" 2>&1; then
    grep -v "^WARNING: Location .* is ignored" "$WORK/pip.log" >&2 || true
    echo "transformers serve environment: pip install failed ($VENV)" >&2
    exit 1
fi

# Fail here, not mid-benchmark, if anything the server needs is missing or would need the network.
HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'PY'
import torch
import transformers
from transformers.cli.serve import Serve  # noqa: F401
from transformers.cli.serving.chat_completion import ChatCompletionHandler  # noqa: F401
from transformers.utils.import_utils import is_serve_available

assert is_serve_available(), "transformers serve's dependencies (fastapi, uvicorn, pydantic, openai) are missing"
assert transformers.__version__ == "5.23.0", transformers.__version__
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert torch.version.cuda is None, "expected the CPU build of torch"
PY
HF_HUB_OFFLINE=1 "$VENV/bin/transformers" serve --help >/dev/null

touch "$STAMP"
