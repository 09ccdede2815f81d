//! Pretraining recipe (Llama 2 sec. 2.2): next-token prediction on packed sequences, AdamW,
//! cosine schedule with warm-up, global-norm clipping, gradient accumulation, periodic
//! evaluation and checkpoints, and exact resume.

use std::path::PathBuf;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};

use crate::checkpoint;
use crate::config::Config;
use crate::data::{self, PackedSequences};
use crate::device::ComputeDevice;
use crate::generate::{self, SamplingParams};
use crate::model::Llama;
use crate::optim::AdamW;
use crate::tokenizer::Tokenizer;
use crate::trainer::{self, Objective, TrainLoop, TrainState};

pub use crate::trainer::{INTERRUPTED, checkpoints_dir};

pub struct PretrainOptions {
    pub config: Config,
    /// True when the user gave a config (file or `--set`) rather than relying on the
    /// checkpoint's, on resume.
    pub config_given: bool,
    pub out_dir: PathBuf,
    pub resume: bool,
    pub device: ComputeDevice,
    /// Print the closing sample.
    pub print_sample: bool,
    /// Stop (as if interrupted, with a checkpoint) after this many steps of this process; for
    /// tests of resume.
    pub stop_after: Option<u64>,
}

pub struct PretrainSummary {
    pub step: u64,
    pub final_val_loss: Option<f64>,
    pub checkpoint: PathBuf,
    pub sample: Option<String>,
    pub interrupted: bool,
}

pub fn run(options: PretrainOptions) -> Result<PretrainSummary> {
    let PretrainOptions {
        mut config,
        config_given,
        out_dir,
        resume,
        device,
        print_sample,
        stop_after,
    } = options;
    let resume_from = trainer::prepare_out_dir(&out_dir, resume)?;
    let autodiff = device.device.clone().autodiff();

    // Model, optimizer, tokenizer and position: from the newest checkpoint, or fresh.
    let (model, optimizer, tokenizer, state) = match &resume_from {
        Some(dir) => {
            let saved = checkpoint::load(dir)?;
            let saved_config: Config = saved.config(dir)?;
            if config_given {
                if config.model != saved_config.model {
                    bail!(
                        "{}: checkpoint has another model shape than the given config ([model] differs)",
                        dir.display()
                    );
                }
            } else {
                config = saved_config;
            }
            let r = trainer::resume(dir, saved, &config.model, &config.optim, &autodiff)?;
            (r.model, r.optimizer, r.tokenizer, r.state)
        }
        None => {
            let tokenizer = Tokenizer::load(&config.data.tokenizer)?;
            let state = TrainState::start(config.train.seed);
            let model = Llama::new(&config.model, state.seed, &autodiff);
            (model, AdamW::new(config.optim.clone()), tokenizer, state)
        }
    };
    if tokenizer.vocab_size() != config.model.vocab_size {
        bail!(
            "model.vocab_size is {} but the tokenizer {} has {} tokens",
            config.model.vocab_size,
            config.data.tokenizer.display(),
            tokenizer.vocab_size()
        );
    }

    let documents = data::read_corpus(&config.data.corpus)?;
    let splits = data::tokenize_corpus(&documents, &tokenizer, config.data.val_fraction)?;
    let seq_len = config.data.seq_len;
    let objective = NextToken {
        train: PackedSequences::new(splits.train, seq_len),
        val: PackedSequences::new(splits.val, seq_len),
        batch_size: config.train.batch_size,
        eval_batches: config.train.eval_batches,
    };
    if objective.train.is_empty() || objective.val.is_empty() {
        bail!(
            "corpus is too small: it needs more than {} tokens in both splits (data.seq_len)",
            seq_len
        );
    }
    eprintln!(
        "device: {} | model: {:.2}M parameters | data: {} train / {} val sequences of {} tokens",
        device.describe(),
        config.model.num_params() as f64 / 1e6,
        objective.train.len(),
        objective.val.len(),
        seq_len
    );
    let outcome = trainer::run(
        TrainLoop {
            out_dir: &out_dir,
            config_toml: config.to_toml(),
            tokenizer: &tokenizer,
            optim: &config.optim,
            train: &config.train,
            resumed_from: resume_from,
            stop_after,
        },
        model,
        optimizer,
        state,
        &objective,
    )?;

    let sample = if print_sample && !outcome.interrupted {
        let s = &config.sample;
        let params = SamplingParams {
            temperature: s.temperature,
            top_p: s.top_p,
            max_tokens: s.max_tokens,
        };
        let mut rng = generate::seeded_rng(s.seed);
        let continuation = generate::complete(
            &outcome.model.valid(),
            &tokenizer,
            &[s.prompt.as_str()],
            &params,
            &mut rng,
        )?;
        Some(format!("{}{}", s.prompt, continuation[0]))
    } else {
        None
    };
    Ok(PretrainSummary {
        step: outcome.step,
        final_val_loss: outcome.final_val_loss,
        checkpoint: outcome.checkpoint,
        sample,
        interrupted: outcome.interrupted,
    })
}

/// Next-token prediction on packed windows of the corpus.
struct NextToken {
    train: PackedSequences,
    val: PackedSequences,
    batch_size: usize,
    eval_batches: usize,
}

impl Objective for NextToken {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn loss(&self, model: &Llama, indices: &[usize]) -> (Tensor<1>, u64) {
        let batch = self.train.batch(indices);
        let tokens = batch.inputs.len() as u64;
        let (inputs, targets) = batch_tensors(&batch, &model.device());
        (model.loss(inputs, targets), tokens)
    }

    fn validation_loss(&self, model: &Llama) -> f64 {
        evaluate(model, &self.val, self.batch_size, self.eval_batches)
    }
}

pub fn batch_tensors(
    batch: &data::Batch,
    device: &burn::tensor::Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let shape = [batch.batch_size, batch.seq_len];
    (
        Tensor::from_data(TensorData::new(batch.inputs.clone(), shape), device),
        Tensor::from_data(TensorData::new(batch.targets.clone(), shape), device),
    )
}

/// Mean loss over the first `max_batches` batches of the validation sequences (a fixed set,
/// so evaluations are comparable across steps).
pub fn evaluate(
    model: &Llama,
    sequences: &PackedSequences,
    batch_size: usize,
    max_batches: usize,
) -> f64 {
    let device = model.device();
    let n = sequences.len().min(batch_size * max_batches);
    let mut total = 0.0;
    let mut count = 0usize;
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(batch_size) {
        let batch = sequences.batch(chunk);
        let (inputs, targets) = batch_tensors(&batch, &device);
        total += model.loss(inputs, targets).into_scalar::<f32>() as f64 * chunk.len() as f64;
        count += chunk.len();
    }
    total / count as f64
}
