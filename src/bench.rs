//! `kiln bench train`: training throughput of a preset on random tokens.
//! `kiln bench kernels`: the custom WGSL kernels against the reference ops, side by side.

use std::time::Instant;

use anyhow::Result;
use burn::optim::GradientsParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::{ModelConfig, OptimConfig, Preset};
use crate::data::Batch;
use crate::device::ComputeDevice;
use crate::kernels::{self, KernelChoice, Kernels, PreparedLayout, SequenceLayout};
use crate::model::Llama;
use crate::ops::RopeTables;
use crate::optim::AdamW;
use crate::pretrain::batch_tensors;

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
}

/// Times `steps` full training steps (forward, backward, clipping, AdamW) after `warmup`
/// untimed ones; the device is synchronised by reading the loss back each step.
pub fn train(
    preset: Preset,
    device: &ComputeDevice,
    steps: usize,
    warmup: usize,
    kernels: KernelChoice,
) -> Result<TrainBench> {
    let config = ModelConfig {
        kernels,
        ..preset.model()
    };
    let (batch_size, seq_len) = (preset.bench_batch_size(), config.max_seq_len);
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
    let mut timed = 0.0;
    for i in 0..warmup + steps {
        let batch = random_batch();
        let start = Instant::now();
        let (inputs, targets) = batch_tensors(&batch, &autodiff);
        let loss = model.loss(inputs, targets);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let (updated, _) = optimizer.step(model, grads, 3e-4);
        model = updated;
        let _: f32 = loss.into_scalar();
        if i >= warmup {
            timed += start.elapsed().as_secs_f64();
        }
    }
    let step_s = timed / steps as f64;
    Ok(TrainBench {
        preset: format!("{preset:?}"),
        device: device.describe(),
        kernels,
        params: config.num_params(),
        batch_size,
        seq_len,
        steps,
        tokens_per_s: (batch_size * seq_len) as f64 / step_s,
        step_ms: step_s * 1e3,
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

/// A benchmark case: forward plus backward of one op on fixed random inputs. With `read`,
/// returns the output and the input gradients; without, only waits for the device.
struct KernelCase {
    kernel: &'static str,
    shape: String,
    run: Box<dyn Fn(Variant, bool) -> Vec<Vec<f32>>>,
    has_burn: bool,
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().expect("f32 tensor")
}

fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn kernel_cases(device: &Device, quick: bool) -> Vec<KernelCase> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let ad = device.clone().autodiff();
    let mut cases = Vec::new();

    // Attention: the goal shape, batch 4, 8 heads, T 1024, head dim 64.
    let (b, t, h, d) = if quick {
        (1, 128, 2, 32)
    } else {
        (4, 1024, 8, 64)
    };
    let q = random(&mut rng, b * t * h * d, 1.0);
    let k = random(&mut rng, b * t * h * d, 1.0);
    let v = random(&mut rng, b * t * h * d, 1.0);
    let probe = random(&mut rng, b * t * h * d, 1.0);
    {
        let ad = ad.clone();
        cases.push(KernelCase {
            kernel: "flash_attention",
            shape: format!("b{b} h{h} t{t} d{d} causal"),
            has_burn: true,
            run: Box::new(move |variant, read| {
                let shape = [b, t, h, d];
                let mk = |x: &[f32]| {
                    Tensor::<4>::from_data(TensorData::new(x.to_vec(), shape), &ad).require_grad()
                };
                let (qt, kt, vt) = (mk(&q), mk(&k), mk(&v));
                let out = match variant {
                    Variant::BurnAttention => {
                        let options = burn::tensor::ops::AttentionModuleOptions {
                            scale: None,
                            softcap: None,
                            is_causal: true,
                        };
                        burn::tensor::module::attention(
                            qt.clone().swap_dims(1, 2),
                            kt.clone().swap_dims(1, 2),
                            vt.clone().swap_dims(1, 2),
                            None,
                            None,
                            options,
                        )
                        .swap_dims(1, 2)
                    }
                    _ => {
                        let kernels = if variant == Variant::Custom {
                            Kernels::Custom
                        } else {
                            Kernels::Reference
                        };
                        let tables = RopeTables::new(t, d, 10_000.0, &ad);
                        let layout = PreparedLayout::new(
                            &SequenceLayout::causal(b, t),
                            kernels,
                            &tables,
                            1,
                            &ad,
                        );
                        layout.attention(qt.clone(), kt.clone(), vt.clone())
                    }
                };
                let p = Tensor::<4>::from_data(TensorData::new(probe.clone(), shape), &ad);
                let grads = (out.clone() * p).sum().backward();
                let gq = qt.grad(&grads).unwrap();
                let gk = kt.grad(&grads).unwrap();
                let gv = vt.grad(&grads).unwrap();
                finish(
                    read,
                    vec![
                        host_if(read, out),
                        host_if(read, gq),
                        host_if(read, gk),
                        host_if(read, gv),
                    ],
                    &ad,
                )
            }),
        });
    }

    // Elementwise and row ops at bench-5m / bench-32m sizes (batch 8 x 256 tokens).
    let rows = if quick { 64 } else { 2048 };
    for dim in if quick { vec![64] } else { vec![256, 512] } {
        let x = random(&mut rng, rows * dim, 2.0);
        let w = random(&mut rng, dim, 1.0);
        let probe = random(&mut rng, rows * dim, 1.0);
        let ad = ad.clone();
        cases.push(KernelCase {
            kernel: "rms_norm",
            shape: format!("{rows}x{dim}"),
            has_burn: false,
            run: Box::new(move |variant, read| {
                let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [rows, dim]), &ad)
                    .require_grad();
                let wt =
                    Tensor::<1>::from_data(TensorData::new(w.clone(), [dim]), &ad).require_grad();
                let y = kernels::rms_norm(xt.clone(), wt.clone(), 1e-5, pick(variant));
                let p = Tensor::<2>::from_data(TensorData::new(probe.clone(), [rows, dim]), &ad);
                let grads = (y.clone() * p).sum().backward();
                let (gx, gw) = (xt.grad(&grads).unwrap(), wt.grad(&grads).unwrap());
                finish(
                    read,
                    vec![host_if(read, y), host_if(read, gx), host_if(read, gw)],
                    &ad,
                )
            }),
        });
    }
    for ffn in if quick { vec![96] } else { vec![704, 1408] } {
        let a = random(&mut rng, rows * ffn, 4.0);
        let u = random(&mut rng, rows * ffn, 2.0);
        let probe = random(&mut rng, rows * ffn, 1.0);
        let ad = ad.clone();
        cases.push(KernelCase {
            kernel: "swiglu",
            shape: format!("{rows}x{ffn}"),
            has_burn: false,
            run: Box::new(move |variant, read| {
                let mk = |x: &[f32]| {
                    Tensor::<2>::from_data(TensorData::new(x.to_vec(), [rows, ffn]), &ad)
                        .require_grad()
                };
                let (at, ut) = (mk(&a), mk(&u));
                let y = kernels::swiglu(at.clone(), ut.clone(), pick(variant));
                let p = Tensor::<2>::from_data(TensorData::new(probe.clone(), [rows, ffn]), &ad);
                let grads = (y.clone() * p).sum().backward();
                let (ga, gu) = (at.grad(&grads).unwrap(), ut.grad(&grads).unwrap());
                finish(
                    read,
                    vec![host_if(read, y), host_if(read, ga), host_if(read, gu)],
                    &ad,
                )
            }),
        });
    }
    {
        let (bt, heads, hd) = if quick { (64, 2, 32) } else { (2048, 8, 32) };
        let x = random(&mut rng, bt * heads * hd, 2.0);
        let probe = random(&mut rng, bt * heads * hd, 1.0);
        let ad = ad.clone();
        let seq = if quick { 64 } else { 256 };
        cases.push(KernelCase {
            kernel: "rope",
            shape: format!("{}x{seq}x{heads}x{hd}", bt / seq),
            has_burn: false,
            run: Box::new(move |variant, read| {
                let shape = [bt / seq, seq, heads, hd];
                let xt =
                    Tensor::<4>::from_data(TensorData::new(x.clone(), shape), &ad).require_grad();
                let tables = RopeTables::new(seq, hd, 10_000.0, &ad);
                let layout = PreparedLayout::new(
                    &SequenceLayout::causal(bt / seq, seq),
                    pick(variant),
                    &tables,
                    1,
                    &ad,
                );
                let y = layout.rope(xt.clone());
                let p = Tensor::<4>::from_data(TensorData::new(probe.clone(), shape), &ad);
                let grads = (y.clone() * p).sum().backward();
                let gx = xt.grad(&grads).unwrap();
                finish(read, vec![host_if(read, y), host_if(read, gx)], &ad)
            }),
        });
    }
    for vocab in if quick { vec![500] } else { vec![4096, 8192] } {
        let logits = random(&mut rng, rows * vocab, 6.0);
        let targets: Vec<i32> = (0..rows)
            .map(|_| rng.random_range(0..vocab as i32))
            .collect();
        let ad = ad.clone();
        cases.push(KernelCase {
            kernel: "cross_entropy",
            shape: format!("{rows}x{vocab}"),
            has_burn: false,
            run: Box::new(move |variant, read| {
                let z = Tensor::<2>::from_data(TensorData::new(logits.clone(), [rows, vocab]), &ad)
                    .require_grad();
                let tg = Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [rows]), &ad);
                let loss = kernels::cross_entropy(z.clone(), tg, None, pick(variant));
                let grads = loss.clone().backward();
                let gz = z.grad(&grads).unwrap();
                finish(read, vec![host_if(read, loss), host_if(read, gz)], &ad)
            }),
        });
    }
    cases
}

