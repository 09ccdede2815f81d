//! `kiln bench train`: training throughput of a preset on random tokens.

use std::time::Instant;

use anyhow::Result;
use burn::optim::GradientsParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::{ModelConfig, OptimConfig, Preset};
use crate::data::Batch;
use crate::device::ComputeDevice;
use crate::kernels::KernelChoice;
use crate::model::Llama;
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
