//! Next-token logits of a model for given token ids, written to a safetensors file
//! (`input_ids` i64 `[1, T]`, `logits` f32 `[1, T, vocab]`): kiln's side of the check that a
//! model exported with `kiln convert --to hf` gives the same logits in Hugging Face
//! transformers (`scripts/hf_logits.py --compare`, `scripts/check-hf-export.sh`).
//!
//! `cargo run --release --example logits -- MODEL --tokens 1,2,3 --out logits.safetensors`

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use burn::tensor::{Int, Tensor, TensorData};
use clap::Parser;
use kiln::interop::checkpoint::NamedTensor;

#[derive(Parser)]
struct Args {
    /// A kiln checkpoint, a Hugging Face Llama directory or a GGUF file.
    model: PathBuf,
    /// Comma-separated token ids.
    #[arg(long)]
    tokens: String,
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let tokens: Vec<i64> = args
        .tokens
        .split(',')
        .map(|t| t.trim().parse().with_context(|| format!("--tokens: {t:?}")))
        .collect::<Result<_>>()?;
    let device = kiln::device::select(kiln::device::DeviceChoice::Cpu)?.device;
    let loaded = kiln::interop::convert::load_model(
        &args.model,
        &device,
        kiln::kernels::Kernels::Reference,
    )?;
    let t = tokens.len();
    let input = Tensor::<2, Int>::from_data(TensorData::new(tokens.clone(), [1, t]), &device);
    let logits = loaded.loaded.model.forward(input, None);
    let vocab = logits.dims()[2];
    let values: Vec<f32> = logits
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(|e| anyhow!("{e:?}"))?;
    let logits = kiln::interop::checkpoint::encode_safetensors(&[NamedTensor {
        name: "logits".into(),
        shape: vec![1, t, vocab],
        values,
    }])?;
    // input_ids as i64, as transformers takes them.
    let ids = safetensors::tensor::TensorView::new(
        safetensors::Dtype::I64,
        vec![1, t],
        bytemuck::cast_slice(&tokens),
    )?;
    let parsed = safetensors::SafeTensors::deserialize(&logits)?;
    let bytes = safetensors::serialize(
        vec![("input_ids", ids), ("logits", parsed.tensor("logits")?)],
        None,
    )?;
    kiln::interop::checkpoint::write_atomic(&args.out, &bytes)?;
    eprintln!("wrote logits [1, {t}, {vocab}] to {}", args.out.display());
    Ok(())
}
