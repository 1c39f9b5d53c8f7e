#!/usr/bin/env bash
# Builds the virtual environment that runs the datatrove peer of bench/curate_throughput.py.
#
#   bash bench/peers/datatrove_env.sh [VENV_DIR]     (default: .bench-envs/datatrove in the repository)
#
# datatrove lives here and never in the project's .venv. Besides datatrove itself this installs only
# what its MinHash dedup and Gopher filters need to run with no network:
#   spacy   - English word tokenizer (datatrove maps "eng" to SpaCyTokenizer("en"), i.e. spacy.blank("en");
#             a rule-based tokenizer shipped inside the spacy wheel, no model download)
#   regex   - imported by datatrove.utils.text / word_tokenizers
#   xxhash  - MinhashConfig's default HashConfig(hash_fc="xxhash"); datatrove asks for xxhash<4
#   orjson  - JsonlReader / JsonlWriter
#   tokenizers - imported by datatrove.pipeline.dedup/__init__.py (exact_substrings), so importing the
#             minhash steps fails without it; it is never called by this pipeline
# nltk is not needed for English. No torch.
# The constraints below are the full set that was installed and run together.
set -euo pipefail

VENV="${1:-/work/main/.bench-envs/datatrove}"
STAMP="$VENV/.datatrove-0.10.1.installed"

if [[ -f "$STAMP" ]]; then
    echo "datatrove env ready: $VENV"
    exit 0
fi

PY="${PYTHON:-python3}"
mkdir -p "$(dirname "$VENV")"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat > "$CONSTRAINTS" <<'EOF'
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
blis==1.3.4
catalogue==2.0.10
certifi==2026.10.18
charset-normalizer==3.5.2
click==8.5.1
cloudpathlib==0.26.0
confection==1.3.4
cymem==2.0.16
dill==0.4.1
filelock==4.2.11
fsspec==2026.9.0
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httpcore2==2.16.2
httpx==0.28.1
httpx2==2.16.2
huggingface_hub==2.4.0
humanize==4.17.0
idna==3.20
Jinja2==3.1.6
loguru==0.7.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mdurl==0.1.2
multiprocess==0.70.19
murmurhash==1.0.16
numpy==2.4.6
packaging==26.3
preshed==3.0.15
pydantic==2.14.3
pydantic_core==2.50.4
Pygments==2.21.0
PyYAML==6.0.3
requests==2.34.2
rich==15.0.0
shellingham==1.5.4
smart_open==9.0.2
spacy-legacy==3.0.12
spacy-loggers==1.0.5
srsly==2.5.6
thinc==8.3.14
tqdm==4.70.1
truststore==0.10.5
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
wasabi==1.1.3
weasel==1.0.1
wrapt==2.5.2
EOF

"$VENV/bin/pip" install -q -c "$CONSTRAINTS" \
    datatrove==0.10.1 \
    spacy==3.8.18 \
    regex==2026.11.15 \
    xxhash==3.8.2 \
    orjson==3.13.0 \
    tokenizers==0.23.3

# Fail here, not mid-benchmark, if anything the peer touches is missing or would need the network.
HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'EOF'
from datatrove.executor import LocalPipelineExecutor  # noqa: F401
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter  # noqa: F401
from datatrove.pipeline.readers import JsonlReader  # noqa: F401
from datatrove.pipeline.writers import JsonlWriter  # noqa: F401
from datatrove.utils.text import split_into_words

assert split_into_words("The cat sat on the mat.") == ["The", "cat", "sat", "on", "the", "mat", "."]
sig = MinhashDedupSignature(output_folder="/tmp", config=MinhashConfig())
assert sig.get_shingles("one two three four five six").shape == (2, 1)
EOF

touch "$STAMP"
echo "datatrove env ready: $VENV"
