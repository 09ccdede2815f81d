//! Batched generation through the library API: several prompts of different lengths sampled
//! in one batch (left-padded, padding masked), as rejection sampling and PPO will use it.
//!
//!     cargo run --release --example batched_generation -- runs/shakespeare

use anyhow::{Context, Result};
use kiln::device::{self, DeviceChoice};
use kiln::generate::{self, SamplingParams};
use kiln::model::Llama;
use kiln::tokenizer::Tokenizer;
use kiln::{checkpoint, params};

fn main() -> Result<()> {
    let run = std::env::args()
        .nth(1)
        .context("usage: batched_generation RUN_OR_CHECKPOINT_DIR")?;
    let dir = checkpoint::resolve(run.as_ref())?;
    let saved = checkpoint::load(&dir)?;
    let config = saved.config(&dir)?;
    let tokenizer = Tokenizer::from_json(&saved.tokenizer_json)?;
    let device = device::select(DeviceChoice::Auto)?;
    let model = params::import(
        Llama::new(&config.model, 0, &device.device),
        saved.model,
        &dir,
    )?;

    let prompts = ["ROMEO:\n", "HAMLET:\nTo be", "KING LEAR:\nBlow, winds"];
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut ids = vec![tokenizer.bos_id];
            ids.extend(tokenizer.encode(p)?);
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        max_tokens: 60,
    };
    let pad = tokenizer.pad_id.unwrap_or(tokenizer.eos_id);
    let outputs = generate::generate(
        &model,
        &ids,
        &params,
        tokenizer.eos_id,
        pad,
        &mut generate::seeded_rng(7),
    );
    for (prompt, out) in prompts.iter().zip(outputs) {
        println!("--- {prompt:?}\n{prompt}{}\n", tokenizer.decode(&out)?);
    }
    Ok(())
}
