//! `kiln bench train`: training throughput of a preset on random tokens.
//! `kiln bench kernels`: the custom WGSL kernels against the reference ops, side by side.

use std::time::Instant;

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::{ModelConfig, OptimConfig, Preset};
use crate::data::corpus::Batch;
use crate::device::ComputeDevice;
use crate::kernels::{self, Kernels, PreparedLayout, SequenceLayout};
use crate::model::Llama;
use crate::model::ops::RopeTables;
use crate::stages::pretrain::batch_tensors;
use crate::train::collective::{Collective, share_range};
use crate::train::optim::AdamW;
use crate::train::step::{self, Accumulated, MicroBatchLoss};

#[derive(Debug, Serialize)]
pub struct TrainBench {
    pub preset: String,
    pub device: String,
    pub kernels: String,
    pub params: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub tokens_per_s: f64,
    pub step_ms: f64,
    /// Data-parallel workers (MPI ranks) sharing each step's batch.
    pub workers: usize,
    /// Time per step in the all-reduce of gradients, loss and counts, after a barrier so that
    /// waiting for a slower worker is not counted (included in `step_ms`).
    pub all_reduce_ms: f64,
    /// Bytes each worker contributes to the all-reduce per step.
    pub all_reduce_bytes: u64,
}

/// Times `steps` full training steps (forward, backward, clipping, AdamW) after `warmup`
/// untimed ones; the device is synchronised by reading the loss back each step. With several
/// workers (MPI ranks), each takes its share of the preset's batch and the all-reduce is
/// timed on its own.
pub fn train(
    preset: Preset,
    device: &ComputeDevice,
    steps: usize,
    warmup: usize,
    kernels: Kernels,
    collective: &dyn Collective,
) -> Result<TrainBench> {
    let config = ModelConfig {
        kernels,
        ..preset.model()
    };
    let (global_batch, seq_len) = (preset.bench_batch_size(), config.max_seq_len);
    let workers = collective.world_size();
    if global_batch < workers {
        anyhow::bail!("the preset's batch of {global_batch} cannot be shared by {workers} workers");
    }
    let batch_size = share_range(global_batch, collective.rank(), workers).len();
    let autodiff = device.device.clone().autodiff();
    let mut model = Llama::new(&config, 0, &autodiff);
    let kernels = model.kernels().name().to_string();
    let mut optimizer = AdamW::new(OptimConfig::default());
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut random_batch = || {
        let n = batch_size * seq_len;
        let mut tokens = |_| {
            (0..n)
                .map(|_| rng.random_range(0..config.vocab_size as i64))
                .collect()
        };
        Batch {
            inputs: tokens(0),
            targets: tokens(1),
            batch_size,
            seq_len,
        }
    };
    let (mut timed, mut reducing) = (0.0, 0.0);
    for i in 0..warmup + steps {
        let batch = random_batch();
        let start = Instant::now();
        let (inputs, targets) = batch_tensors(&batch, &autodiff);
        // The training stages' own step: summed loss, backward, clip, AdamW.
        let tokens = batch.inputs.len();
        let mut micro_batches = Accumulated::default();
        micro_batches.add(
            &model,
            MicroBatchLoss::from_mean(model.loss(inputs, targets), tokens as f64, tokens as u64),
        );
        // Waiting for a slower worker is not communication: meet first, then time the sum.
        collective.barrier()?;
        let reduce_start = Instant::now();
        let micro_batches = micro_batches.all_reduce(&model, collective)?;
        let reduce_s = reduce_start.elapsed().as_secs_f64();
        let (updated, _) = step::apply(model, &mut optimizer, micro_batches, 3e-4)?;
        model = updated;
        if i >= warmup {
            timed += start.elapsed().as_secs_f64();
            reducing += reduce_s;
        }
    }
    let step_s = timed / steps as f64;
    Ok(TrainBench {
        preset: format!("{preset:?}"),
        device: device.describe(),
        kernels,
        params: config.num_params(),
        batch_size: global_batch,
        seq_len,
        steps,
        tokens_per_s: (global_batch * seq_len) as f64 / step_s,
        step_ms: step_s * 1e3,
        workers,
        all_reduce_ms: reducing / steps as f64 * 1e3,
        all_reduce_bytes: match workers {
            1 => 0,
            _ => config.num_params() * 4 + 3 * 8,
        },
    })
}