fn pick(variant: Variant) -> Kernels {
    match variant {
        Variant::Custom => Kernels::Custom,
        _ => Kernels::Reference,
    }
}

/// The tensor's values when reading, else nothing (the tensor is dropped; its work is queued).
fn host_if<const D: usize>(read: bool, t: Tensor<D>) -> Option<Vec<f32>> {
    read.then(|| host(t))
}

/// The read values, or an empty list after waiting for the device to finish the queued work.
fn finish(read: bool, outs: Vec<Option<Vec<f32>>>, device: &Device) -> Vec<Vec<f32>> {
    if read {
        outs.into_iter().map(|v| v.expect("read")).collect()
    } else {
        device.sync().expect("device sync");
        Vec::new()
    }
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

/// `kiln bench kernels`: each custom kernel against its reference on `device` (forward and
/// backward under autodiff), median of `repeats` timed runs after one warm-up run.
pub fn kernels(device: &ComputeDevice, repeats: usize, quick: bool) -> Result<Vec<KernelBench>> {
    anyhow::ensure!(
        device.is_wgpu(),
        "the custom kernels run on wgpu devices only (--device wgpu)"
    );
    let mut rows = Vec::new();
    for case in kernel_cases(&device.device, quick) {
        let time = |variant: Variant| {
            (case.run)(variant, false); // warm-up: compilation and autotune
            let mut times: Vec<f64> = (0..repeats)
                .map(|_| {
                    let start = Instant::now();
                    (case.run)(variant, false);
                    start.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        };
        let custom_ms = time(Variant::Custom);
        let reference_ms = time(Variant::Reference);
        let burn_attention_ms = case.has_burn.then(|| time(Variant::BurnAttention));
        let max_rel_err = max_rel_err(
            &(case.run)(Variant::Custom, true),
            &(case.run)(Variant::Reference, true),
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
