#!/usr/bin/env python3
"""How often a helpfulness reward model's best-of-K pick among a policy's sampled answers is
exact, per task kind, for several reward models on the same answers (docs/results.md, PPO:
reward models retrained on the RS policy's answers). The answers are a samples file
annotated by the gym's checker; each reward model's scores come from `kiln rm score` on the
task lines of it, in the same order:

    kiln gym check --input S/round-1/samples.jsonl --annotate GOLD.jsonl
    jq -c 'select(.gold_kind != null) | {prompt, response: .answer}' GOLD.jsonl > TASKS.jsonl
    kiln rm score --model RM --input TASKS.jsonl --out SCORES.jsonl
    scripts/rm_pick.py GOLD.jsonl SCORES.jsonl [SCORES2.jsonl ...] [--k 8]

The last row is a random pick (the mean exact share of the answers)."""
import argparse
import collections
import json

KINDS = ["add", "subtract", "count", "reverse", "sort", "uppercase"]

parser = argparse.ArgumentParser()
parser.add_argument("gold")
parser.add_argument("scores", nargs="+")
parser.add_argument("--k", type=int, default=8, help="the first K answers of each prompt")
args = parser.parse_args()

answers = [json.loads(line) for line in open(args.gold)]
answers = [a for a in answers if a.get("gold_kind")]


def row(name, picks):
    shares = {k: 100 * sum(v) / len(v) for k, v in picks.items()}
    every = [x for k in KINDS for x in picks.get(k, [])]
    cells = " | ".join(f"{shares[k]:.1f}%" if k in shares else "-" for k in KINDS)
    print(f"| {name} | {cells} | {100 * sum(every) / len(every):.1f}% |")


# Each prompt's first K answers, as indices into `answers`.
by_prompt = collections.defaultdict(list)
for i, answer in enumerate(answers):
    by_prompt[json.dumps(answer["prompt"])].append(i)
firsts = [indices[: args.k] for indices in by_prompt.values()]

print(f"| best of {args.k} by | " + " | ".join(KINDS) + " | all |")
print("|---" * (len(KINDS) + 2) + "|")
for path in args.scores:
    scores = [json.loads(line)["score"] for line in open(path)]
    if len(scores) != len(answers):
        raise SystemExit(f"{path}: {len(scores)} scores for {len(answers)} task answers")
    picks = collections.defaultdict(list)
    for indices in firsts:
        best = answers[max(indices, key=lambda i: scores[i])]
        picks[best["gold_kind"]].append(best["exact"])
    row(path, picks)
picks = collections.defaultdict(list)
for indices in firsts:
    for i in indices:
        picks[answers[i]["gold_kind"]].append(answers[i]["exact"])
row("a random one", picks)
