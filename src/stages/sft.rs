//! Supervised fine-tuning recipe (Llama 2 sec. 3.1): dialogues rendered with a chat template,
//! the loss only on assistant answers, samples packed into full sequences where each attends
//! only within itself, cosine schedule from 2e-5, weight decay 0.1, 2 epochs. Starts from a
//! pretrained checkpoint (`--init`).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, OptimConfig, StageConfig, TrainConfig};
use crate::data::chat::{self, ChatTemplate, EncodedDialogue, Message, Role};
use crate::data::tokenizer::Tokenizer;
use crate::kernels::SequenceLayout;
use crate::model::Llama;
use crate::train::stage::{self, Launch, Stage, TrainingConfig};
use crate::train::step::MicroBatchLoss;
use crate::train::supervised::{self, Objective, RunSummary};

/// Which assistant turns of a multi-turn dialogue the loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainOn {
    /// Every assistant turn whose weight is not 0 (the paper's choice).
    All,
    /// Only the last assistant turn.
    Last,
}

/// The SFT data and how it becomes training rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftDataConfig {
    /// JSONL files of dialogues (`{"messages"}` or `{"prompt", "completion"}`).
    pub train: Vec<PathBuf>,
    /// JSONL files for the validation loss; empty: hold out `val_fraction` of `train`.
    pub val: Vec<PathBuf>,
    pub val_fraction: f64,
    /// `llama2` (paper) or `chatml`.
    pub template: ChatTemplate,
    /// Tokens per training row; 0: the model's context length (paper: 4096).
    pub seq_len: usize,
    /// Concatenate samples to fill each row (paper), each attending only within itself with
    /// positions restarting; false: one sample per row, padded.
    pub pack: bool,
    pub train_on: TrainOn,
    /// Skip malformed lines (reporting how many) instead of stopping.
    pub skip_bad_lines: bool,
}

impl SftDataConfig {
    /// The checks of `[data]` that do not depend on how the training files are chosen.
    pub fn validate(&self) -> Result<()> {
        if self.val.is_empty() && !(self.val_fraction > 0.0 && self.val_fraction < 0.5) {
            bail!("data.val_fraction must be in (0, 0.5) when data.val is empty");
        }
        if self.seq_len == 1 {
            bail!("data.seq_len must be at least 2 (or 0: the model's context)");
        }
        Ok(())
    }
}

/// A fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// Taken from the `--init` checkpoint; only `model.kernels` may be set.
    pub model: ModelConfig,
    pub data: SftDataConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig::default(),
            data: SftDataConfig {
                train: Vec::new(),
                val: Vec::new(),
                val_fraction: 0.02,
                template: ChatTemplate::Llama2,
                seq_len: 0,
                pack: true,
                train_on: TrainOn::All,
                skip_bad_lines: false,
            },
            // Paper: cosine schedule from an initial 2e-5, weight decay 0.1.
            optim: OptimConfig {
                lr: 2e-5,
                warmup_steps: 0,
                ..OptimConfig::default()
            },
            // Paper: batch 64, 2 epochs.
            train: TrainConfig {
                batch_size: 64,
                max_steps: 0,
                epochs: 2.0,
                ..TrainConfig::default()
            },
        }
    }
}

impl StageConfig for SftConfig {
    fn validate(&self) -> Result<()> {
        let d = &self.data;
        if d.train.is_empty() {
            bail!("data.train must name at least one JSONL file");
        }
        d.validate()?;
        self.optim.validate()?;
        self.train.validate()
    }

    fn known_keys() -> toml::Table {
        let mut known = toml::Table::try_from(Self::default()).expect("serialises");
        let mut model = toml::Table::new();
        model.insert("kernels".into(), toml::Value::String("custom".into()));
        known.insert("model".into(), toml::Value::Table(model));
        known
    }
}

impl SftConfig {
    /// The SFT run of a stage that trains with this recipe (GAtt, rejection sampling): its
    /// own samples `first`, then the files of its `[data]`.
    pub fn on_samples<C: TrainingConfig>(config: &C, data: &SftDataConfig, first: &Path) -> Self {
        let mut data = data.clone();
        data.train.insert(0, first.to_path_buf());
        SftConfig {
            model: config.model().clone(),
            data,
            optim: config.optim().clone(),
            train: config.train().clone(),
        }
    }

