#!/usr/bin/env python3
"""Runs kiln and its peer back to back, several times, and prints kiln's speed as a ratio of
the peer's (docs/benchmarks.md): training (`kiln bench train` against PyTorch eager,
benches/peers/torch_train.py) and generation (`kiln bench generate` against transformers,
benches/peers/hf_generate.py, prefill included). Runs alternate so drift hits both sides.

    scripts/bench_compare.py --peer-python PEER_VENV/bin/python train --preset bench-5m
    scripts/bench_compare.py --peer-python PEER_VENV/bin/python generate \
        --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --hf exported/smollm2 --batch 1,8,32
"""
import argparse, json, statistics, subprocess, sys

p = argparse.ArgumentParser()
p.add_argument("--kiln", default="target/release/kiln")
p.add_argument("--peer-python", required=True, help="python of the peers' environment")
p.add_argument("--repeats", type=int, default=3)
sub = p.add_subparsers(dest="what", required=True)
t = sub.add_parser("train")
t.add_argument("--preset", default="bench-5m")
t.add_argument("--steps", type=int, default=10)
g = sub.add_parser("generate")
g.add_argument("--gguf", required=True, help="the model for kiln")
g.add_argument("--hf", required=True, help="the same model as a Hugging Face directory")
g.add_argument("--batch", default="1,8")
g.add_argument("--new-tokens", type=int, default=64)
a = p.parse_args()


def lines(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def spread(values, digits=1):
    lo, hi, mid = min(values), max(values), statistics.median(values)
    return f"{lo:,.{digits}f}-{hi:,.{digits}f} (median {mid:,.{digits}f})"


if a.what == "train":
    kiln, peer = [], []
    for _ in range(a.repeats):
        kiln += [r["tokens_per_s"] for r in lines([a.kiln, "bench", "train", "--preset", a.preset,
                                                  "--device", "cpu", "--steps", str(a.steps)])]
        peer += [r["tokens_per_s"] for r in lines([a.peer_python, "benches/peers/torch_train.py",
                                                  "--preset", a.preset, "--steps", str(a.steps)])]
    ratios = [k / p for k, p in zip(kiln, peer)]
    print(f"{a.preset} training tokens/s: kiln {spread(kiln)}, PyTorch {spread(peer)}, "
          f"kiln/PyTorch {spread(ratios, 2)} over {a.repeats} alternating pairs")
else:
    rows = {}
    for _ in range(a.repeats):
        for r in lines([a.kiln, "bench", "generate", "--model", a.gguf, "--device", "cpu",
                        "--batch", a.batch, "--new-tokens", str(a.new_tokens)]):
            total_s = (r["prefill_ms"] + (r["new_tokens"] - 1) * r["decode_ms_per_step"]) / 1e3
            rows.setdefault(r["batch"], ([], []))[0].append(r["batch"] * r["new_tokens"] / total_s)
        for r in lines([a.peer_python, "benches/peers/hf_generate.py", "--model", a.hf,
                        "--batch", a.batch, "--new-tokens", str(a.new_tokens)]):
            rows[r["batch"]][1].append(r["tokens_per_s_with_prefill"])
    for batch, (kiln, peer) in sorted(rows.items()):
        ratios = [k / p for k, p in zip(kiln, peer)]
        print(f"batch {batch}: tokens/s with prefill: kiln {spread(kiln)}, transformers "
              f"{spread(peer)}, kiln/transformers {spread(ratios, 2)}")
sys.exit(0)
