//! Reward models (Llama 2 sec. 3.2.2): the chat model's backbone with its next-token head
//! replaced by a scalar regression head, read at the last token of the response, trained with
//! the binary ranking loss `-log(sigmoid(r(x, y_c) - r(x, y_r) - m(rating)))`.
//!
//! Two of them are trained from the same preference files: the helpfulness RM on all
//! helpfulness pairs plus as many safety pairs, the safety RM on all safety pairs plus
//! helpfulness pairs at 90/10. Pairs carry `"safety": true|false`.

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use burn::module::{Module, Param};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::data::chat::{self, ChatTemplate, Message, PreferencePair, Rating, Role};
use crate::config::{ModelConfig, OptimConfig, StageConfig, TrainConfig};
use crate::data::tokenizer::Tokenizer;
use crate::interop::{checkpoint, params};
use crate::kernels::SequenceLayout;
use crate::model::{KvCache, Linear, Llama};
use crate::train::stage::{self, Launch, Stage, StageModel, TrainingConfig};
use crate::train::step::MicroBatchLoss;
use crate::train::supervised::{self, Objective};

/// The chat backbone and a scalar head.
#[derive(Module, Debug)]
pub struct RewardModel {
    /// The chat model; its next-token head is dropped (`lm_head` is `None`).
    pub backbone: Llama,
    /// `[1, dim]`: the regression head, read at the last token of the response.
    pub score: Linear,
}

impl RewardModel {
    /// A reward model of shape `config`: a fresh backbone and a head drawn from N(0, init_std).
    pub fn new(config: &ModelConfig, seed: u64, device: &Device) -> Self {
        let mut backbone = Llama::new(config, seed, device);
        backbone.lm_head = None;
        Self {
            backbone,
            score: Self::fresh_head(config, seed, device),
        }
    }

    /// A reward model of shape `config` with zero weights, for a checkpoint to fill (no
    /// random draws that would be overwritten).
    pub fn for_import(config: &ModelConfig, device: &Device) -> Self {
        let mut backbone = Llama::for_import(config, device);
        backbone.lm_head = None;
        Self {
            backbone,
            score: Linear {
                weight: Param::from_tensor(Tensor::zeros([1, config.dim], device)),
            },
        }
    }

    /// A scalar head drawn from N(0, init_std).
    pub fn fresh_head(config: &ModelConfig, seed: u64, device: &Device) -> Linear {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5c0e);
        let normal = Normal::new(0.0, config.init_std as f32).expect("valid std");
        let values: Vec<f32> = (0..config.dim).map(|_| normal.sample(&mut rng)).collect();
        Linear {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(values, [1, config.dim]),
                device,
            )),
        }
    }

    /// Scores of the sequences of `batch`, in the batch's order (raw scale).
    pub fn scores(&self, batch: &ScoreBatch) -> Tensor<1> {
        let device = self.backbone.device();
        let [b, t] = [batch.rows, batch.seq_len];
        let tokens =
            Tensor::<2, Int>::from_data(TensorData::new(batch.tokens.clone(), [b, t]), &device);
        let hidden = self
            .backbone
            .hidden_states_with_layout(tokens, &batch.layout, None);
        self.score_at(hidden, &batch.last)
    }

    /// The head applied to `hidden` (`[batch, seq, dim]`) at the flat positions
    /// `row * seq + position` of `last`.
    fn score_at(&self, hidden: Tensor<3>, last: &[usize]) -> Tensor<1> {
        let [b, t, d] = hidden.dims();
        let last = Tensor::<1, Int>::from_data(
            TensorData::new(last.iter().map(|&i| i as i64).collect(), [last.len()]),
            &hidden.device(),
        );
        let n = last.dims()[0];
        let picked = hidden.reshape([b * t, d]).select(0, last);
        self.score.forward(picked).reshape([n])
    }
}

