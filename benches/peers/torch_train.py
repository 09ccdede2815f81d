"""PyTorch eager peer of `kiln bench train`: the same Llama shape (transformers'
LlamaForCausalLM, random init), random tokens, batch 8, forward + backward + global-norm
clipping (1.0) + AdamW (0.9/0.95, eps 1e-5, weight decay 0.1), fp32 on the CPU with every
core, or on a GPU (`--device cuda`; `--tf32` lets matmuls use TF32 tensor cores, as cubecl
does for f32 where the GPU has them). Prints one JSON line like kiln's. Its environment stays out of CI:
    python -m venv v && v/bin/pip install -r benches/peers/requirements-peers.txt
    v/bin/python benches/peers/torch_train.py --preset bench-5m --steps 10
"""
import argparse, json, os, time

import torch
import transformers

# dim, layers, heads, kv heads, FFN, vocab, sequence: kiln's presets (src/config.rs).
PRESETS = {
    "bench-5m": (256, 4, 8, 4, 704, 4096, 256),
    "bench-32m": (512, 8, 8, 4, 1408, 8192, 512),
}

p = argparse.ArgumentParser()
p.add_argument("--preset", choices=PRESETS, default="bench-5m")
p.add_argument("--steps", type=int, default=10)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--device", default="cpu")
p.add_argument("--tf32", action="store_true")
a = p.parse_args()
torch.backends.cuda.matmul.allow_tf32 = a.tf32
torch.set_num_threads(os.cpu_count())
torch.manual_seed(0)
dim, layers, heads, kv, ffn, vocab, seq = PRESETS[a.preset]
config = transformers.LlamaConfig(
    hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
    num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
    max_position_embeddings=seq, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, attn_implementation="sdpa",
)
model = transformers.LlamaForCausalLM(config).float().to(a.device).train()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
times = []
for i in range(a.warmup + a.steps):
    tokens = torch.randint(0, vocab, (a.batch, seq), device=a.device)
    start = time.perf_counter()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()  # read back, as kiln does (on a GPU: waits for the step)
    if i >= a.warmup:
        times.append(time.perf_counter() - start)
step = sum(times) / len(times)
print(json.dumps({
    "peer": "pytorch-eager", "torch": torch.__version__, "preset": a.preset,
    "device": a.device, "tf32": a.tf32,
    "params": sum(p.numel() for p in model.parameters()), "batch": a.batch, "seq": seq,
    "step_s": step, "tokens_per_s": a.batch * seq / step,
}))
