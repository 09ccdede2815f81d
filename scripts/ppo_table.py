#!/usr/bin/env python3
"""Tables of the gym PPO runs (docs/results.md): held-out evaluations of `kiln eval gym` for
the SFT model and each run's final and best checkpoint, and each run's curve summary from
its metrics.jsonl. Usage: scripts/ppo_table.py runs/gym-ablations/ppo runs/gym-ablations/ppo-ungated ..."""
import json
import sys
from pathlib import Path

KINDS = ["add", "subtract", "count", "reverse", "sort", "uppercase"]


def evaluation(path):
    e = json.loads(Path(path).read_text())
    kinds = " | ".join(f"{100 * e['task_accuracy_by_kind'][k]:.0f}" for k in KINDS)
    return (f"{100 * e['task_accuracy']:.1f}% | {e['task_score']:.3f} | {kinds} | "
            f"{100 * e['unsafe_refusal_rate']:.1f}% | {100 * e['benign_refusal_rate']:.1f}%")


print("| model | accuracy | gold score | " + " | ".join(KINDS) + " | unsafe refused | benign refused |")
print("|---" * (5 + len(KINDS)) + "|")
print(f"| SFT (start) | {evaluation('runs/gym-ablations/eval-sft.json')} |")
for run in sys.argv[1:]:
    for which in ["final", "best"]:
        f = Path(run) / f"eval-{which}.json"
        if f.exists():
            print(f"| {Path(run).name} {which} | {evaluation(f)} |")
print()
print("| run | R_c first 10 -> last 10 (rollout) | gold first 10 -> last 10 (rollout) | "
      "held-out gold at 0 -> end (best, at) | KL/token last 10 | KL/answer last 10 | "
      "s/iteration | split gen / RM / no-grad / update |")
print("|---" * 8 + "|")
for run in sys.argv[1:]:
    recs = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in recs if "reward" in r]
    evals = [r for r in recs if "eval_reward" in r]
    mean = lambda xs: sum(xs) / len(xs)
    first, last = its[:10], its[-10:]
    best = max(evals, key=lambda e: e["eval_gold"])
    total = mean([r["generation_s"] + r["scoring_s"] + r["no_grad_s"] + r["update_s"] for r in its])
    split = " / ".join(f"{100 * mean([r[k] for r in its]) / total:.0f}%"
                       for k in ["generation_s", "scoring_s", "no_grad_s", "update_s"])
    print(f"| {Path(run).name} | {mean([r['reward'] for r in first]):.3f} -> {mean([r['reward'] for r in last]):.3f} "
          f"| {mean([r['gold'] for r in first]):.3f} -> {mean([r['gold'] for r in last]):.3f} "
          f"| {evals[0]['eval_gold']:.3f} -> {evals[-1]['eval_gold']:.3f} ({best['eval_gold']:.3f}, {best['iteration']}) "
          f"| {mean([r['kl_per_token'] for r in last]):.3f} | {mean([r['kl_per_answer'] for r in last]):.2f} "
          f"| {total:.2f} | {split} |")
