#!/usr/bin/env bash
# Builds the virtual environment that runs the lm-evaluation-harness peer of bench/eval_throughput.py.
#
#   bash bench/peers/lmeval_env.sh [VENV_DIR]     (default: .bench-envs/lmeval in the repository)
#
# lm-eval lives here and never in the project's .venv. Installed: lm-eval 0.4.13 with its "hf" extra
# (transformers, torch, accelerate, peft), the CPU wheel of torch 2.13.0 and transformers 5.23.0 (the versions the
# project itself uses, so both tools load the checkpoint with the same code). torch is always constrained: an
# unpinned torch would pull the CUDA build (several GB). The constraints below are the full set that was installed
# and run together. Idempotent: a stamp file marks a finished build. Silent on success; on failure the pip log
# goes to stderr.
set -euo pipefail

VENV="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.bench-envs/lmeval}"
STAMP="$VENV/.lm-eval-0.4.13-torch-2.13.0-transformers-5.23.0.installed"
[[ -f "$STAMP" ]] && exit 0

PY="${PYTHON:-python3}"
mkdir -p "$(dirname "$VENV")"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
CONSTRAINTS="$WORK/constraints.txt"
cat > "$CONSTRAINTS" <<'PINS'
torch==2.13.0
lm_eval==0.4.13
absl-py==2.5.1
accelerate==1.15.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
attrs==26.1.0
certifi==2026.10.18
chardet==6.0.0.post1
charset-normalizer==3.5.2
click==8.5.1
cloudpickle==3.1.2
colorama==0.4.6
DataProperty==1.1.1
datasets==5.2.0
defusedxml==0.7.1
dill==0.4.1
evaluate==0.4.6
filelock==4.2.11
frozenlist==1.8.0
fsspec==2026.9.0
h11==0.16.0
hf-xet==1.8.0
httpcore2==2.16.2
httpx2==2.16.2
huggingface_hub==2.4.0
idna==3.20
Jinja2==3.1.6
joblib==1.6.0
lxml==6.1.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mbstrdecoder==1.1.5
mdurl==0.1.2
more-itertools==11.2.1
mpmath==1.3.0
multidict==7.2.1
multiprocess==0.70.19
narwhals==2.29.0
networkx==3.6.1
nltk==3.10.4
numpy==2.4.6
packaging==26.3
pandas==3.1.1
pathvalidate==3.3.1
peft==0.21.2
portalocker==4.4.2
propcache==0.5.4
psutil==7.2.2
pyarrow==26.0.1
pydantic==2.14.3
pydantic_core==2.50.4
Pygments==2.21.0
pytablewriter==1.2.1
python-dateutil==2.9.0.post0
pytz==2026.6
PyYAML==6.0.3
regex==2026.11.15
requests==2.34.2
rich==15.0.0
rouge_score==0.1.2
sacrebleu==2.6.0
safetensors==0.8.0
scikit-learn==1.9.1
scipy==1.17.1
shellingham==1.5.4
six==1.17.0
sqlitedict==2.1.0
sympy==1.14.0
tabledata==1.3.5
tabulate==0.10.0
tcolorpy==0.1.7
threadpoolctl==3.8.0
tokenizers==0.23.3
tqdm==4.70.1
transformers==5.23.0
truststore==0.10.5
typepy==1.3.5
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
word2number==1.1
xxhash==4.1.0
yarl==1.25.1
PINS

if ! "$VENV/bin/pip" install -q -c "$CONSTRAINTS" "lm-eval[hf]==0.4.13" torch==2.13.0 transformers==5.23.0 \
        >"$WORK/pip.log" 2>&1; then
    grep -v "^WARNING: Location .* is ignored" "$WORK/pip.log" >&2 || true
    echo "lm-eval environment: pip install failed ($VENV)" >&2
    exit 1
fi

# Fail here, not mid-benchmark, if anything the peer touches is missing or would need the network.
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$VENV/bin/python" - <<'PY'
import torch
import transformers  # noqa: F401
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

assert get_model("hf") is HFLM
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert torch.version.cuda is None, "expected the CPU build of torch"
PY

touch "$STAMP"