/// One row of `kiln bench kernels`: a custom kernel against its reference, forward and
/// backward, measured in the same run.
#[derive(Debug, Serialize)]
pub struct KernelBench {
    pub kernel: String,
    pub shape: String,
    pub custom_ms: f64,
    pub reference_ms: f64,
    /// `reference_ms / custom_ms`.
    pub speedup: f64,
    /// Attention only: burn's own `module::attention` (causal, K/V heads expanded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burn_attention_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speedup_vs_burn: Option<f64>,
    /// Max |custom - reference| / max |reference| over the output and every gradient.
    pub max_rel_err: f64,
}

/// Which implementation a kernel benchmark runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Custom,
    Reference,
    BurnAttention,
}

impl Variant {
    fn kernels(self) -> Kernels {
        match self {
            Variant::Custom => Kernels::Custom,
            _ => Kernels::Reference,
        }
    }
}

/// A benchmark case: one op, forward and backward, on inputs uploaded once. The inputs are
/// flat; `op` reshapes them and returns its output flat, so one runner serves every rank.
struct KernelCase {
    kernel: &'static str,
    shape: String,
    inputs: Vec<Tensor<1>>,
    /// The objective is `sum(output * probe)`, or `sum(output)` for a scalar loss.
    probe: Option<Tensor<1>>,
    op: Box<dyn Fn(Variant, Vec<Tensor<1>>) -> Tensor<1>>,
    has_burn: bool,
}

impl KernelCase {
    /// One forward and backward pass, queued on the device: the output and the gradients of
    /// the inputs, not yet read.
    fn run(&self, variant: Variant) -> Vec<Tensor<1>> {
        let leaves: Vec<Tensor<1>> = self
            .inputs
            .iter()
            .map(|t| t.clone().require_grad())
            .collect();
        let out = (self.op)(variant, leaves.clone());
        let objective = match &self.probe {
            Some(probe) => (out.clone() * probe.clone()).sum(),
            None => out.clone().sum(),
        };
        let grads = objective.backward();
        std::iter::once(out.inner())
            .chain(leaves.iter().map(|l| l.grad(&grads).expect("grad")))
            .collect()
    }

    /// The output and the gradients, read back.
    fn run_read(&self, variant: Variant) -> Vec<Vec<f32>> {
        self.run(variant)
            .into_iter()
            .map(|t| t.into_data().try_into_vec_as::<f32>().expect("f32 tensor"))
            .collect()
    }

    /// Milliseconds per forward and backward pass: `iterations` passes queued back to back
    /// and one wait for the device. The results stay alive until the device has finished, so
    /// burn's fusion cannot skip work whose output nobody holds.
    fn time(&self, variant: Variant, iterations: usize) -> f64 {
        let device = self.inputs[0].device();
        let start = Instant::now();
        let results: Vec<Vec<Tensor<1>>> = (0..iterations).map(|_| self.run(variant)).collect();
        device.sync().expect("device sync");
        let ms = start.elapsed().as_secs_f64() * 1e3 / iterations as f64;
        drop(results);
        ms
    }
}

