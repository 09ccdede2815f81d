#!/usr/bin/env python3
"""Independent check that a model exported by `kiln convert --to hf` loads
unchanged in Hugging Face transformers.

The script loads MODEL_DIR (a local directory with config.json and
model.safetensors) with `transformers.LlamaForCausalLM.from_pretrained` in
float32, fully offline, and fails if any weight is missing, unexpected or of
the wrong shape. It then runs the given token ids as one batch-1 sequence (no
attention mask, i.e. plain causal attention) and:

  * with --out FILE, writes a safetensors file holding
      input_ids  int64   [1, T]
      logits     float32 [1, T, vocab]
  * with --compare FILE, reads `logits` [1, T, vocab] f32 from FILE (e.g.
    written by the Rust side) and prints the max absolute difference, the max
    relative difference (max|a-b| / max|b| over the whole tensor, b being the
    transformers logits) and the fraction of positions whose argmax agrees.
    Exits with status 1 if the max absolute difference exceeds --tol.

Usage:
  python scripts/hf_logits.py MODEL_DIR --tokens 1,2,3,4 --out logits.safetensors
  python scripts/hf_logits.py MODEL_DIR --tokens 1,2,3,4 --compare rust.safetensors [--tol 1e-3]

If --tokens is omitted in --compare mode, the `input_ids` tensor of FILE is
used (when present).
"""

import argparse
import os
import sys

# Never touch the network: MODEL_DIR is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402


def parse_tokens(text):
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        sys.exit(f"error: --tokens must be comma-separated integers, got {text!r}")
    if not ids:
        sys.exit("error: --tokens is empty")
    return ids


def load_model(model_dir):
    if not os.path.isdir(model_dir):
        sys.exit(f"error: {model_dir} is not a directory")
    # transformers >= 4.56 renamed `torch_dtype` to `dtype` (the old name still
    # works but warns); use whichever this version expects.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model, info = LlamaForCausalLM.from_pretrained(
        model_dir,
        local_files_only=True,
        output_loading_info=True,
        attn_implementation="eager",  # the reference implementation
        **{dtype_kw: torch.float32},
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        for k, v in problems.items():
            print(f"error: {k}: {v}", file=sys.stderr)
        sys.exit("error: checkpoint does not load cleanly into LlamaForCausalLM")
    model.eval()
    return model


def main():
    ap = argparse.ArgumentParser(
        description="Run a local HF Llama checkpoint on token ids and write/compare logits."
    )
    ap.add_argument("model_dir", metavar="MODEL_DIR")
    ap.add_argument("--tokens", help="comma-separated token ids, e.g. 1,2,3,4")
    ap.add_argument("--out", help="write input_ids and logits to this safetensors file")
    ap.add_argument("--compare", metavar="FILE",
                    help="safetensors file with `logits` [1,T,vocab] f32 to compare against")
    ap.add_argument("--tol", type=float, default=1e-3,
                    help="max allowed absolute difference in --compare mode (default 1e-3)")
    args = ap.parse_args()

    if not args.out and not args.compare:
        ap.error("give --out and/or --compare")

    other = load_file(args.compare) if args.compare else None

    if args.tokens is not None:
        ids = parse_tokens(args.tokens)
    elif other is not None and "input_ids" in other:
        ids = other["input_ids"].reshape(-1).tolist()
    else:
        ap.error("--tokens is required (the --compare file has no input_ids)")

    model = load_model(args.model_dir)
    input_ids = torch.tensor([ids], dtype=torch.int64)
    vocab = model.config.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        sys.exit(f"error: token ids must lie in [0, {vocab})")

    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits.float().contiguous()

    n_params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {n_params} parameters, "
          f"logits {list(logits.shape)} (transformers {transformers.__version__}, "
          f"torch {torch.__version__})")

    if args.out:
        save_file({"input_ids": input_ids, "logits": logits}, args.out)
        print(f"wrote {args.out}")

    if other is None:
        return 0

    if "logits" not in other:
        sys.exit(f"error: {args.compare} has no `logits` tensor")
    theirs = other["logits"].float()
    if "input_ids" in other and other["input_ids"].reshape(-1).tolist() != ids:
        print("warning: input_ids in the compare file differ from --tokens", file=sys.stderr)
    if list(theirs.shape) != list(logits.shape):
        sys.exit(f"error: shape mismatch: {list(theirs.shape)} in {args.compare} "
                 f"vs {list(logits.shape)} from transformers")

    abs_diff = (theirs - logits).abs()
    max_abs = abs_diff.max().item()
    max_rel = max_abs / max(logits.abs().max().item(), 1e-12)
    agree = (theirs.argmax(-1) == logits.argmax(-1)).float().mean().item()
    ok = max_abs <= args.tol
    print(f"max abs diff {max_abs:.3e}, max rel diff {max_rel:.3e}, "
          f"argmax agreement {agree:.4f} ({logits.shape[1]} positions), "
          f"tol {args.tol:g}: {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