    /// Rows are this long: `data.seq_len`, or the model's context.
    pub fn seq_len(&self) -> usize {
        match self.data.seq_len {
            0 => self.model.max_seq_len,
            n => n,
        }
    }
}

/// Reads and renders every dialogue of `paths`.
pub fn read_dialogues(paths: &[PathBuf], skip_bad_lines: bool) -> Result<Vec<Vec<Message>>> {
    chat::read_all(paths, skip_bad_lines, chat::parse_sft)
}

/// Applies `train_on` to a dialogue: with `Last`, earlier assistant turns get weight 0.
pub fn apply_train_on(mut messages: Vec<Message>, train_on: TrainOn) -> Vec<Message> {
    if train_on == TrainOn::Last {
        let last = messages.iter().rposition(|m| m.role == Role::Assistant);
        for (i, m) in messages.iter_mut().enumerate() {
            if m.role == Role::Assistant && Some(i) != last {
                m.weight = Some(0);
            }
        }
    }
    messages
}

/// Training rows of `seq_len` tokens: inputs, next-token targets, loss weights (1 on trained
/// answer tokens) and the sample (segment) each token belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct SftRows {
    pub seq_len: usize,
    pub inputs: Vec<Vec<u32>>,
    pub targets: Vec<Vec<u32>>,
    pub weights: Vec<Vec<f32>>,
    pub segments: Vec<Vec<i32>>,
    /// Samples cut at `seq_len` (their tail is not trained).
    pub truncated: usize,
    /// Samples dropped because nothing trained was left after the cut.
    pub dropped: usize,
}

impl SftRows {
    /// Lays out `samples` in rows: with `pack`, consecutive samples share a row while they
    /// fit; without, one sample per row. The rest of a row is padding (weight 0, a segment of
    /// its own).
    pub fn new(samples: &[EncodedDialogue], seq_len: usize, pack: bool, pad_id: u32) -> Self {
        let mut rows = SftRows {
            seq_len,
            inputs: Vec::new(),
            targets: Vec::new(),
            weights: Vec::new(),
            segments: Vec::new(),
            truncated: 0,
            dropped: 0,
        };
        let mut row = RowBuilder::default();
        for sample in samples {
            // A sample of n tokens gives n - 1 (input, target) pairs.
            let mut len = sample.tokens.len().saturating_sub(1);
            if len > seq_len {
                len = seq_len;
                rows.truncated += 1;
            }
            if !sample.trained[1..=len].iter().any(|&t| t) {
                rows.dropped += 1;
                continue;
            }
            if !pack || row.inputs.len() + len > seq_len {
                rows.finish(&mut row, pad_id);
            }
            let segment = row.samples;
            row.samples += 1;
            row.inputs.extend(&sample.tokens[..len]);
            row.targets.extend(&sample.tokens[1..=len]);
            row.weights
                .extend(sample.trained[1..=len].iter().map(|&t| t as u8 as f32));
            row.segments.extend(std::iter::repeat_n(segment, len));
        }
        rows.finish(&mut row, pad_id);
        rows
    }

    fn finish(&mut self, row: &mut RowBuilder, pad_id: u32) {
        if row.inputs.is_empty() {
            return;
        }
        let mut row = std::mem::take(row);
        let pad = self.seq_len - row.inputs.len();
        row.inputs.extend(std::iter::repeat_n(pad_id, pad));
        row.targets.extend(std::iter::repeat_n(pad_id, pad));
        row.weights.extend(std::iter::repeat_n(0.0, pad));
        row.segments.extend(std::iter::repeat_n(row.samples, pad));
        self.inputs.push(row.inputs);
        self.targets.push(row.targets);
        self.weights.push(row.weights);
        self.segments.push(row.segments);
    }

    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// Trained tokens of the rows `indices`.
    pub fn trained_tokens(&self, indices: &[usize]) -> f64 {
        indices
            .iter()
            .map(|&i| self.weights[i].iter().sum::<f32>() as f64)
            .sum()
    }

