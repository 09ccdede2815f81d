#!/usr/bin/env python3
"""Peer benchmark: one PPO iteration of Hugging Face TRL on CPU, for comparison with `kiln`'s PPO.

What it measures
----------------
Wall-clock seconds per PPO iteration of TRL's last PPO trainer (trl 1.12.0,
`trl.experimental.ppo.PPOTrainer`; PPO was removed in trl 1.13.0) on random-weight
Llama models built from configs: fp32, CPU, 2 torch threads. One iteration =
  * roll out `rollout` prompts of exactly 32 random tokens (no padding) and sample
    exactly 32 answer tokens each at temperature 1.0 (policy `generate`, KV cache),
  * no-grad forward passes of the reference policy, the value model and the reward
    model over the 64-token sequences,
  * rewards / KL / GAE advantages, then one PPO epoch of `rollout / mini` gradient
    steps (AdamW) of `mini` sequences each on the policy and value model together.

Shapes (`--shape`):
  gym      hidden 128, 4 layers, 4 heads, 2 KV heads, FFN 352, vocab 2048, 256 positions,
           untied embeddings (kiln's default); rollout 64, mini-batch 16
  smollm2  hidden 576, 30 layers, 9 heads, 3 KV heads, FFN 1536, vocab 49152,
           2048 positions, tied embeddings (as SmolLM2-135M); rollout 16, mini-batch 4
Policy and reference are `LlamaForCausalLM` (the reference starts as a copy of the
policy, as TRL's own `create_reference_model` does); the reward and value models are
`LlamaForSequenceClassification(num_labels=1)` of the same shape, separately
initialised.

TRL batch mapping: `per_device_train_batch_size = rollout`, `gradient_accumulation_steps = 1`,
`num_mini_batches = rollout / mini`, `local_rollout_forward_batch_size = rollout`. TRL then
draws `rollout` prompts per iteration, generates them in one batch, and its update loop
takes one micro-batch (= the whole mini-batch, `mini` sequences) per mini-batch with an
optimizer step after each (gradient accumulation 1), i.e. `rollout / mini` steps.
(Using gradient_accumulation_steps > 1 instead would make accelerate skip the optimizer
step on all but every G-th micro-batch, which is not the setup wanted here.)

Answer length: `stop_token_id=None`, so TRL sets the policy's generation `eos_token_id` to
None and `generate` can only stop at `max_new_tokens = response_length = 32`. The policy's
generation_config also carries `suppress_tokens = [pad, eos]` (transformers 5 merges it into
TRL's GenerationConfig), so no answer contains the pad id 0 (TRL would treat it as the end
of the answer and mask the rest) or the eos id. Every rollout is checked: 32 answer
tokens per prompt, none of them pad or eos.

Split (`--json`): each phase is timed by wrapping calls, with no change to TRL itself:
  gen     the policy's `generate` (patched on the instance),
  ref     forward of the reference model (forward pre-hook / hook),
  value   no-grad forward of the value model's backbone during the rollout (TRL's
          `get_reward` calls the backbone directly; hooks only count calls made while
          grad is disabled),
  reward  forward of the reward model's backbone,
  update  from the first grad-enabled forward of TRL's policy+value wrapper in the
          iteration to the end of the iteration (`on_step_end` callback; includes the
          optimizer steps and TRL's metrics bookkeeping),
  other   the rest: log-probs of the sampled tokens, rewards, GAE, data loading, and TRL's
          two `gc.collect()` calls per iteration, which dominate it (the imported torch /
          transformers / trl stack leaves ~0.45M objects for the collector; `--gc-freeze`
          shows the time without that, and is off by default).
An iteration is the interval between consecutive `on_step_end` callbacks (the first one
starts at `on_train_begin`). Peak RSS is `resource.getrusage(RUSAGE_SELF).ru_maxrss`.

Install (outside the repository; this environment is NOT part of CI):
  python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install -r benches/peers/requirements-trl.txt

Run (from the repository root):
  /work/peers-venv/bin/python benches/peers/trl_ppo.py --shape gym --json
  /work/peers-venv/bin/python benches/peers/trl_ppo.py --shape smollm2 --iterations 2 --json

Everything is built from configs: no hub downloads (HF_HUB_OFFLINE=1), no saving, no eval,
report_to none, no wandb. TRL's own console output (logs, progress) goes to stderr; with
`--json` stdout carries only one JSON line per timed iteration and a summary line.
"""

import os

# Before torch / transformers are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import argparse
import contextlib
import copy
import gc
import json
import resource
import sys
import tempfile
import time
import warnings

import torch

THREADS = 2
torch.set_num_threads(THREADS)

import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from tokenizers.pre_tokenizers import WhitespaceSplit  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

