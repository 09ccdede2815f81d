//! Where a training step's time goes: forward, backward and optimizer separately, on a preset.
//!
//!     cargo run --release --example profile_step -- bench-5m

use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use burn::module::Module;
use burn::optim::GradientsParams;
use clap::ValueEnum;
use kiln::config::{OptimConfig, Preset};
use kiln::data::corpus::Batch;
use kiln::device::ComputeDevice;
use kiln::model::Llama;
use kiln::stages::pretrain::batch_tensors;
use kiln::train::optim::AdamW;

fn main() {
    let name = std::env::args().nth(1).unwrap_or_else(|| "bench-5m".into());
    let preset = Preset::from_str(&name, true).expect("a preset name");
    let config = preset.model();
    let device = ComputeDevice::cpu().device.autodiff();
    let (b, t) = (preset.bench_batch_size(), config.max_seq_len);
    let mut model = Llama::new(&config, 0, &device);
    let mut optimizer = AdamW::new(OptimConfig::default());
    let batch = Batch {
        inputs: (0..b * t)
            .map(|i| (i * 7 % config.vocab_size) as i64)
            .collect(),
        targets: (0..b * t)
            .map(|i| (i * 13 % config.vocab_size) as i64)
            .collect(),
        batch_size: b,
        seq_len: t,
    };
    let mut totals = [0.0f64; 4];
    let steps = 5;
    for i in 0..steps + 1 {
        let (inputs, targets) = batch_tensors(&batch, &device);
        let start = Instant::now();
        let loss = model.loss(inputs.clone(), targets.clone());
        let _: f32 = loss.clone().into_scalar();
        let forward = start.elapsed().as_secs_f64();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let _ = device.sync();
        let backward = start.elapsed().as_secs_f64() - forward;
        let (updated, _) = optimizer.step(model, grads, 1e-4);
        model = updated;
        let _ = device.sync();
        let total = start.elapsed().as_secs_f64();
        let inference_start = Instant::now();
        let _: f32 = model
            .valid()
            .loss(inputs.inner(), targets.inner())
            .into_scalar();
        let inference = inference_start.elapsed().as_secs_f64();
        if i > 0 {
            for (acc, v) in
                totals
                    .iter_mut()
                    .zip([forward, backward, total - forward - backward, inference])
            {
                *acc += v / steps as f64;
            }
        }
    }
    println!(
        "{name}: forward {:.0} ms, backward {:.0} ms, optimizer {:.0} ms, forward without autodiff {:.0} ms",
        totals[0] * 1e3,
        totals[1] * 1e3,
        totals[2] * 1e3,
        totals[3] * 1e3
    );
}
