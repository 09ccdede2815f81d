#!/usr/bin/env bash
# Checks that a model exported by `kiln convert --to hf` loads unchanged in Hugging Face
# transformers (LlamaForCausalLM.from_pretrained, strict) and gives kiln's logits.
#
#   scripts/check-hf-export.sh [MODEL] [PYTHON]
#
# MODEL: any model kiln reads (default: SmolLM2-135M-Instruct from scripts/fetch-smollm2.sh).
# PYTHON: a Python with torch, transformers and safetensors (default: /work/pyenv/bin/python;
# set one up with `python3 -m venv ENV && ENV/bin/pip install torch transformers safetensors`).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
python=${2:-/work/pyenv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cargo build --release --quiet --bin kiln --example logits
# Through a kiln checkpoint, so the export path is the one users take from their runs.
./target/release/kiln convert "$model" --out "$tmp/kiln" --to kiln
./target/release/kiln convert "$tmp/kiln" --out "$tmp/hf" --to hf
# Token ids from the exported tokenizer.json, read by Hugging Face's tokenizers.
ids=$("$python" - "$tmp/hf" <<'PY'
import sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
text = "The capital of France is Paris. 12345 apples cost 3.50 euros; naïve café!"
print(",".join(str(i) for i in tok(text)["input_ids"]))
PY
)
echo "token ids: $ids"
./target/release/examples/logits "$tmp/kiln" --tokens "$ids" --out "$tmp/kiln-logits.safetensors"
"$python" scripts/hf_logits.py "$tmp/hf" --tokens "$ids" --compare "$tmp/kiln-logits.safetensors" --tol 1e-3