SHAPES = {
    "gym": dict(
        model=dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=352,
            vocab_size=2048,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        ),
        rollout=64,
        mini=16,
        iterations=5,
    ),
    "smollm2": dict(
        model=dict(
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            vocab_size=49152,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        ),
        rollout=16,
        mini=4,
        iterations=3,
    ),
}
PROMPT_LEN = 32
RESPONSE_LEN = 32
TEMPERATURE = 1.0
PAD_ID = 0
BOS_ID = 1


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer with exactly `vocab_size` entries: pad 0, bos 1, eos vocab-1."""
    eos_id = vocab_size - 1
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": eos_id}
    vocab.update({f"t{i}": i for i in range(2, eos_id)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<s>"))
    tok.pre_tokenizer = WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<s>")
    assert hf.pad_token_id == PAD_ID and hf.eos_token_id == eos_id and len(hf) == vocab_size, (hf.pad_token_id, hf.eos_token_id, len(hf))
    return hf


def build_models(shape: dict, eos_id: int):
    cfg = LlamaConfig(
        **shape["model"],
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=eos_id,
        num_labels=1,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg).float()
    ref = copy.deepcopy(policy)
    torch.manual_seed(1)
    reward = LlamaForSequenceClassification(cfg).float()
    torch.manual_seed(2)
    value = LlamaForSequenceClassification(cfg).float()
    # Never sample pad (TRL would take it as the end of the answer) or eos.
    policy.generation_config.suppress_tokens = [PAD_ID, eos_id]
    return cfg, policy, ref, reward, value


class Timers:
    """Per-iteration phase timers, filled by wrappers and hooks."""

    PHASES = ("gen", "ref", "value", "reward", "update")

    def __init__(self):
        self.reset()
        self._starts = {}

    def reset(self):
        self.t = {k: 0.0 for k in self.PHASES}
        self.update_start = None
        self.rollouts = []

    def hook_module(self, module, name, only_no_grad=False):
        def pre(_m, _args):
            if only_no_grad and torch.is_grad_enabled():
                return
            self._starts[name] = time.perf_counter()

        def post(_m, _args, _out):
            if only_no_grad and torch.is_grad_enabled():
                return
            start = self._starts.pop(name, None)
            if start is not None:
                self.t[name] += time.perf_counter() - start

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def wrap_generate(self, model, eos_id):
        orig = model.generate

        def timed_generate(*args, **kwargs):
            start = time.perf_counter()
            out = orig(*args, **kwargs)
            self.t["gen"] += time.perf_counter() - start
            seqs = out.sequences
            prompt_len = kwargs["input_ids"].shape[1]
            answers = seqs[:, prompt_len:]
            self.rollouts.append(
                dict(
                    answer_len=int(answers.shape[1]),
                    pad_or_eos=int(((answers == PAD_ID) | (answers == eos_id)).sum()),
                    n=int(answers.shape[0]),
                )
            )
            return out

        model.generate = timed_generate

    def hook_update(self, wrapper):
        def pre(_m, _args, _kwargs):
            if torch.is_grad_enabled() and self.update_start is None:
                self.update_start = time.perf_counter()

        wrapper.register_forward_pre_hook(pre, with_kwargs=True)


class IterationClock(TrainerCallback):
    def __init__(self, timers, rollout, warmup, emit):
        self.timers, self.rollout, self.warmup, self.emit = timers, rollout, warmup, emit
        self.records = []
        self.last = None
        self.n = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.timers.reset()
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        tm = self.timers
        total = now - self.last
        if tm.update_start is not None:
            tm.t["update"] = now - tm.update_start
        for r in tm.rollouts:
            if r["answer_len"] != RESPONSE_LEN or r["pad_or_eos"] != 0:
                raise RuntimeError(f"answers not exactly {RESPONSE_LEN} non-pad tokens: {r}")
        if sum(r["n"] for r in tm.rollouts) != self.rollout:
            raise RuntimeError(f"rolled out {[r['n'] for r in tm.rollouts]} prompts, wanted {self.rollout}")
        self.n += 1
        rec = dict(
            iteration=self.n,
            warmup=self.n <= self.warmup,
            seconds=total,
            prompts_per_s=self.rollout / total,
            split_s={k: round(v, 4) for k, v in tm.t.items()},
        )
        rec["split_s"]["other"] = round(total - sum(tm.t.values()), 4)
        if not rec["warmup"]:
            self.records.append(rec)
        self.emit(rec)
        tm.reset()
        self.last = time.perf_counter()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gym")
    ap.add_argument("--iterations", type=int, default=None, help="timed iterations (default: 5 gym, 3 smollm2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    ap.add_argument("--json", action="store_true", help="one JSON line per timed iteration, then a summary line")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gc-freeze", action="store_true",
                    help="not TRL as shipped: gc.freeze() after setup, so TRL's two gc.collect() calls per "
                         "iteration skip the ~0.45M objects the imports leave (about 0.25 s each here)")
    a = ap.parse_args()

    shape = SHAPES[a.shape]
    iterations = a.iterations if a.iterations is not None else shape["iterations"]
    rollout, mini = shape["rollout"], shape["mini"]
    total_iters = a.warmup + iterations
    out = sys.stdout

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")

    vocab = shape["model"]["vocab_size"]
    tokenizer = build_tokenizer(vocab)
    eos_id = tokenizer.eos_token_id
    cfg, policy, ref, reward, value = build_models(shape, eos_id)
    n_params = sum(p.numel() for p in policy.parameters())

    g = torch.Generator().manual_seed(a.seed)
    # Prompt ids avoid pad (0), bos (1) and eos (vocab-1): 32 real tokens, no padding.
    prompts = torch.randint(2, vocab - 1, (rollout * total_iters, PROMPT_LEN), generator=g)
    train_dataset = Dataset.from_dict({"input_ids": prompts.tolist()})

    tmp = tempfile.TemporaryDirectory(prefix="trl_ppo_bench_")
    args = PPOConfig(
        output_dir=tmp.name,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        push_to_hub=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=a.seed,
        per_device_train_batch_size=rollout,
        gradient_accumulation_steps=1,
        num_mini_batches=rollout // mini,
        local_rollout_forward_batch_size=rollout,
        num_ppo_epochs=1,
        total_episodes=rollout * total_iters,
        response_length=RESPONSE_LEN,
        temperature=TEMPERATURE,
        stop_token=None,
        stop_token_id=None,
        missing_eos_penalty=None,
        num_sample_generations=0,
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    timers = Timers()

    def emit(rec):
        if a.json:
            if not rec["warmup"]:
                print(json.dumps(dict(shape=a.shape, **rec)), file=out, flush=True)
        else:
            tag = "warmup" if rec["warmup"] else "timed "
            sp = " ".join(f"{k} {v:.3f}" for k, v in rec["split_s"].items())
            print(f"[{tag}] iteration {rec['iteration']}: {rec['seconds']:.3f} s "
                  f"({rec['prompts_per_s']:.2f} prompts/s) | {sp}", file=out, flush=True)

    clock = IterationClock(timers, rollout, a.warmup, emit)

    with contextlib.redirect_stdout(sys.stderr):
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            train_dataset=train_dataset,
            value_model=value,
        )
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        trainer.add_callback(clock)

        wrapper = trainer.model  # PolicyAndValueWrapper (accelerate does not wrap on 1 CPU process)
        timers.wrap_generate(wrapper.policy, eos_id)
        timers.hook_update(wrapper)
        timers.hook_module(trainer.ref_model, "ref")
        timers.hook_module(trainer.reward_model.model, "reward")
        timers.hook_module(wrapper.value_model.model, "value", only_no_grad=True)
        assert not wrapper.policy.is_gradient_checkpointing
        assert args.batch_size == rollout and args.mini_batch_size == mini and args.num_total_batches == total_iters, (
            args.batch_size, args.mini_batch_size, args.num_total_batches)

        if a.gc_freeze:
            gc.collect()
            gc.freeze()
        trainer.train()

    recs = clock.records
    if len(recs) != iterations:
        raise RuntimeError(f"timed {len(recs)} iterations, expected {iterations}")
    secs = [r["seconds"] for r in recs]
    mean = sum(secs) / len(secs)
    split = {k: sum(r["split_s"][k] for r in recs) / len(recs) for k in recs[0]["split_s"]}
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
    summary = dict(
        shape=a.shape,
        summary=True,
        iterations=iterations,
        warmup=a.warmup,
        rollout=rollout,
        mini_batch=mini,
        prompt_len=PROMPT_LEN,
        response_len=RESPONSE_LEN,
        policy_params=n_params,
        seconds_per_iteration=mean,
        seconds_min=min(secs),
        seconds_max=max(secs),
        prompts_per_s=rollout / mean,
        split_s_mean={k: round(v, 4) for k, v in split.items()},
        peak_rss_gib=round(peak_rss_gib, 3),
        threads=torch.get_num_threads(),
        gc_freeze=a.gc_freeze,
        optim=str(args.optim),
        attn_implementation=policy.config._attn_implementation,
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__),
    )
    if a.json:
        print(json.dumps(summary), file=out, flush=True)
    else:
        print(f"{a.shape}: {mean:.3f} s/iteration over {iterations} timed iterations "
              f"({rollout / mean:.2f} prompts/s), peak RSS {peak_rss_gib:.2f} GiB; "
              f"split (mean s) {summary['split_s_mean']}; torch {torch.__version__}, "
              f"transformers {transformers.__version__}, trl {trl.__version__}", file=out, flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
