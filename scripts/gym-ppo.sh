#!/usr/bin/env bash
# PPO on the gym (docs/results.md), after `kiln pipeline --config configs/gym.toml --out
# runs/gym` (its sft and reward models): PPO from the SFT model with the two
# gym reward models (configs/gym-ppo.toml); the gate's ablation (the helpfulness model
# alone); a beta sweep (0.005, 0.01, 0.05); and PPO on the gym's checker as the reward, to
# separate what PPO does from what the reward models let it do. Each run is evaluated on the
# held-out sets at its end and at its best held-out checkpoint, and plotted; then each final
# policy samples 16 answers at T = 1 to every held-out task and unsafe prompt, compared with
# the SFT model's prompt by prompt (`kiln gym check --baseline`); last, PPO from the RS model
# with a helpfulness model retrained on the RS model's own answers. Outputs go to
# runs/gym-ablations/. KILN=path/to/kiln runs a built binary instead of `cargo run`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/gym-ablations
kiln() { if [ -n "${KILN:-}" ]; then "$KILN" "$@"; else cargo run --release --quiet -- "$@"; fi; }

D=runs/gym/data
RMS=(--rm-helpful runs/gym/rm-helpful --rm-safety runs/gym/rm-safety)

ppo() { # out, extra flags
  local out=$1
  shift
  if [ -f "$out/config.toml" ]; then
    kiln ppo --resume --out "$out" --device cpu
  else
    kiln ppo --config configs/gym-ppo.toml --init runs/gym/sft "${RMS[@]}" --out "$out" --device cpu "$@"
  fi
  [ -f "$out/eval-final.json" ] ||
    kiln eval gym --checkpoint "$out" --data "$D" --device cpu --json > "$out/eval-final.json"
  [ -f "$out/eval-best.json" ] ||
    kiln eval gym --checkpoint "$out/best" --data "$D" --device cpu --json > "$out/eval-best.json"
  kiln plot "$out"
}

[ -f runs/gym-ablations/eval-sft.json ] ||
  kiln eval gym --checkpoint runs/gym/sft --data "$D" --device cpu --json > runs/gym-ablations/eval-sft.json
ppo runs/gym-ablations/ppo
ppo runs/gym-ablations/ppo-ungated --set ppo.gate=false
ppo runs/gym-ablations/ppo-beta0.005 --set ppo.beta=0.005
ppo runs/gym-ablations/ppo-beta0.05 --set ppo.beta=0.05
ppo runs/gym-ablations/ppo-gym-checker --set 'ppo.reward="gym_checker"'

# Sampled answers on the held-out sets: the policy PPO trains is the sampling one (T = 1).
H=runs/gym-ablations/heldout-prompts.jsonl
[ -f "$H" ] || { jq -c '{prompt, safety: false}' "$D/eval_tasks.jsonl"; jq -c '{prompt, safety: true}' "$D/eval_unsafe.jsonl"; } > "$H"
sampled() { # policy, out
  [ -f "$2/round-1/samples.jsonl" ] ||
    kiln rs --config configs/gym-rs.toml --init "$1" "${RMS[@]}" --out "$2" --device cpu \
      --set "rs.prompts=[\"$H\"]" --set rs.iterations=1 --set train.max_steps=1 \
      --set rs.temperature=1.0 --set rs.k=16
}
sampled runs/gym/sft runs/gym-ablations/sampled-sft
for run in ppo ppo-ungated ppo-beta0.005 ppo-beta0.05; do
  sampled runs/gym-ablations/$run runs/gym-ablations/sampled-$run
  kiln gym check --baseline runs/gym-ablations/sampled-sft/round-1/samples.jsonl \
    --input runs/gym-ablations/sampled-$run/round-1/samples.jsonl
done

# PPO from the RS model with a helpfulness model trained again with pairs of the RS model's
# own right and wrong answers (the paper's reward-model refresh), and how often each
# helpfulness model's best-of-8 pick among the RS model's sampled held-out answers is exact.
[ -f runs/gym-ablations/rs-pairs.jsonl ] ||
  kiln gym pairs --input runs/gym/rs/round-1/samples.jsonl --input runs/gym/rs/round-2/samples.jsonl \
    --input runs/gym/rs/round-3/samples.jsonl --out runs/gym-ablations/rs-pairs.jsonl
[ -d runs/gym-ablations/rm-helpful-rs/checkpoints ] ||
  kiln rm train --kind helpfulness --config configs/gym-rm.toml --init runs/gym/sft \
    --out runs/gym-ablations/rm-helpful-rs --device cpu \
    --set 'data.train=["runs/gym/data/pref_train.jsonl","runs/gym-ablations/rs-pairs.jsonl"]'
[ -f runs/gym-ablations/ppo-rs-refreshed/config.toml ] ||
  kiln ppo --config configs/gym-ppo.toml --init runs/gym/rs/round-3 --rm-helpful runs/gym-ablations/rm-helpful-rs \
    --rm-safety runs/gym/rm-safety --out runs/gym-ablations/ppo-rs-refreshed --device cpu
sampled runs/gym/rs/round-3 runs/gym-ablations/sampled-rs
sampled runs/gym-ablations/ppo-rs-refreshed runs/gym-ablations/sampled-ppo-rs-refreshed
kiln gym check --baseline runs/gym-ablations/sampled-rs/round-1/samples.jsonl \
  --input runs/gym-ablations/sampled-ppo-rs-refreshed/round-1/samples.jsonl