/// How sequences of different lengths share a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrangement {
    /// One sequence per row, padding after it.
    RightPadded,
    /// One sequence per row, padding before it (masked as its own segment).
    LeftPadded,
    /// Sequences concatenated into rows of this many tokens, each attending only within itself.
    Packed(usize),
}

/// Token sequences laid out for one forward pass, with where each sequence's last token is.
pub struct ScoreBatch {
    pub rows: usize,
    pub seq_len: usize,
    pub tokens: Vec<i64>,
    pub layout: SequenceLayout,
    /// Flat index (`row * seq_len + position`) of each sequence's last token.
    pub last: Vec<usize>,
}

impl ScoreBatch {
    pub fn new(sequences: &[Vec<u32>], arrangement: Arrangement, pad_id: u32) -> Self {
        let pad = pad_id as i64;
        match arrangement {
            Arrangement::RightPadded | Arrangement::LeftPadded => {
                let t = sequences.iter().map(Vec::len).max().unwrap_or(1).max(1);
                let left = arrangement == Arrangement::LeftPadded;
                let mut tokens = Vec::with_capacity(sequences.len() * t);
                let mut last = Vec::new();
                for (row, s) in sequences.iter().enumerate() {
                    let fill = std::iter::repeat_n(pad, t - s.len());
                    let ids = s.iter().map(|&x| x as i64);
                    if left {
                        tokens.extend(fill.chain(ids));
                        last.push(row * t + t - 1);
                    } else {
                        tokens.extend(ids.chain(fill));
                        last.push(row * t + s.len() - 1);
                    }
                }
                let layout = if left {
                    let pads: Vec<usize> = sequences.iter().map(|s| t - s.len()).collect();
                    SequenceLayout::cached(&pads, 0, t)
                } else {
                    SequenceLayout::causal(sequences.len(), t)
                };
                Self {
                    rows: sequences.len(),
                    seq_len: t,
                    tokens,
                    layout,
                    last,
                }
            }
            Arrangement::Packed(t) => {
                let mut rows: Vec<(Vec<i64>, Vec<i32>)> = Vec::new();
                let mut last = Vec::new();
                for s in sequences {
                    assert!(s.len() <= t, "a sequence longer than the packed row");
                    if rows.last().is_none_or(|r| r.0.len() + s.len() > t) {
                        rows.push((Vec::new(), Vec::new()));
                    }
                    let row = rows.len() - 1;
                    let (ids, segments) = rows.last_mut().expect("a row");
                    let segment = segments.last().map_or(0, |&g| g + 1);
                    ids.extend(s.iter().map(|&x| x as i64));
                    segments.extend(std::iter::repeat_n(segment, s.len()));
                    last.push(row * t + ids.len() - 1);
                }
                let mut tokens = Vec::with_capacity(rows.len() * t);
                let mut all_segments = Vec::with_capacity(rows.len() * t);
                for (ids, segments) in &rows {
                    let next = segments.last().map_or(0, |&g| g + 1);
                    tokens.extend(
                        ids.iter()
                            .copied()
                            .chain(std::iter::repeat_n(pad, t - ids.len())),
                    );
                    all_segments.extend(
                        segments
                            .iter()
                            .copied()
                            .chain(std::iter::repeat_n(next, t - ids.len())),
                    );
                }
                Self {
                    rows: rows.len(),
                    seq_len: t,
                    tokens,
                    layout: SequenceLayout::packed(rows.len(), t, all_segments),
                    last,
                }
            }
        }
    }
}

/// The margin `m(rating)` of the ranking loss (paper, Table 27).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MarginTable {
    /// No margin.
    None,
    /// 1, 2/3, 1/3, 0.
    Small,
    /// 3, 2, 1, 0.
    Large,
}

impl MarginTable {
    pub fn margin(self, rating: Rating) -> f64 {
        let level = match rating {
            Rating::SignificantlyBetter => 3.0,
            Rating::Better => 2.0,
            Rating::SlightlyBetter => 1.0,
            Rating::NegligiblyBetter => 0.0,
        };
        match self {
            MarginTable::None => 0.0,
            MarginTable::Small => level / 3.0,
            MarginTable::Large => level,
        }
    }
}