fn kernel_cases(device: &Device, quick: bool) -> Vec<KernelCase> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let ad = device.clone().autodiff();
    let mut random = |n: usize, scale: f32| {
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::<1>::from_data(TensorData::new(values, [n]), &ad)
    };
    let mut cases = Vec::new();

    // Attention: the goal shape, batch 4, 8 heads, T 1024, head dim 64.
    let (b, t, h, d) = if quick {
        (1, 128, 2, 32)
    } else {
        (4, 1024, 8, 64)
    };
    let n = b * t * h * d;
    let tables = RopeTables::new(t, d, 10_000.0, &ad);
    let layout =
        |kernels| PreparedLayout::new(&SequenceLayout::causal(b, t), kernels, &tables, 1, &ad);
    let (custom, reference) = (layout(Kernels::Custom), layout(Kernels::Reference));
    cases.push(KernelCase {
        kernel: "flash_attention",
        shape: format!("b{b} h{h} t{t} d{d} causal"),
        inputs: vec![random(n, 1.0), random(n, 1.0), random(n, 1.0)],
        probe: Some(random(n, 1.0)),
        has_burn: true,
        op: Box::new(move |variant, x| {
            let [q, k, v] = <[Tensor<1>; 3]>::try_from(x)
                .unwrap()
                .map(|x| x.reshape([b, t, h, d]));
            let out = match variant {
                Variant::BurnAttention => {
                    let options = burn::tensor::ops::AttentionModuleOptions {
                        scale: None,
                        softcap: None,
                        is_causal: true,
                    };
                    let heads_first = |t: Tensor<4>| t.swap_dims(1, 2);
                    burn::tensor::module::attention(
                        heads_first(q),
                        heads_first(k),
                        heads_first(v),
                        None,
                        None,
                        options,
                    )
                    .swap_dims(1, 2)
                }
                Variant::Custom => custom.attention(q, k, v),
                Variant::Reference => reference.attention(q, k, v),
            };
            out.reshape([n])
        }),
    });

    // Row and elementwise ops at bench-5m / bench-32m sizes (batch 8 x 256 tokens).
    let rows = if quick { 64 } else { 2048 };
    for dim in if quick { vec![64] } else { vec![256, 512] } {
        cases.push(KernelCase {
            kernel: "rms_norm",
            shape: format!("{rows}x{dim}"),
            inputs: vec![random(rows * dim, 2.0), random(dim, 1.0)],
            probe: Some(random(rows * dim, 1.0)),
            has_burn: false,
            op: Box::new(move |variant, x| {
                let [x, w] = <[Tensor<1>; 2]>::try_from(x).unwrap();
                kernels::rms_norm(x.reshape([rows, dim]), w, 1e-5, variant.kernels())
                    .reshape([rows * dim])
            }),
        });
    }
    for ffn in if quick { vec![96] } else { vec![704, 1408] } {
        cases.push(KernelCase {
            kernel: "swiglu",
            shape: format!("{rows}x{ffn}"),
            inputs: vec![random(rows * ffn, 4.0), random(rows * ffn, 2.0)],
            probe: Some(random(rows * ffn, 1.0)),
            has_burn: false,
            op: Box::new(move |variant, x| {
                let [gate, up] = <[Tensor<1>; 2]>::try_from(x)
                    .unwrap()
                    .map(|t| t.reshape([rows, ffn]));
                kernels::swiglu(gate, up, variant.kernels()).reshape([rows * ffn])
            }),
        });
    }
    {
        let (batch, seq, heads, hd) = if quick {
            (1, 64, 2, 32)
        } else {
            (8, 256, 8, 32)
        };
        let n = batch * seq * heads * hd;
        let tables = RopeTables::new(seq, hd, 10_000.0, &ad);
        let layout = |kernels| {
            PreparedLayout::new(
                &SequenceLayout::causal(batch, seq),
                kernels,
                &tables,
                1,
                &ad,
            )
        };
        let (custom, reference) = (layout(Kernels::Custom), layout(Kernels::Reference));
        cases.push(KernelCase {
            kernel: "rope",
            shape: format!("{batch}x{seq}x{heads}x{hd}"),
            inputs: vec![random(n, 2.0)],
            probe: Some(random(n, 1.0)),
            has_burn: false,
            op: Box::new(move |variant, x| {
                let x = x[0].clone().reshape([batch, seq, heads, hd]);
                let layout = if variant == Variant::Custom {
                    &custom
                } else {
                    &reference
                };
                layout.rope(x).reshape([n])
            }),
        });
    }
    for vocab in if quick { vec![500] } else { vec![4096, 8192] } {
        let values: Vec<i32> = (0..rows).map(|i| ((i * 7919) % vocab) as i32).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(values, [rows]), &ad);
        cases.push(KernelCase {
            kernel: "cross_entropy",
            shape: format!("{rows}x{vocab}"),
            inputs: vec![random(rows * vocab, 6.0)],
            probe: None,
            has_burn: false,
            op: Box::new(move |variant, x| {
                let logits = x[0].clone().reshape([rows, vocab]);
                kernels::cross_entropy(logits, targets.clone(), None, variant.kernels())
            }),
        });
    }
    cases
}

