"""transformers peer of `kiln bench generate`: the same model (a Hugging Face directory,
e.g. kiln's export of SmolLM2-135M-Instruct: `kiln convert MODEL.gguf --to hf --out DIR`),
random prompts of 64 tokens, each row continued greedily by exactly 64 new tokens, fp32 on
the CPU with every core, one untimed warm-up first. Prints one JSON line per batch size with
the prefill time (the prompts' forward pass) and tokens/s with the prefill included.
    v/bin/python benches/peers/hf_generate.py --model DIR --batch 1,8,32
"""
import argparse, json, os, time

import torch
import transformers

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--batch", default="1,8")
p.add_argument("--prompt-tokens", type=int, default=64)
p.add_argument("--new-tokens", type=int, default=64)
a = p.parse_args()
torch.set_num_threads(os.cpu_count())
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
vocab = model.config.vocab_size


def run(batch, new_tokens):
    ids = torch.randint(0, vocab, (batch, a.prompt_tokens))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       pad_token_id=0)
        total = time.perf_counter() - start
    return prefill, total


for batch in [int(b) for b in a.batch.split(",")]:
    run(batch, 3)  # warm-up
    prefill, total = run(batch, a.new_tokens)
    print(json.dumps({
        "peer": "transformers", "transformers": transformers.__version__, "batch": batch,
        "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
        "prefill_ms": prefill * 1e3, "total_s": total,
        "tokens_per_s_with_prefill": batch * a.new_tokens / total,
    }))