/// Mean ranking loss `-log(sigmoid(chosen - rejected - margin))` over pairs.
pub fn ranking_loss(chosen: Tensor<1>, rejected: Tensor<1>, margins: Tensor<1>) -> Tensor<1> {
    log_sigmoid(chosen - rejected - margins).neg().mean()
}

/// Which reward model: its data mix and what its evaluation reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RmKind {
    Helpfulness,
    Safety,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmDataConfig {
    /// Preference JSONL files (`{"prompt", "chosen", "rejected", "rating", "safety"}`).
    pub train: Vec<PathBuf>,
    pub val: Vec<PathBuf>,
    pub template: ChatTemplate,
    /// Longest prompt + answer in tokens; longer pairs are skipped (0: the model's context).
    pub max_len: usize,
    pub skip_bad_lines: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmSection {
    pub kind: RmKind,
    pub margin: MarginTable,
    /// Safety RM: share of helpfulness pairs in its mix (paper: 10%).
    pub helpfulness_share: f64,
    /// Warm-up as a share of all steps, at least 5 steps (paper: 3%).
    pub warmup_fraction: f64,
    /// Sigmoid-scale score below which a response counts as unsafe (paper: 0.15).
    pub safety_threshold: f64,
}

/// A reward-model run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmConfig {
    /// Taken from the `--init` chat model; only `model.kernels` may be set.
    pub model: ModelConfig,
    pub data: RmDataConfig,
    pub rm: RmSection,
    pub optim: OptimConfig,
    pub train: TrainConfig,
}

impl Default for RmConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig::default(),
            data: RmDataConfig {
                train: Vec::new(),
                val: Vec::new(),
                template: ChatTemplate::Llama2,
                max_len: 0,
                skip_bad_lines: false,
            },
            rm: RmSection {
                kind: RmKind::Helpfulness,
                margin: MarginTable::Small,
                helpfulness_share: 0.1,
                warmup_fraction: 0.03,
                safety_threshold: 0.15,
            },
            // Paper: max LR 1e-5, cosine to 10%, AdamW as in pretraining.
            optim: OptimConfig {
                lr: 1e-5,
                warmup_steps: 0,
                ..OptimConfig::default()
            },
            // Paper: one epoch, batch 512 pairs.
            train: TrainConfig {
                batch_size: 512,
                max_steps: 0,
                epochs: 1.0,
                ..TrainConfig::default()
            },
        }
    }
}

impl StageConfig for RmConfig {
    fn validate(&self) -> Result<()> {
        if self.data.train.is_empty() {
            bail!("data.train must name at least one preference JSONL file");
        }
        if self.data.val.is_empty() {
            bail!("data.val must name at least one preference JSONL file");
        }
        let r = &self.rm;
        if !(0.0..1.0).contains(&r.helpfulness_share) {
            bail!("rm.helpfulness_share must be in [0, 1)");
        }
        if !(0.0..0.5).contains(&r.warmup_fraction) {
            bail!("rm.warmup_fraction must be in [0, 0.5)");
        }
        if !(r.safety_threshold > 0.0 && r.safety_threshold < 1.0) {
            bail!("rm.safety_threshold must be in (0, 1)");
        }
        self.optim.validate()?;
        self.train.validate()
    }

    fn known_keys() -> toml::Table {
        let mut known = toml::Table::try_from(Self::default()).expect("serialises");
        known.insert(
            "model".into(),
            crate::stages::sft::SftConfig::known_keys()["model"].clone(),
        );
        known
    }
}

/// A preference pair in tokens: prompt + chosen and prompt + rejected, each ending with the
/// answer's end marker.
#[derive(Debug, Clone)]
pub struct EncodedPair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub rating: Rating,
    pub safety: bool,
}