fn max_rel_err(custom: &[Vec<f32>], reference: &[Vec<f32>]) -> f64 {
    custom
        .iter()
        .zip(reference)
        .map(|(c, r)| {
            let scale = r.iter().fold(1e-12f32, |m, v| m.max(v.abs())) as f64;
            let diff = c.iter().zip(r).fold(0.0f64, |m, (a, b)| {
                if a.is_nan() {
                    f64::INFINITY
                } else {
                    m.max((a - b).abs() as f64)
                }
            });
            diff / scale
        })
        .fold(0.0, f64::max)
}

/// The kernels `kiln bench kernels` measures, by the name its rows carry.
pub const KERNEL_NAMES: &[&str] = &[
    "flash_attention",
    "rms_norm",
    "swiglu",
    "rope",
    "cross_entropy",
];

/// `kiln bench kernels`: each custom kernel against its reference on `device` (forward and
/// backward under autodiff), the median of `repeats` timed samples after warm-up. `only`
/// names the kernels to run (empty: all).
pub fn kernels(
    device: &ComputeDevice,
    repeats: usize,
    quick: bool,
    only: &[String],
) -> Result<Vec<KernelBench>> {
    anyhow::ensure!(
        device.is_wgpu() || kernels::is_cpu(&device.device),
        "the custom kernels run on wgpu devices and the CPU (--device wgpu or cpu)"
    );
    let mut rows = Vec::new();
    let cases = kernel_cases(&device.device, quick)
        .into_iter()
        .filter(|case| only.is_empty() || only.iter().any(|k| k == case.kernel));
    for case in cases {
        let time = |variant: Variant| {
            // Warm-up (compilation and autotune), then enough passes per sample for about
            // 100 ms, so that the wait for the device and timer noise do not dominate.
            case.time(variant, 1);
            let once = case.time(variant, 1);
            let iterations = ((100.0 / once).ceil() as usize).clamp(1, 50);
            // Back-to-back passes can fuse differently from a single one: compile those too.
            case.time(variant, iterations);
            let mut times: Vec<f64> = (0..repeats)
                .map(|_| case.time(variant, iterations))
                .collect();
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        };
        let custom_ms = time(Variant::Custom);
        let reference_ms = time(Variant::Reference);
        let burn_attention_ms = case.has_burn.then(|| time(Variant::BurnAttention));
        let max_rel_err = max_rel_err(
            &case.run_read(Variant::Custom),
            &case.run_read(Variant::Reference),
        );
        let row = KernelBench {
            kernel: case.kernel.to_string(),
            shape: case.shape.clone(),
            custom_ms,
            reference_ms,
            speedup: reference_ms / custom_ms,
            burn_attention_ms,
            speedup_vs_burn: burn_attention_ms.map(|b| b / custom_ms),
            max_rel_err,
        };
        eprintln!(
            "{:<16} {:<22} custom {:>9.2} ms  reference {:>9.2} ms  x{:.2}{}  err {:.1e}",
            row.kernel,
            row.shape,
            row.custom_ms,
            row.reference_ms,
            row.speedup,
            row.burn_attention_ms
                .map(|b| format!("  burn {b:.2} ms (x{:.2})", b / row.custom_ms))
                .unwrap_or_default(),
            row.max_rel_err
        );
        rows.push(row);
    }
    Ok(rows)
}

