#!/usr/bin/env bash
# Rejection sampling on the gym (docs/results.md), after
# `kiln pipeline --config configs/gym.toml --out runs/gym` (its sft and reward models): the reward-vs-K
# curves of the SFT model, three rounds of RS from it with the pool of every round
# (`pool = "all"`) and the ablation with only the latest round's answers (`latest`), each
# round evaluated on the held-out sets and its selected answers checked with the gold
# checker. The RS prompts leave out one task kind (uppercase), so its held-out accuracy shows
# what RS does to a skill it does not exercise. Outputs go to runs/gym-ablations/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/gym-ablations
kiln() { cargo run --release --quiet -- "$@"; }

D=runs/gym/data
RMS=(--rm-helpful runs/gym/rm-helpful --rm-safety runs/gym/rm-safety)

# The training prompts without the uppercase task: 4,317 of 5,000 (1,000 of them unsafe).
[ -f runs/gym-ablations/rs-prompts.jsonl ] ||
  grep -v '"prompt":"Write in capitals' "$D/prompts_train.jsonl" > runs/gym-ablations/rs-prompts.jsonl

curve() { # policy, out
  [ -f "$2/curve.json" ] || kiln rs curve --policy "$1" "${RMS[@]}" --prompts "$D/prompts_heldout.jsonl" \
    --limit 100 --k 1,2,4,8,16,32 --temperatures 0.6,0.8,1.0,1.2,1.4 --out "$2" --device cpu
}
curve runs/gym/sft runs/gym-ablations/curve-sft

rs() { # pool mode, out
  if [ -f "$2/config.toml" ]; then
    kiln rs --resume --out "$2" --device cpu
  else
    kiln rs --config configs/gym-rs.toml --init runs/gym/sft "${RMS[@]}" --out "$2" --device cpu \
      --set 'rs.prompts=["runs/gym-ablations/rs-prompts.jsonl"]' --set "rs.pool=\"$1\""
  fi
  for n in 1 2 3; do
    [ -f "$2/eval-round-$n.json" ] ||
      kiln eval gym --checkpoint "$2/round-$n" --data "$D" --device cpu --json > "$2/eval-round-$n.json"
    kiln gym check --input "$2/round-$n/pool.jsonl" --selected | tee "$2/check-round-$n.txt"
  done
  kiln plot "$2"
}
rs all runs/gym-ablations/rs
curve runs/gym-ablations/rs/round-1 runs/gym-ablations/curve-rs1
rs latest runs/gym-ablations/rs-latest
