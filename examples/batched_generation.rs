//! Batched generation through the library API: several prompts of different lengths sampled
//! in one batch (left-padded, padding masked), as rejection sampling and PPO will use it.
//!
//!     cargo run --release --example batched_generation -- runs/shakespeare

use anyhow::{Context, Result};
use kiln::device::{self, DeviceChoice};
use kiln::infer::generate::{self, SamplingParams};
use kiln::interop::convert;

fn main() -> Result<()> {
    let run = std::env::args()
        .nth(1)
        .context("usage: batched_generation MODEL (a kiln run or checkpoint, a Hugging Face directory or a GGUF file)")?;
    let device = device::select(DeviceChoice::Auto)?;
    let loaded = convert::load_model(run.as_ref(), &device.device, Default::default())?.loaded;
    let (model, tokenizer) = (loaded.model, loaded.tokenizer);

    let prompts = ["ROMEO:\n", "HAMLET:\nTo be", "KING LEAR:\nBlow, winds"];
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        min_p: 0.05,
        max_tokens: 60,
    };
    let outputs = generate::complete(
        &model,
        &tokenizer,
        &prompts,
        &params,
        &mut generate::seeded_rng(7),
    )?;
    for (prompt, out) in prompts.iter().zip(outputs) {
        println!("--- {prompt:?}\n{prompt}{}\n", out.text);
    }
    Ok(())
}