#[derive(Debug, Serialize)]
pub struct GenerateBench {
    pub model: String,
    pub device: String,
    pub kernels: String,
    pub params: u64,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Reading the file into host f32 weights (parsing, dequantising, tokenizer).
    pub read_s: f64,
    /// Reading plus building the model on the device.
    pub load_s: f64,
    /// The prompt's forward pass and the first token.
    pub prefill_ms: f64,
    /// Every later token: one cached forward pass of the whole batch per step.
    pub decode_ms_per_step: f64,
    /// New tokens of all rows per second while decoding.
    pub decode_tokens_per_s: f64,
}

/// The sizes `kiln bench generate` was given, checked before anything is loaded (the model's
/// context is checked once it is read).
pub fn check_generate_sizes(
    batches: &[usize],
    prompt_tokens: usize,
    new_tokens: usize,
) -> Result<()> {
    anyhow::ensure!(new_tokens >= 2, "--new-tokens must be at least 2");
    anyhow::ensure!(prompt_tokens >= 1, "--prompt-tokens must be at least 1");
    anyhow::ensure!(
        !batches.is_empty() && batches.iter().all(|&b| b >= 1),
        "--batch must list batch sizes of at least 1"
    );
    anyhow::ensure!(
        prompt_tokens.checked_add(new_tokens).is_some(),
        "--prompt-tokens and --new-tokens add up to more than any context"
    );
    Ok(())
}

/// Generation speed with the KV cache: `batch` random prompts of `prompt_tokens` tokens, each
/// continued greedily by exactly `new_tokens` tokens, after one untimed warm-up run.
pub fn generate(
    model_path: &std::path::Path,
    device: &ComputeDevice,
    kernels: Kernels,
    batches: &[usize],
    prompt_tokens: usize,
    new_tokens: usize,
) -> Result<Vec<GenerateBench>> {
    check_generate_sizes(batches, prompt_tokens, new_tokens)?;
    let start = Instant::now();
    let foreign = crate::interop::convert::read(model_path)?;
    let read_s = start.elapsed().as_secs_f64();
    let loaded = crate::interop::convert::load_read_model(foreign, &device.device, kernels)?;
    let load_s = start.elapsed().as_secs_f64();
    let model = &loaded.loaded.model;
    let config = &loaded.loaded.model_config;
    // The sum cannot wrap: `check_generate_sizes` ruled that out.
    anyhow::ensure!(
        prompt_tokens + new_tokens <= config.max_seq_len,
        "--prompt-tokens and --new-tokens exceed the model's context of {}",
        config.max_seq_len
    );
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let greedy = crate::infer::generate::SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        min_p: 0.0,
        max_tokens: new_tokens,
    };
    // No token id is u32::MAX: every row runs the full `new_tokens`.
    let never = u32::MAX;
    let mut results = Vec::new();
    for &batch in batches {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|_| {
                (0..prompt_tokens)
                    .map(|_| rng.random_range(0..config.vocab_size as u32))
                    .collect()
            })
            .collect();
        let warmup = crate::infer::generate::SamplingParams {
            max_tokens: 3,
            ..greedy.clone()
        };
        crate::infer::generate::generate(model, &prompts, &warmup, never, 0, &mut rng)?;
        let start = Instant::now();
        let mut first_token = None;
        let out = crate::infer::generate::generate_with(
            model,
            &prompts,
            &greedy,
            never,
            0,
            &mut rng,
            &mut |row, _| {
                if row == 0 && first_token.is_none() {
                    first_token = Some(Instant::now());
                }
                std::ops::ControlFlow::Continue(())
            },
        )?;
        let end = Instant::now();
        anyhow::ensure!(out.iter().all(|o| o.tokens.len() == new_tokens));
        let first = first_token.expect("tokens were generated");
        let decode_s = (end - first).as_secs_f64();
        let steps = (new_tokens - 1) as f64;
        results.push(GenerateBench {
            model: model_path.display().to_string(),
            device: device.describe(),
            kernels: model.kernels().name().to_string(),
            params: config.num_params(),
            batch,
            prompt_tokens,
            new_tokens,
            read_s,
            load_s,
            prefill_ms: (first - start).as_secs_f64() * 1e3,
            decode_ms_per_step: decode_s / steps * 1e3,
            decode_tokens_per_s: batch as f64 * steps / decode_s,
        });
    }
    Ok(results)
}

