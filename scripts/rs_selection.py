#!/usr/bin/env python3
"""How often each way of picking one of a prompt's K answers picks a right one
(docs/results.md, rejection sampling): the combined reward R_c (what `kiln rs` does), the
policy's log-likelihood, the most frequent answer, a random answer (the mean exact share),
and an oracle (pass@K), per task kind, from a round's samples as annotated by the gym's
checker (`kiln gym check --annotate`, which adds each answer's `gold_kind`, `gold_answer`
and `exact`).

    kiln gym check --input OUT/round-1/samples.jsonl --annotate SAMPLES.jsonl
    scripts/rs_selection.py SAMPLES.jsonl
    scripts/rs_selection.py --gold-train OUT/round-1/train.jsonl SAMPLES.jsonl GOLD.jsonl

The second form writes a round's fine-tuning file with every task prompt's answer replaced
by the gold one: `kiln sft` on it is the oracle round (what perfect selection would buy)."""
import collections
import json
import sys

KINDS = ["add", "subtract", "count", "reverse", "sort", "uppercase"]


def annotated(path):
    """The task answers of an annotated samples file, by prompt index."""
    by_prompt = collections.defaultdict(list)
    for line in open(path):
        s = json.loads(line)
        if "gold_kind" not in s:
            if "refused" not in s:
                sys.exit(f"{path}: not annotated; run `kiln gym check --input F --annotate {path}` first")
            continue
        if not s["safety"]:
            by_prompt[s["prompt_index"]].append(s)
    return by_prompt


def gold_train(src, samples, dst):
    gold = {s["prompt"]: s["gold_answer"] for answers in annotated(samples).values() for s in answers}
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            example = json.loads(line)
            user, answer = example["messages"][0], example["messages"][-1]
            if len(example["messages"]) == 2 and user["content"] in gold:
                answer["content"] = gold[user["content"]]
            out.write(json.dumps(example) + "\n")


def selection(path):
    def count(s, answers):
        return sum(a["answer"].strip() == s["answer"].strip() for a in answers)

    rules = {
        "R_c": lambda ss: max(ss, key=lambda s: s["reward"]),
        "log-likelihood": lambda ss: max(ss, key=lambda s: sum(s["logprobs"])),
        "most frequent": lambda ss: max(ss, key=lambda s: (count(s, ss), s["reward"])),
    }
    hits = collections.defaultdict(collections.Counter)
    prompts = collections.Counter()
    for answers in annotated(path).values():
        kind = answers[0]["gold_kind"]
        finished = [s for s in answers if s["finish"] == "eos"] or answers
        prompts[kind] += 1
        for name, pick in rules.items():
            hits[name][kind] += pick(finished)["exact"]
        hits["random (mean)"][kind] += sum(s["exact"] for s in answers) / len(answers)
        hits["oracle (pass@K)"][kind] += any(s["exact"] for s in answers)
    kinds = [k for k in KINDS if prompts[k]]
    print("| picked by | " + " | ".join(kinds) + " | all |")
    print("|---" * (len(kinds) + 2) + "|")
    for name, h in hits.items():
        cells = [f"{100 * h[k] / prompts[k]:.1f}%" for k in kinds]
        cells.append(f"{100 * sum(h.values()) / sum(prompts.values()):.1f}%")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{sum(prompts.values())} task prompts: " + ", ".join(f"{k} {prompts[k]}" for k in kinds))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--gold-train":
        gold_train(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 2:
        selection(sys.argv[1])
    else:
        sys.exit(__doc__)