    /// The rows `indices` as tensors on `device`, with their layout.
    pub fn batch(&self, indices: &[usize], device: &Device) -> SftBatch {
        let (b, t) = (indices.len(), self.seq_len);
        let ints = |rows: &Vec<Vec<u32>>| -> Tensor<2, Int> {
            let values: Vec<i64> = indices
                .iter()
                .flat_map(|&i| rows[i].iter().map(|&v| v as i64))
                .collect();
            Tensor::from_data(TensorData::new(values, [b, t]), device)
        };
        let weights: Vec<f32> = indices
            .iter()
            .flat_map(|&i| self.weights[i].iter().copied())
            .collect();
        let segments: Vec<i32> = indices
            .iter()
            .flat_map(|&i| self.segments[i].iter().copied())
            .collect();
        SftBatch {
            inputs: ints(&self.inputs),
            targets: ints(&self.targets),
            weights: Tensor::from_data(TensorData::new(weights, [b, t]), device),
            layout: SequenceLayout::packed(b, t, segments),
        }
    }
}

#[derive(Default)]
struct RowBuilder {
    inputs: Vec<u32>,
    targets: Vec<u32>,
    weights: Vec<f32>,
    segments: Vec<i32>,
    samples: i32,
}

pub struct SftBatch {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
    pub weights: Tensor<2>,
    pub layout: SequenceLayout,
}

impl SftBatch {
    pub fn loss(self, model: &Llama) -> Tensor<1> {
        model.masked_loss(self.inputs, self.targets, self.weights, &self.layout)
    }
}

/// Answer-only next-token loss on packed rows.
pub struct AnswerLoss {
    pub train: SftRows,
    pub val: SftRows,
    pub batch_size: usize,
    pub eval_batches: usize,
}

impl Objective for AnswerLoss {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn loss(&self, model: &Llama, indices: &[usize]) -> MicroBatchLoss {
        // Every row is `seq_len` tokens, padding included; the loss counts answer tokens.
        let tokens = (indices.len() * self.train.seq_len) as u64;
        let mean = self.train.batch(indices, &model.device()).loss(model);
        MicroBatchLoss::from_mean(mean, self.train.trained_tokens(indices), tokens)
    }

    fn validation_loss(&self, model: &Llama) -> f64 {
        let n = self.val.len().min(self.batch_size * self.eval_batches);
        let indices: Vec<usize> = (0..n).collect();
        let (mut total, mut count) = (0.0, 0.0);
        for chunk in indices.chunks(self.batch_size) {
            let trained = self.val.trained_tokens(chunk);
            let loss = self.val.batch(chunk, &model.device()).loss(model);
            total += loss.into_scalar::<f32>() as f64 * trained;
            count += trained;
        }
        total / count.max(1.0)
    }
}

/// Renders dialogues into tokens, shuffled with `seed` so packed rows mix sources.
pub fn encode_all(
    dialogues: Vec<Vec<Message>>,
    template: ChatTemplate,
    tokenizer: &Tokenizer,
    train_on: TrainOn,
    seed: u64,
) -> Result<Vec<EncodedDialogue>> {
    let mut encoded = dialogues
        .into_iter()
        .map(|d| template.encode(tokenizer, &apply_train_on(d, train_on)))
        .collect::<Result<Vec<_>>>()?;
    encoded.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    Ok(encoded)
}

/// Fine-tuning as a stage: starts from the `--init` model, whose shape it takes.
pub struct Sft;

crate::training_config!(SftConfig);

impl Stage for Sft {
    type Config = SftConfig;
    type Model = Llama;
    const COMMAND: &'static str = "sft";
}

/// Runs (or resumes) fine-tuning.
pub fn run(launch: &Launch) -> Result<RunSummary> {
    let started = stage::launch::<Sft>(launch)?;
    let config_toml = started.config.to_toml();
    train(started, launch, config_toml)
}

