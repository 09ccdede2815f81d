//! Pretraining recipe (Llama 2 sec. 2.2): next-token prediction on packed sequences, AdamW,
//! cosine schedule with warm-up, global-norm clipping, gradient accumulation, periodic
//! evaluation and checkpoints, and exact resume.

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::Config;
use crate::data::corpus::{self, PackedSequences};
use crate::data::tokenizer::Tokenizer;
use crate::infer::generate::{self, SamplingParams};
use crate::interop::convert::LoadedModel;
use crate::model::Llama;
use crate::train::stage::{self, Launch, Stage, TrainingConfig};
use crate::train::step::MicroBatchLoss;
use crate::train::supervised::{self, Objective, RunSummary};

/// Pretraining as a stage: a model drawn from the seed, no `--init`.
pub struct Pretrain;

crate::training_config!(Config);

impl Stage for Pretrain {
    type Config = Config;
    type Model = Llama;
    const COMMAND: &'static str = "pretrain";

    fn start(
        config: &mut Config,
        _init: Option<LoadedModel>,
        seed: u64,
        device: &Device,
    ) -> Result<(Llama, Tokenizer)> {
        let tokenizer = Tokenizer::load(&config.data.tokenizer)?;
        if tokenizer.vocab_size() != config.model.vocab_size {
            bail!(
                "model.vocab_size is {} but the tokenizer {} needs {} (its largest id is {})",
                config.model.vocab_size,
                config.data.tokenizer.display(),
                tokenizer.vocab_size(),
                tokenizer.vocab_size() - 1
            );
        }
        Ok((Llama::new(&config.model, seed, device), tokenizer))
    }

    fn needs_init() -> bool {
        false
    }
}

pub struct PretrainSummary {
    pub run: RunSummary,
    /// The config's prompt continued by the trained model (with `print_sample`).
    pub sample: Option<String>,
}

/// Runs (or resumes) pretraining; with `print_sample`, continues the config's prompt at the
/// end.
pub fn run(launch: &Launch, print_sample: bool) -> Result<PretrainSummary> {
    let started = stage::launch::<Pretrain>(launch)?;
    let (config, tokenizer) = (started.config.clone(), started.tokenizer.clone());

    let documents = corpus::read_corpus(&config.data.corpus)?;
    let splits = corpus::tokenize_corpus(&documents, &tokenizer, config.data.val_fraction)?;
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
    launch.collective.say(&format!(
        "device: {} | model: {:.2}M parameters | data: {} train / {} val sequences of {} tokens",
        launch.device.describe(),
        config.model.num_params() as f64 / 1e6,
        objective.train.len(),
        objective.val.len(),
        seq_len
    ));
    let outcome = supervised::run(started, config.to_toml(), &objective, launch.stop_after)?;

    let sample = if print_sample && !outcome.summary.interrupted {
        let s = &config.sample;
        let params = SamplingParams {
            temperature: s.temperature,
            top_p: s.top_p,
            min_p: 0.0,
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
        Some(format!("{}{}", s.prompt, continuation[0].text))
    } else {
        None
    };
    Ok(PretrainSummary {
        run: outcome.summary,
        sample,
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

    fn loss(&self, model: &Llama, indices: &[usize]) -> MicroBatchLoss {
        let batch = self.train.batch(indices);
        // Every target token counts.
        let tokens = batch.inputs.len() as u64;
        let (inputs, targets) = batch_tensors(&batch, &model.device());
        MicroBatchLoss::from_mean(model.loss(inputs, targets), tokens as f64, tokens)
    }

    fn validation_loss(&self, model: &Llama) -> f64 {
        evaluate(model, &self.val, self.batch_size, self.eval_batches)
    }
}

pub fn batch_tensors(batch: &corpus::Batch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
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
