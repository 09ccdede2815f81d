#!/usr/bin/env bash
# The gym recipe end to end on the CPU (docs/results.md): generate the task suite, pretrain,
# fine-tune, evaluate, apply Ghost Attention, evaluate again, then train and evaluate the two
# reward models. Outputs go to runs/gym/.
set -euo pipefail
cd "$(dirname "$0")/.."
kiln() { cargo run --release --quiet -- "$@"; }

[ -d runs/gym/data ] || kiln gym generate --out runs/gym/data --seed 0
[ -d runs/gym/pretrain ] || kiln pretrain --config configs/gym-pretrain.toml --out runs/gym/pretrain --device cpu
[ -d runs/gym/sft ] || kiln sft --config configs/gym-sft.toml --init runs/gym/pretrain --out runs/gym/sft --device cpu
kiln eval gym --checkpoint runs/gym/sft --data runs/gym/data --device cpu | tee runs/gym/eval-sft.txt
[ -d runs/gym/gatt ] || kiln gatt --config configs/gym-gatt.toml --init runs/gym/sft --out runs/gym/gatt --device cpu
kiln eval gym --checkpoint runs/gym/gatt --data runs/gym/data --device cpu | tee runs/gym/eval-gatt.txt
[ -d runs/gym/rm-helpful ] || kiln rm train --kind helpfulness --config configs/gym-rm.toml --init runs/gym/gatt --out runs/gym/rm-helpful --device cpu
[ -d runs/gym/rm-safety ] || kiln rm train --kind safety --config configs/gym-rm.toml --init runs/gym/gatt --out runs/gym/rm-safety --device cpu
kiln rm eval --model runs/gym/rm-helpful --input runs/gym/data/pref_heldout.jsonl --pairs helpfulness --device cpu | tee runs/gym/eval-rm-helpful.txt
kiln rm eval --model runs/gym/rm-safety --input runs/gym/data/pref_heldout.jsonl --device cpu | tee runs/gym/eval-rm-safety.txt