fn dialogue(prompt: &chat::Turns, answer: &chat::Turns) -> Vec<Message> {
    let mut messages = prompt.clone().into_messages(Role::User);
    messages.extend(answer.clone().into_messages(Role::Assistant));
    messages
}

/// Renders pairs with `template`; pairs longer than `max_len` tokens are left out (counted).
pub fn encode_pairs(
    pairs: &[PreferencePair],
    template: ChatTemplate,
    tokenizer: &Tokenizer,
    max_len: usize,
) -> Result<(Vec<EncodedPair>, usize)> {
    let mut out = Vec::with_capacity(pairs.len());
    let mut too_long = 0;
    for p in pairs {
        let chosen = template
            .encode(tokenizer, &dialogue(&p.prompt, &p.chosen))?
            .tokens;
        let rejected = template
            .encode(tokenizer, &dialogue(&p.prompt, &p.rejected))?
            .tokens;
        if chosen.len().max(rejected.len()) > max_len {
            too_long += 1;
            continue;
        }
        out.push(EncodedPair {
            chosen,
            rejected,
            rating: p.rating,
            safety: p.safety,
        });
    }
    Ok((out, too_long))
}

/// The paper's data mix for `kind`, drawn with `seed`.
pub fn mix(
    pairs: Vec<EncodedPair>,
    kind: RmKind,
    helpfulness_share: f64,
    seed: u64,
) -> Vec<EncodedPair> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut safety, mut helpful): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|p| p.safety);
    let mut out = match kind {
        RmKind::Helpfulness => {
            // All helpfulness pairs plus an equal amount of safety pairs.
            safety.shuffle(&mut rng);
            safety.truncate(helpful.len());
            helpful.extend(safety);
            helpful
        }
        RmKind::Safety => {
            // All safety pairs plus helpfulness pairs at share / (1 - share).
            let n = (safety.len() as f64 * helpfulness_share / (1.0 - helpfulness_share)).round();
            helpful.shuffle(&mut rng);
            helpful.truncate(n as usize);
            safety.extend(helpful);
            safety
        }
    };
    out.shuffle(&mut rng);
    out
}

/// Scores of the chosen and rejected answers of `pairs`. The prompt (the tokens both
/// sequences share) goes through the model once, left-padded, into a KV cache; the cache is
/// repeated for the two answers, which then run as one batch of `2 * pairs.len()` rows.
/// Gradients flow through the cache into the prompt's pass, with either kernel set.
pub fn pair_scores(
    model: &RewardModel,
    pairs: &[&EncodedPair],
    pad_id: u32,
) -> (Tensor<1>, Tensor<1>) {
    let n = pairs.len();
    let device = model.backbone.device();
    let ids = |rows: Vec<Vec<i64>>, len: usize| {
        let batch = rows.len();
        let values: Vec<i64> = rows.into_iter().flatten().collect();
        Tensor::<2, Int>::from_data(TensorData::new(values, [batch, len]), &device)
    };
    // The shared prefix, leaving at least one token of each answer to read the score at.
    let prefix: Vec<usize> = pairs
        .iter()
        .map(|p| {
            let common = p
                .chosen
                .iter()
                .zip(&p.rejected)
                .take_while(|(a, b)| a == b)
                .count();
            common
                .min(p.chosen.len() - 1)
                .min(p.rejected.len() - 1)
                .max(1)
        })
        .collect();
    let prompt_len = *prefix.iter().max().expect("at least one pair");
    let left_pad: Vec<usize> = prefix.iter().map(|&p| prompt_len - p).collect();
    let pad = pad_id as i64;
    let prompts: Vec<Vec<i64>> = pairs
        .iter()
        .zip(&prefix)
        .map(|(p, &len)| {
            std::iter::repeat_n(pad, prompt_len - len)
                .chain(p.chosen[..len].iter().map(|&t| t as i64))
                .collect()
        })
        .collect();
    let mut cache = KvCache::new(model.backbone.config.n_layers, left_pad);
    model
        .backbone
        .hidden_states(ids(prompts, prompt_len), Some(&mut cache));
    let mut cache = cache.repeat(2);
    let answers: Vec<&[u32]> = pairs
        .iter()
        .zip(&prefix)
        .map(|(p, &len)| &p.chosen[len..])
        .chain(
            pairs
                .iter()
                .zip(&prefix)
                .map(|(p, &len)| &p.rejected[len..]),
        )
        .collect();
    let answer_len = answers.iter().map(|a| a.len()).max().expect("answers");
    let rows: Vec<Vec<i64>> = answers
        .iter()
        .map(|a| {
            a.iter()
                .map(|&t| t as i64)
                .chain(std::iter::repeat_n(pad, answer_len - a.len()))
                .collect()
        })
        .collect();
    let hidden = model
        .backbone
        .hidden_states(ids(rows, answer_len), Some(&mut cache));
    let last: Vec<usize> = answers
        .iter()
        .enumerate()
        .map(|(row, a)| row * answer_len + a.len() - 1)
        .collect();
    let scores = model.score_at(hidden, &last);
    (scores.clone().slice([0..n]), scores.slice([n..2 * n]))
}