/// Scoring K answers per prompt with a reward model: the prompt run once into a KV cache
/// shared by its K answers ([`crate::model::reward::shared_prefix_scores`]) against every
/// prompt-plus-answer as its own right-padded row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScoreBench {
    pub device: String,
    pub prompts: usize,
    pub k: usize,
    pub prompt_tokens: usize,
    pub answer_tokens: usize,
    /// Answers scored per second each way (median of `repeats` timed runs), and the largest
    /// difference between the two ways' scores.
    pub shared_prefix_per_s: f64,
    pub right_padded_per_s: f64,
    pub max_abs_difference: f32,
}

#[allow(clippy::too_many_arguments)]
pub fn score(
    config: &crate::config::ModelConfig,
    device: &ComputeDevice,
    prompts: usize,
    k: usize,
    prompt_tokens: usize,
    answer_tokens: usize,
    repeats: usize,
) -> Result<ScoreBench> {
    use crate::model::reward::{Arrangement, RewardModel, ScoreBatch, shared_prefix_scores};
    anyhow::ensure!(
        prompts > 0 && k > 0 && prompt_tokens > 0 && answer_tokens > 0 && repeats > 0,
        "every count must be at least 1"
    );
    anyhow::ensure!(
        prompt_tokens + answer_tokens <= config.max_seq_len,
        "prompt and answer exceed the model's context of {}",
        config.max_seq_len
    );
    let model = RewardModel::new(config, 0, &device.device);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut draw = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.random_range(1..config.vocab_size as u32))
            .collect()
    };
    // Answers of 1 to `answer_tokens` tokens, as sampled answers are.
    let groups: Vec<Vec<Vec<u32>>> = (0..prompts)
        .map(|_| {
            let prompt = draw(prompt_tokens);
            (0..k)
                .map(|j| {
                    let mut s = prompt.clone();
                    s.extend(draw(1 + (j * 7) % answer_tokens));
                    s
                })
                .collect()
        })
        .collect();
    let refs: Vec<Vec<&[u32]>> = groups
        .iter()
        .map(|g| g.iter().map(Vec::as_slice).collect())
        .collect();
    // Sequence-major, as shared_prefix_scores orders its scores.
    let rows: Vec<Vec<u32>> = (0..k)
        .flat_map(|j| groups.iter().map(move |g| g[j].clone()))
        .collect();
    let shared = || -> Result<Vec<f32>> {
        shared_prefix_scores(&model, &refs, 0)
            .into_data()
            .try_into_vec_as::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let padded = || -> Result<Vec<f32>> {
        model
            .scores(&ScoreBatch::new(&rows, Arrangement::RightPadded, 0))
            .into_data()
            .try_into_vec_as::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let time = |f: &dyn Fn() -> Result<Vec<f32>>| -> Result<(f64, Vec<f32>)> {
        let mut out = f()?; // warm-up
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let start = Instant::now();
            out = f()?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        Ok((times[times.len() / 2], out))
    };
    let (shared_s, a) = time(&shared)?;
    let (padded_s, b) = time(&padded)?;
    let n = (prompts * k) as f64;
    Ok(ScoreBench {
        device: device.describe(),
        prompts,
        k,
        prompt_tokens,
        answer_tokens,
        shared_prefix_per_s: n / shared_s,
        right_padded_per_s: n / padded_s,
        max_abs_difference: a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max),
    })
}
