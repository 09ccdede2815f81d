#!/usr/bin/env python3
"""How often each way of picking one of a prompt's K answers picks a right one
(docs/results.md, rejection sampling): the combined reward R_c (what `kiln rs` does), the
policy's log-likelihood, the most frequent answer, a random answer (the mean exact share),
and an oracle (pass@K), per task kind, from a round's `samples.jsonl`. The gym's tasks are
read back from their prompts (the same rules as `kiln gym check`).

    scripts/rs_selection.py OUT/round-1/samples.jsonl
    scripts/rs_selection.py --gold-train OUT/round-1/train.jsonl GOLD.jsonl

The second form writes a round's fine-tuning file with every task prompt's answer replaced
by the gold one: `kiln sft` on it is the oracle round (what perfect selection would buy)."""
import collections
import json
import re
import sys

KINDS = ["add", "subtract", "count", "reverse", "sort", "uppercase"]


def solve(prompt):
    """(kind, gold answer) of a gym task prompt, None for anything else."""
    if m := re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", prompt):
        a, b = int(m[1]), int(m[3])
        return ("add", str(a + b)) if m[2] == "+" else ("subtract", str(a - b))
    if m := re.fullmatch(r"How many times does ([a-z]) appear in: ([a-z](?: [a-z])*)\?", prompt):
        return "count", str(m[2].split(" ").count(m[1]))
    m = re.fullmatch(r"(Reverse the letters|Sort the letters|Write in capitals): ([a-z](?: [a-z])*)", prompt)
    if not m:
        return None
    letters = m[2].split(" ")
    if m[1] == "Reverse the letters":
        return "reverse", " ".join(reversed(letters))
    if m[1] == "Sort the letters":
        return "sort", " ".join(sorted(letters))
    return "uppercase", " ".join(l.upper() for l in letters)


def gold_train(src, dst):
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            example = json.loads(line)
            user, answer = example["messages"][0], example["messages"][-1]
            task = solve(user["content"]) if len(example["messages"]) == 2 else None
            if task:
                answer["content"] = task[1]
            out.write(json.dumps(example) + "\n")


def selection(path):
    by_prompt = collections.defaultdict(list)
    for line in open(path):
        s = json.loads(line)
        task = None if s["safety"] or not isinstance(s["prompt"], str) else solve(s["prompt"])
        if task:
            s["kind"], s["exact"] = task[0], s["answer"].strip() == task[1]
            by_prompt[s["prompt_index"]].append(s)

    def count(s, answers):
        return sum(a["answer"].strip() == s["answer"].strip() for a in answers)

    rules = {
        "R_c": lambda ss: max(ss, key=lambda s: s["reward"]),
        "log-likelihood": lambda ss: max(ss, key=lambda s: sum(s["logprobs"])),
        "most frequent": lambda ss: max(ss, key=lambda s: (count(s, ss), s["reward"])),
    }
    hits = collections.defaultdict(collections.Counter)
    prompts = collections.Counter()
    for answers in by_prompt.values():
        kind = answers[0]["kind"]
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
    if len(sys.argv) == 4 and sys.argv[1] == "--gold-train":
        gold_train(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 2:
        selection(sys.argv[1])
    else:
        sys.exit(__doc__)