struct RankingObjective {
    train: Vec<EncodedPair>,
    val: Vec<EncodedPair>,
    margin: MarginTable,
    pad_id: u32,
    batch_size: usize,
    eval_batches: usize,
}

impl RankingObjective {
    fn loss_of(&self, model: &RewardModel, pairs: &[&EncodedPair]) -> Tensor<1> {
        let (chosen, rejected) = pair_scores(model, pairs, self.pad_id);
        let margins: Vec<f32> = pairs
            .iter()
            .map(|p| self.margin.margin(p.rating) as f32)
            .collect();
        let margins = Tensor::from_data(
            TensorData::new(margins, [pairs.len()]),
            &model.backbone.device(),
        );
        ranking_loss(chosen, rejected, margins)
    }
}

impl Objective<RewardModel> for RankingObjective {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn loss(&self, model: &RewardModel, indices: &[usize]) -> MicroBatchLoss {
        let pairs: Vec<&EncodedPair> = indices.iter().map(|&i| &self.train[i]).collect();
        let tokens = pairs
            .iter()
            .map(|p| (p.chosen.len() + p.rejected.len()) as u64)
            .sum();
        // The ranking loss counts pairs.
        MicroBatchLoss::from_mean(self.loss_of(model, &pairs), pairs.len() as f64, tokens)
    }

    fn validation_loss(&self, model: &RewardModel) -> f64 {
        let n = self.val.len().min(self.batch_size * self.eval_batches);
        let pairs: Vec<&EncodedPair> = self.val[..n].iter().collect();
        let (mut total, mut count) = (0.0, 0);
        for chunk in pairs.chunks(self.batch_size.min(64)) {
            total += self.loss_of(model, chunk).into_scalar::<f32>() as f64 * chunk.len() as f64;
            count += chunk.len();
        }
        total / count.max(1) as f64
    }
}

/// A reward model as a stage: the `--init` chat model's backbone (its next-token head
/// dropped) and a fresh scalar head.
pub struct RewardStage;

crate::training_config!(RmConfig);

impl Stage for RewardStage {
    type Config = RmConfig;
    type Model = RewardModel;
}

impl StageModel for RewardModel {
    /// The chat model's weights, less its next-token head, and a fresh scalar head.
    fn from_init(mut backbone: Llama, config: &ModelConfig, seed: u64, device: &Device) -> Self {
        backbone.lm_head = None;
        RewardModel {
            backbone,
            score: RewardModel::fresh_head(config, seed, device),
        }
    }

    fn shell(config: &ModelConfig, device: &Device) -> Self {
        RewardModel::for_import(config, device)
    }
}