G=runs/gym-ablations/sampled-rs-gold.jsonl
kiln gym check --input runs/gym-ablations/sampled-rs/round-1/samples.jsonl --annotate "$G"
jq -c 'select(.gold_kind != null) | {prompt, response: .answer}' "$G" > runs/gym-ablations/sampled-rs-tasks.jsonl
for rm in runs/gym/rm-helpful runs/gym-ablations/rm-helpful-rs; do
  kiln rm score --model "$rm" --input runs/gym-ablations/sampled-rs-tasks.jsonl \
    --out "runs/gym-ablations/scores-$(basename "$rm").jsonl" --device cpu
done
scripts/rm_pick.py "$G" runs/gym-ablations/scores-rm-helpful.jsonl runs/gym-ablations/scores-rm-helpful-rs.jsonl

# PPO from the RS model on fresh prompts (the gym's generator with seed 7, every prompt of
# runs/gym/data removed, plus its unsafe training prompts; docs/results.md's longer run used
# seeds 7-9 and ppo.iterations=200), with one or four answers a prompt (the leave-one-out
# group baseline), and with the gym's checker as the reward.
F=runs/gym-ablations/fresh-prompts.jsonl
if [ ! -f "$F" ]; then
  kiln gym generate --seed 7 --out runs/gym-ablations/data-seed7 > /dev/null
  jq -r '.prompt | tostring' "$D"/prompts_train.jsonl "$D"/prompts_heldout.jsonl "$D"/eval_tasks.jsonl \
    "$D"/eval_unsafe.jsonl | sort -u > runs/gym-ablations/seen-prompts.txt
  jq -c 'select(.safety == false)' runs/gym-ablations/data-seed7/prompts_train.jsonl |
    jq -c --rawfile seen runs/gym-ablations/seen-prompts.txt \
      '(.prompt | tostring) as $p | select(($p | IN($seen | split("\n")[])) | not)' > "$F"
  jq -c 'select(.safety == true)' "$D/prompts_train.jsonl" > runs/gym-ablations/unsafe-train.jsonl
fi
fresh() { # out, extra flags
  [ -f "$1/config.toml" ] ||
    kiln ppo --config configs/gym-ppo.toml --init runs/gym/rs/round-3 "${RMS[@]}" --out "$1" --device cpu \
      --set "ppo.prompts=[\"$F\",\"runs/gym-ablations/unsafe-train.jsonl\"]" "${@:2}"
  sampled "$1" "runs/gym-ablations/sampled-$(basename "$1")"
  kiln gym check --baseline runs/gym-ablations/sampled-rs/round-1/samples.jsonl \
    --input "runs/gym-ablations/sampled-$(basename "$1")/round-1/samples.jsonl"
}
fresh runs/gym-ablations/ppo-rs-fresh
fresh runs/gym-ablations/ppo-rs-fresh-group4 --set ppo.samples_per_prompt=4
fresh runs/gym-ablations/ppo-rs-fresh-group4-checker --set ppo.samples_per_prompt=4 --set 'ppo.reward="gym_checker"'

# The reward-model refresh that worked: a longer run on more fresh prompts (seeds 7-9)
# over-optimises the reward models on addition; its own answers to those prompts, labelled
# by the checker, retrain the helpfulness model; PPO from the RS model with that model.
F789=runs/gym-ablations/fresh-prompts-789.jsonl
if [ ! -f "$F789" ]; then
  for s in 8 9; do kiln gym generate --seed $s --out runs/gym-ablations/data-seed$s > /dev/null; done
  for s in 7 8 9; do jq -c 'select(.safety == false)' runs/gym-ablations/data-seed$s/prompts_train.jsonl; done |
    jq -c --rawfile seen runs/gym-ablations/seen-prompts.txt \
      '(.prompt | tostring) as $p | select(($p | IN($seen | split("\n")[])) | not)' |
    awk '!seen[$0]++' > "$F789"
fi
O=runs/gym-ablations/ppo-rs-fresh789-group4-200
[ -f "$O/config.toml" ] ||
  kiln ppo --config configs/gym-ppo.toml --init runs/gym/rs/round-3 "${RMS[@]}" --out "$O" --device cpu \
    --set "ppo.prompts=[\"$F789\",\"runs/gym-ablations/unsafe-train.jsonl\"]" \
    --set ppo.samples_per_prompt=4 --set ppo.iterations=200
[ -f runs/gym-ablations/ppo-answers/round-1/samples.jsonl ] ||
  kiln rs --config configs/gym-rs.toml --init "$O" "${RMS[@]}" --out runs/gym-ablations/ppo-answers \
    --device cpu --set "rs.prompts=[\"$F789\"]" --set rs.iterations=1 --set train.max_steps=1 \
    --set rs.temperature=1.0 --set rs.k=8
PP=runs/gym-ablations/ppo-pairs.jsonl
[ -f "$PP" ] ||
  kiln gym pairs --input runs/gym-ablations/ppo-answers/round-1/samples.jsonl --out "$PP" --per-prompt 4
[ -d runs/gym-ablations/rm-helpful-ppo/checkpoints ] ||
  kiln rm train --kind helpfulness --config configs/gym-rm.toml --init runs/gym/sft \
    --out runs/gym-ablations/rm-helpful-ppo --device cpu \
    --set "data.train=[\"$D/pref_train.jsonl\",\"$PP\",\"$PP\",\"$PP\"]"
RMS=(--rm-helpful runs/gym-ablations/rm-helpful-ppo --rm-safety runs/gym/rm-safety)
fresh runs/gym-ablations/ppo-rs-fresh-group4-refreshed --set ppo.samples_per_prompt=4
kiln eval gym --checkpoint runs/gym-ablations/ppo-rs-fresh-group4-refreshed --data "$D" --device cpu
