//! Reward models (Llama 2 sec. 3.2.2): the chat model's backbone with its next-token head
//! replaced by a scalar regression head, read at the last token of the response, trained with
//! the binary ranking loss `-log(sigmoid(r(x, y_c) - r(x, y_r) - m(rating)))`.
//!
//! Two of them are trained from the same preference files: the helpfulness RM on all
//! helpfulness pairs plus as many safety pairs, the safety RM on all safety pairs plus
//! helpfulness pairs at 90/10. Pairs carry `"safety": true|false`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, OptimConfig, StageConfig, TrainConfig};
use crate::data::chat::{self, ChatTemplate, PreferencePair, Rating};
use crate::data::tokenizer::Tokenizer;
use crate::model::Llama;
use crate::model::reward::{EncodedPair, RewardModel, pair_scores};
use crate::train::stage::{self, Launch, Stage, StageModel, TrainingConfig};
use crate::train::step::MicroBatchLoss;
use crate::train::supervised::{self, Objective, RunSummary};

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
    /// Warm-up as a share of all steps, at least 5 steps (paper: 3%); used when
    /// `optim.warmup_steps` is 0 (the default), which otherwise gives it in steps.
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
            .encode(tokenizer, &chat::prompt_and_answer(&p.prompt, &p.chosen))?
            .tokens;
        let rejected = template
            .encode(tokenizer, &chat::prompt_and_answer(&p.prompt, &p.rejected))?
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
    const COMMAND: &'static str = "rm train";
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

/// Reads preference files into validated pairs.
pub fn read_pairs(paths: &[PathBuf], skip_bad_lines: bool) -> Result<Vec<PreferencePair>> {
    chat::read_all(paths, skip_bad_lines, chat::parse_preference)
}

/// Trains (or resumes) a reward model.
pub fn train(launch: &Launch) -> Result<RunSummary> {
    let mut started = stage::launch::<RewardStage>(launch)?;
    let fresh = started.run.resume_from.is_none();
    let (config, tokenizer, seed) = (&mut started.config, &started.tokenizer, started.state.seed);
    let d = &config.data;
    d.template.check(tokenizer)?;
    let max_len = match d.max_len {
        0 => config.model.max_seq_len,
        n => n.min(config.model.max_seq_len),
    };
    let (train_pairs, long_train) = encode_pairs(
        &read_pairs(&d.train, d.skip_bad_lines)?,
        d.template,
        tokenizer,
        max_len,
    )?;
    let (val_pairs, long_val) = encode_pairs(
        &read_pairs(&d.val, d.skip_bad_lines)?,
        d.template,
        tokenizer,
        max_len,
    )?;
    let r = &config.rm;
    let train_pairs = mix(train_pairs, r.kind, r.helpfulness_share, seed);
    let val_pairs = mix(val_pairs, r.kind, r.helpfulness_share, seed);
    if train_pairs.is_empty() || val_pairs.is_empty() {
        bail!(
            "no usable preference pairs for the {} reward model",
            crate::config::name_of(&r.kind)
        );
    }
    if fresh && config.optim.warmup_steps == 0 {
        // Warm-up: a share of all steps, at least 5 (paper: 3%), unless given in steps.
        // Fixed when the run starts: a resumed run keeps its schedule.
        let total = config.train.total_steps(train_pairs.len());
        config.optim.warmup_steps = ((total as f64 * r.warmup_fraction).ceil() as u64)
            .max(5)
            .min(total.saturating_sub(1));
    }
    launch.collective.say(&format!(
        "device: {} | {} reward model, margin {} | {} train / {} val pairs{}",
        launch.device.describe(),
        crate::config::name_of(&r.kind),
        crate::config::name_of(&r.margin),
        train_pairs.len(),
        val_pairs.len(),
        match long_train + long_val {
            0 => String::new(),
            n => format!(" | {n} pairs over {max_len} tokens skipped"),
        }
    ));
    let objective = RankingObjective {
        train: train_pairs,
        val: val_pairs,
        margin: r.margin,
        pad_id: tokenizer.pad_id.unwrap_or(tokenizer.eos_id),
        batch_size: config.train.batch_size,
        eval_batches: config.train.eval_batches,
    };
    let config_toml = config.to_toml();
    Ok(supervised::run(started, config_toml, &objective, launch.stop_after)?.summary)
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