pub struct RmSummary {
    pub step: u64,
    pub final_val_loss: Option<f64>,
    pub checkpoint: PathBuf,
    pub interrupted: bool,
}

/// Reads preference files into validated pairs.
pub fn read_pairs(paths: &[PathBuf], skip_bad_lines: bool) -> Result<Vec<PreferencePair>> {
    chat::read_all(paths, skip_bad_lines, chat::parse_preference)
}

/// Trains (or resumes) a reward model.
pub fn train(launch: &Launch) -> Result<RmSummary> {
    let mut started = stage::launch::<RewardStage>(launch)?;
    let fresh = started.run.resume_from.is_none();
    let (config, tokenizer, seed) = (&mut started.config, &started.tokenizer, started.state.seed);
    let d = &config.data;
    d.template.check(&tokenizer)?;
    let max_len = match d.max_len {
        0 => config.model.max_seq_len,
        n => n.min(config.model.max_seq_len),
    };
    let (train_pairs, long_train) = encode_pairs(
        &read_pairs(&d.train, d.skip_bad_lines)?,
        d.template,
        &tokenizer,
        max_len,
    )?;
    let (val_pairs, long_val) = encode_pairs(
        &read_pairs(&d.val, d.skip_bad_lines)?,
        d.template,
        &tokenizer,
        max_len,
    )?;
    let r = &config.rm;
    let train_pairs = mix(train_pairs, r.kind, r.helpfulness_share, seed);
    let val_pairs = mix(val_pairs, r.kind, r.helpfulness_share, seed);
    if train_pairs.is_empty() || val_pairs.is_empty() {
        bail!(
            "no usable preference pairs for the {:?} reward model",
            r.kind
        );
    }
    if fresh {
        // Warm-up: a share of all steps, at least 5 (paper: 3%). Fixed when the run starts:
        // a resumed run keeps its schedule.
        let total = config.train.total_steps(train_pairs.len());
        config.optim.warmup_steps = ((total as f64 * r.warmup_fraction).ceil() as u64)
            .max(5)
            .min(total.saturating_sub(1));
    }
    eprintln!(
        "device: {} | {:?} reward model, margin {:?} | {} train / {} val pairs{}",
        launch.device.describe(),
        r.kind,
        r.margin,
        train_pairs.len(),
        val_pairs.len(),
        match long_train + long_val {
            0 => String::new(),
            n => format!(" | {n} pairs over {max_len} tokens skipped"),
        }
    );
    let objective = RankingObjective {
        train: train_pairs,
        val: val_pairs,
        margin: r.margin,
        pad_id: tokenizer.pad_id.unwrap_or(tokenizer.eos_id),
        batch_size: config.train.batch_size,
        eval_batches: config.train.eval_batches,
    };
    let config_toml = config.to_toml();
    let outcome = supervised::run(started, config_toml, &objective, launch.stop_after)?;
    Ok(RmSummary {
        step: outcome.step,
        final_val_loss: outcome.final_val_loss,
        checkpoint: outcome.checkpoint,
        interrupted: outcome.interrupted,
    })
}

/// A trained reward model ready to score, with its tokenizer and configuration.
pub struct LoadedRm {
    pub model: RewardModel,
    pub tokenizer: Tokenizer,
    pub config: RmConfig,
}

/// Loads a reward model: a kiln checkpoint (or run directory) written by `kiln rm train`.
/// Only the weights are read.
pub fn load(path: &std::path::Path, device: &Device) -> Result<LoadedRm> {
    use crate::interop::convert::Format;
    let format = Format::detect(path)?;
    if format != Format::Kiln {
        bail!(
            "{}: a {format:?} model is a language model; a reward model is a kiln checkpoint of `kiln rm train`",
            path.display()
        );
    }
    let dir = checkpoint::resolve(path)?;
    let saved = checkpoint::load_weights(&dir)?;
    if !saved.config_toml.contains("[rm]") {
        bail!(
            "{}: not a reward model (its config has no [rm] section; train one with `kiln rm train`)",
            dir.display()
        );
    }
    let config: RmConfig = saved.config(&dir)?;
    let tokenizer = saved.tokenizer(&dir)?;
    let model = params::import(
        RewardModel::for_import(&config.model, device),
        saved.model,
        &dir.join(checkpoint::MODEL_FILE),
    )?;
    Ok(LoadedRm {
        model,
        tokenizer,
        config,
    })
}