/// Fine-tunes a launched SFT stage, storing `config_toml` as the run's configuration (GAtt
/// trains with the SFT recipe but stores its own, so its `--resume` reads that back).
pub fn train(
    started: stage::Started<Sft>,
    launch: &Launch,
    config_toml: String,
) -> Result<RunSummary> {
    let (config, tokenizer) = (&started.config, &started.tokenizer);
    let seed = started.state.seed;
    let seq_len = config.seq_len();
    if seq_len > config.model.max_seq_len {
        bail!(
            "data.seq_len ({seq_len}) exceeds the model's context (model.max_seq_len {})",
            config.model.max_seq_len
        );
    }
    let d = &config.data;
    d.template.check(tokenizer)?;
    let mut train_dialogues = read_dialogues(&d.train, d.skip_bad_lines)?;
    let val_dialogues = if d.val.is_empty() {
        // Hold out a seeded sample of the training dialogues.
        let mut rng = ChaCha8Rng::seed_from_u64(config.train.seed ^ 0x5eed);
        train_dialogues.shuffle(&mut rng);
        let n_val = ((train_dialogues.len() as f64 * d.val_fraction).ceil() as usize).max(1);
        if n_val >= train_dialogues.len() {
            bail!("too few dialogues to hold out a validation set: give data.val");
        }
        train_dialogues.split_off(train_dialogues.len() - n_val)
    } else {
        read_dialogues(&d.val, d.skip_bad_lines)?
    };
    let pad_id = tokenizer.pad_id.unwrap_or(tokenizer.eos_id);
    let n_train = train_dialogues.len();
    let encode = |dialogues| encode_all(dialogues, d.template, tokenizer, d.train_on, seed);
    let train_rows = SftRows::new(&encode(train_dialogues)?, seq_len, d.pack, pad_id);
    let val_rows = SftRows::new(&encode(val_dialogues)?, seq_len, d.pack, pad_id);
    if train_rows.is_empty() || val_rows.is_empty() {
        bail!("no trainable samples: every dialogue was empty after the cut at {seq_len} tokens");
    }
    let trained = train_rows.trained_tokens(&(0..train_rows.len()).collect::<Vec<_>>());
    let (truncated, dropped) = (train_rows.truncated, train_rows.dropped);
    launch.collective.say(&format!(
        "device: {} | model: {:.2}M parameters | data: {n_train} dialogues in {} rows of {seq_len} tokens ({trained} trained tokens), {} val rows{}",
        launch.device.describe(),
        config.model.num_params() as f64 / 1e6,
        train_rows.len(),
        val_rows.len(),
        match truncated + dropped {
            0 => String::new(),
            _ => format!(" | {truncated} cut at {seq_len} tokens, {dropped} dropped"),
        }
    ));
    let objective = AnswerLoss {
        train: train_rows,
        val: val_rows,
        batch_size: config.train.batch_size,
        eval_batches: config.train.eval_batches,
    };
    Ok(supervised::run(started, config_toml, &objective, launch.stop_after)?.summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    #[test]
    fn config_takes_sft_defaults_and_rejects_model_shape_keys() {
        let c: SftConfig = config::load(None, &["data.train=[\"a.jsonl\"]".into()]).unwrap();
        assert_eq!((c.optim.lr, c.optim.weight_decay), (2e-5, 0.1));
        assert_eq!(
            (c.train.epochs, c.train.max_steps, c.train.batch_size),
            (2.0, 0, 64)
        );
        assert!(c.data.pack);
        // A [train] section given in part keeps the SFT defaults for the rest.
        let c: SftConfig = config::load(
            None,
            &[
                "data.train=[\"a.jsonl\"]".into(),
                "train.batch_size=8".into(),
            ],
        )
        .unwrap();
        assert_eq!((c.train.epochs, c.train.max_steps), (2.0, 0));
        assert_eq!(c.train.total_steps(100), 25);
        let e = config::load::<SftConfig>(None, &["model.dim=64".into()]).unwrap_err();
        assert!(e.to_string().contains("unknown key model.dim"), "{e}");
        let e = config::load::<SftConfig>(None, &[]).unwrap_err();
        assert!(e.to_string().contains("data.train"), "{e}");
    }
}