/// Token ids of each dialogue as the reward model reads it; a dialogue longer than the
/// model's context is an error naming `source(i)` (its file and line).
pub fn encode_for_scoring(
    rm: &LoadedRm,
    dialogues: &[Vec<Message>],
    source: &dyn Fn(usize) -> String,
) -> Result<Vec<Vec<u32>>> {
    let template = rm.config.data.template;
    let context = rm.config.model.max_seq_len;
    dialogues
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let tokens = template.encode(&rm.tokenizer, d)?.tokens;
            if tokens.len() > context {
                bail!(
                    "{}: the dialogue has {} tokens, more than the reward model's context of {context}",
                    source(i),
                    tokens.len()
                );
            }
            Ok(tokens)
        })
        .collect()
}

/// Scores of prompt/answer dialogues (raw scale), in batches, without an autodiff graph.
/// `source(i)` names where dialogue `i` came from, for the error of one too long.
pub fn score_dialogues(
    rm: &LoadedRm,
    dialogues: &[Vec<Message>],
    batch_size: usize,
    source: &dyn Fn(usize) -> String,
) -> Result<Vec<f32>> {
    let sequences = encode_for_scoring(rm, dialogues, source)?;
    let pad = rm.tokenizer.pad_id.unwrap_or(rm.tokenizer.eos_id);
    let mut out = Vec::with_capacity(dialogues.len());
    for chunk in sequences.chunks(batch_size.max(1)) {
        let scores = rm
            .model
            .scores(&ScoreBatch::new(chunk, Arrangement::RightPadded, pad));
        out.extend(
            scores
                .into_data()
                .try_into_vec_as::<f32>()
                .map_err(|e| anyhow!("{e:?}"))?,
        );
    }
    Ok(out)
}

/// One line of a file to score: `{"prompt", "response"}` (strings or message lists; other
/// fields are kept). Returns the line's object and the dialogue to score.
pub fn parse_scoring_line(
    line: &str,
) -> Result<(serde_json::Map<String, serde_json::Value>, Vec<Message>)> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| anyhow!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(record) = value else {
        bail!("not a JSON object (expected {{\"prompt\", \"response\"}})");
    };
    let field = |name: &str| -> Result<chat::Turns> {
        let v = record
            .get(name)
            .ok_or_else(|| anyhow!("missing field `{name}`"))?;
        serde_json::from_value(v.clone())
            .map_err(|_| anyhow!("`{name}` must be a string or a message list"))
    };
    let messages = dialogue(&field("prompt")?, &field("response")?);
    chat::validate_dialogue(&messages, true)?;
    Ok((record, messages))
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Accuracy per rating level and overall, mean margin, and (safety RM) flagging of unsafe
/// responses.
#[derive(Debug, Clone, Serialize)]
pub struct RmReport {
    pub pairs: usize,
    pub accuracy: f64,
    pub accuracy_by_rating: std::collections::BTreeMap<String, f64>,
    pub pairs_by_rating: std::collections::BTreeMap<String, usize>,
    /// Mean of score(chosen) - score(rejected).
    pub mean_margin: f64,
    /// Safety pairs only: the rejected (compliant, unsafe) answers scored below the threshold
    /// on the sigmoid scale, as a share of them (recall of flagging unsafe responses).
    pub unsafe_recall: Option<f64>,
    /// Safety pairs only: the chosen (refusal) answers scored below the threshold (refusals
    /// wrongly flagged as unsafe).
    pub refusals_flagged: Option<f64>,
    /// Of all answers flagged, the share that are the unsafe ones (precision).
    pub unsafe_precision: Option<f64>,
}

/// Which pairs of a preference file an evaluation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PairSubset {
    All,
    Helpfulness,
    Safety,
}

impl PairSubset {
    pub fn keeps(self, pair: &PreferencePair) -> bool {
        match self {
            PairSubset::All => true,
            PairSubset::Helpfulness => !pair.safety,
            PairSubset::Safety => pair.safety,
        }
    }
}

/// Accuracy and margins of `rm` on `pairs`; `source(i)` names where pair `i` came from.
pub fn evaluate(
    rm: &LoadedRm,
    pairs: &[PreferencePair],
    batch_size: usize,
    source: &dyn Fn(usize) -> String,
) -> Result<RmReport> {
    let chosen: Vec<Vec<Message>> = pairs
        .iter()
        .map(|p| dialogue(&p.prompt, &p.chosen))
        .collect();
    let rejected: Vec<Vec<Message>> = pairs
        .iter()
        .map(|p| dialogue(&p.prompt, &p.rejected))
        .collect();
    let sc = score_dialogues(rm, &chosen, batch_size, source)?;
    let sr = score_dialogues(rm, &rejected, batch_size, source)?;
    let name = |r: Rating| {
        serde_json::to_value(r)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    };
    let mut by: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let (mut hits, mut margin) = (0, 0.0);
    for (p, (c, r)) in pairs.iter().zip(sc.iter().zip(&sr)) {
        let hit = c > r;
        hits += hit as usize;
        margin += (c - r) as f64;
        let e = by.entry(name(p.rating)).or_default();
        e.0 += hit as usize;
        e.1 += 1;
    }
    let threshold = rm.config.rm.safety_threshold as f32;
    let safety: Vec<usize> = (0..pairs.len()).filter(|&i| pairs[i].safety).collect();
    let (unsafe_recall, refusals_flagged, unsafe_precision) =
        if rm.config.rm.kind == RmKind::Safety && !safety.is_empty() {
            let flagged_unsafe = safety
                .iter()
                .filter(|&&i| sigmoid(sr[i]) < threshold)
                .count();
            let flagged_refusals = safety
                .iter()
                .filter(|&&i| sigmoid(sc[i]) < threshold)
                .count();
            let n = safety.len() as f64;
            let flagged = (flagged_unsafe + flagged_refusals) as f64;
            (
                Some(flagged_unsafe as f64 / n),
                Some(flagged_refusals as f64 / n),
                Some(if flagged > 0.0 {
                    flagged_unsafe as f64 / flagged
                } else {
                    0.0
                }),
            )
        } else {
            (None, None, None)
        };
    Ok(RmReport {
        pairs: pairs.len(),
        accuracy: hits as f64 / pairs.len().max(1) as f64,
        accuracy_by_rating: by
            .iter()
            .map(|(k, (h, n))| (k.clone(), *h as f64 / *n as f64))
            .collect(),
        pairs_by_rating: by.iter().map(|(k, (_, n))| (k.clone(), *n)).collect(),
        mean_margin: margin / pairs.len().max(1) as f64,
        unsafe_recall,
        refusals_flagged,
        unsafe_precision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_tables_are_the_papers() {
        use Rating::*;
        let ratings = [
            SignificantlyBetter,
            Better,
            SlightlyBetter,
            NegligiblyBetter,
        ];
        let small: Vec<f64> = ratings
            .iter()
            .map(|&r| MarginTable::Small.margin(r))
            .collect();
        let large: Vec<f64> = ratings
            .iter()
            .map(|&r| MarginTable::Large.margin(r))
            .collect();
        assert_eq!(small, vec![1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0]);
        assert_eq!(large, vec![3.0, 2.0, 1.0, 0.0]);
        assert!(ratings.iter().all(|&r| MarginTable::None.margin(r) == 0.0));
    }
}
