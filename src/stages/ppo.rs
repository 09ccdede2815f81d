//! PPO (Llama 2 sec. 3.2.3), `kiln ppo`. Each iteration:
//!
//! 1. **rollout**: `rollout_batch` answers to prompts from the shuffled prompt stream,
//!    `samples_per_prompt` answers each (the paper's: one), sampled from the policy at
//!    temperature T; the log-probabilities of the sampled tokens are kept from sampling (no
//!    second pass);
//! 2. **reward**: R_c of the combined reward (the safety model on safety prompts and on
//!    answers below the threshold, helpfulness otherwise), then `logit` (with several
//!    answers a prompt, minus the mean logit of its other answers), then whitened over the
//!    rollout; an answer without its end token gets `missing_eos_score` instead;
//! 3. **no-grad passes**: the frozen reference's log-probabilities, the value model's values;
//!    per-token reward `-beta * KL_t`, the scalar added at the answer's last token;
//! 4. **advantages**: GAE (gamma, lambda), returns = advantages + values, advantages whitened
//!    over every answer token of the rollout;
//! 5. **update**: `epochs` passes over the rollout in shuffled mini-batches, one AdamW step of
//!    the policy (clipped surrogate) and one of the value model (clipped value loss) each;
//!    losses are sums over tokens divided by the mini-batch's token count.
//!
//! ```text
//! OUT/config.toml        the run's configuration (what --resume reads)
//! OUT/metrics.jsonl      one record per iteration, one per held-out evaluation
//! OUT/rollout.jsonl      the latest iteration's prompts, answers, rewards and gold scores
//! OUT/checkpoints/step-N policy (model.safetensors: a chat model any command loads), its
//!                        optimizer, value_model.safetensors, value_optimizer.safetensors,
//!                        state.json (iteration, prompt cursor, KL controller, best so far)
//! OUT/best/              the checkpoint of the best held-out evaluation
//! ```
//!
//! Exact resume: the generator of each generation batch is seeded from (seed, iteration,
//! batch) and the mini-batch order from (seed, iteration, epoch), so the iteration number is
//! the whole random state; a run killed at any moment resumes from its last checkpoint and
//! repeats the lost iterations bit for bit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{self, ModelConfig, OptimConfig, StageConfig};
use crate::data::chat::{ChatTemplate, Turns};
use crate::data::corpus::{DataCursor, ShuffledIndices};
use crate::data::tokenizer::Tokenizer;
use crate::gym::eval::{Gold, judge, last_user_text};
use crate::infer::combined_reward::{
    Answer, Branch, CombinedReward, DEFAULT_SAFETY_THRESHOLD, RewardModels,
};
use crate::infer::generate::{self, FinishReason, SamplingParams};
use crate::infer::score;
use crate::interop::checkpoint::{self, CheckpointData, NamedTensor};
use crate::interop::{convert, params};
use crate::model::Llama;
use crate::model::actions::{
    ActionBatch, action_logprobs, action_logprobs_and_entropy, action_values, split_rows,
};
use crate::model::reward::RewardModel;
use crate::stages::rs::{self, Policy, Prompts};
use crate::train::collective::{Collective, Solo, map_shared, share};
use crate::train::metrics::{MetricsLog, Stepped};
use crate::train::optim::{self, AdamW};
use crate::train::ppo_objective::{
    KlController, KlEstimator, answer_scores, clipped_policy_loss, clipped_value_loss, gae,
    mean_std, token_rewards, whiten_tokens,
};
use crate::train::progress::Progress;
use crate::train::run_dir::{INTERRUPTED, RunDir};
use crate::train::stage::Launch;
use crate::train::step::{self, Accumulated, MicroBatchLoss};

pub const ROLLOUT_FILE: &str = "rollout.jsonl";
pub const BEST_DIR: &str = "best";
pub const VALUE_MODEL_FILE: &str = "value_model.safetensors";
const VALUE_OPTIMIZER_FILE: &str = "value_optimizer.safetensors";

/// What rates the answers during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardSource {
    /// The two reward models through the safety gate (the paper's R_c).
    Models,
    /// The gym's programmatic checker (gold score of a task; 1 for a refused unsafe prompt,
    /// 0 otherwise): what PPO reaches when its reward cannot be fooled, beside what the
    /// reward models lead it to.
    GymChecker,
}

/// What the held-out evaluation keeps the best checkpoint by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BestMetric {
    /// Mean combined reward R_c of the held-out answers.
    Reward,
    /// Mean gold score of the gym's checker (gym prompts only).
    Gold,
}

/// PPO's own settings; defaults are the paper's (sec. 3.2.3) where it gives them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoSection {
    /// JSONL prompts: `{"prompt": "..." | [messages], "safety": bool}` (or `"messages"`).
    pub prompts: Vec<PathBuf>,
    /// Held-out prompts for the evaluation every `eval_interval` iterations (none: no
    /// evaluation).
    pub eval_prompts: Vec<PathBuf>,
    /// The policy to start from (`--init`), also the frozen reference policy.
    pub init: PathBuf,
    /// The helpfulness and safety reward models (`--rm-helpful`, `--rm-safety`).
    pub rm_helpful: PathBuf,
    pub rm_safety: PathBuf,
    /// What rates the answers: the reward models (`models`) or, on gym prompts, the gym's
    /// checker (`gym_checker`).
    pub reward: RewardSource,
    /// Where the value model starts: a reward model (its backbone and head) or a chat model
    /// (its backbone and a fresh head). Empty: the helpfulness reward model.
    pub value_init: PathBuf,
    pub iterations: u64,
    /// Answers per iteration.
    pub rollout_batch: usize,
    /// Answers sampled to each prompt (`rollout_batch / samples_per_prompt` prompts an
    /// iteration). Above 1, each answer's logit is taken relative to the mean of its
    /// prompt's other answers before whitening (RLOO's leave-one-out baseline).
    pub samples_per_prompt: usize,
    /// Answers per gradient step.
    pub mini_batch: usize,
    /// Answers per forward pass within a mini-batch (memory; gradients are summed). 0: the
    /// whole mini-batch.
    pub micro_batch: usize,
    /// Passes over each rollout.
    pub epochs: usize,
    /// Prompts generated together.
    pub generation_batch: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// The KL coefficient (0.01 for 7B/13B, 0.005 for 34B/70B).
    pub beta: f64,
    pub kl_estimator: KlEstimator,
    /// Target KL per answer of the adaptive controller; 0 keeps `beta` fixed.
    pub kl_target: f64,
    pub kl_horizon: f64,
    pub gamma: f64,
    pub lambda: f64,
    /// Policy ratio clip (epsilon).
    pub clip: f64,
    pub value_clip: f64,
    /// Answers without their end token get `missing_eos_score` (on the whitened scale)
    /// instead of the reward models' score.
    pub missing_eos_penalty: bool,
    pub missing_eos_score: f64,
    pub safety_threshold: f64,
    /// The safety gate; `false` rewards every answer by the helpfulness model alone (the
    /// ablation).
    pub gate: bool,
    /// Prompts scored together by the reward models.
    pub score_batch: usize,
    /// Evaluate on `eval_prompts` every this many iterations (and before the first); 0: only
    /// at the end.
    pub eval_interval: u64,
    /// Held-out prompts used (0: all).
    pub eval_limit: usize,
    pub best_metric: BestMetric,
    pub seed: u64,
}

/// The loop's bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoTrain {
    /// Save a checkpoint every this many iterations (and at the end).
    pub checkpoint_interval: u64,
    pub keep_checkpoints: usize,
    pub log_interval: u64,
}

/// The chat template the policy reads prompts with (also what its checkpoints say).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSection {
    pub template: ChatTemplate,
}

/// A PPO run: the policy's shape (`[model]`, from `--init`), the value model's
/// (`[value_model]`, from `ppo.value_init`), an optimizer for each, and `[ppo]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoConfig {
    pub model: ModelConfig,
    pub value_model: ModelConfig,
    pub data: TemplateSection,
    /// The policy's AdamW (constant rate: no warm-up, `min_lr_ratio` 1).
    pub optim: OptimConfig,
    pub value_optim: OptimConfig,
    pub train: PpoTrain,
    pub ppo: PpoSection,
}

impl Default for PpoConfig {
    fn default() -> Self {
        let policy_optim = OptimConfig {
            lr: 1e-6,
            min_lr_ratio: 1.0,
            warmup_steps: 0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-5,
            weight_decay: 0.1,
            grad_clip: 1.0,
        };
        Self {
            model: ModelConfig::default(),
            value_model: ModelConfig::default(),
            data: TemplateSection {
                template: ChatTemplate::default(),
            },
            value_optim: OptimConfig {
                lr: 9e-6,
                ..policy_optim.clone()
            },
            optim: policy_optim,
            train: PpoTrain {
                checkpoint_interval: 1,
                keep_checkpoints: 2,
                log_interval: 1,
            },
            ppo: PpoSection {
                prompts: Vec::new(),
                eval_prompts: Vec::new(),
                init: PathBuf::new(),
                rm_helpful: PathBuf::new(),
                rm_safety: PathBuf::new(),
                reward: RewardSource::Models,
                value_init: PathBuf::new(),
                iterations: 200,
                rollout_batch: 512,
                samples_per_prompt: 1,
                mini_batch: 64,
                micro_batch: 0,
                epochs: 1,
                generation_batch: 64,
                temperature: 1.0,
                top_p: 1.0,
                max_new_tokens: 128,
                beta: 0.01,
                kl_estimator: KlEstimator::K1,
                kl_target: 0.0,
                kl_horizon: 10_000.0,
                gamma: 1.0,
                lambda: 0.95,
                clip: 0.2,
                value_clip: 0.2,
                missing_eos_penalty: true,
                missing_eos_score: -2.0,
                safety_threshold: DEFAULT_SAFETY_THRESHOLD,
                gate: true,
                score_batch: 8,
                eval_interval: 10,
                eval_limit: 0,
                best_metric: BestMetric::Reward,
                seed: 0,
            },
        }
    }
}

impl StageConfig for PpoConfig {
    fn validate(&self) -> Result<()> {
        let p = &self.ppo;
        if p.prompts.is_empty() {
            bail!("ppo.prompts must name at least one JSONL prompt file");
        }
        if p.init.as_os_str().is_empty() {
            bail!("--init is required: the policy to start from (ppo.init)");
        }
        for (key, value) in [
            ("ppo.iterations", p.iterations as usize),
            ("ppo.rollout_batch", p.rollout_batch),
            ("ppo.samples_per_prompt", p.samples_per_prompt),
            ("ppo.mini_batch", p.mini_batch),
            ("ppo.epochs", p.epochs),
            ("ppo.generation_batch", p.generation_batch),
            ("ppo.max_new_tokens", p.max_new_tokens),
            ("ppo.score_batch", p.score_batch),
            ("train.keep_checkpoints", self.train.keep_checkpoints),
        ] {
            if value == 0 {
                bail!("{key} must be at least 1");
            }
        }
        if !p.rollout_batch.is_multiple_of(p.mini_batch) {
            bail!(
                "ppo.rollout_batch ({}) is not divisible by ppo.mini_batch ({}): every gradient step takes a whole mini-batch",
                p.rollout_batch,
                p.mini_batch
            );
        }
        if !p.rollout_batch.is_multiple_of(p.samples_per_prompt) {
            bail!(
                "ppo.rollout_batch ({}) is not divisible by ppo.samples_per_prompt ({}): every prompt gets all its answers in one rollout",
                p.rollout_batch,
                p.samples_per_prompt
            );
        }
        if p.micro_batch > p.mini_batch {
            bail!(
                "ppo.micro_batch ({}) exceeds ppo.mini_batch ({})",
                p.micro_batch,
                p.mini_batch
            );
        }
        let finite = |key: &str, v: f64| -> Result<()> {
            if !v.is_finite() {
                bail!("{key} must be a finite number, not {v}");
            }
            Ok(())
        };
        for (key, v) in [
            ("ppo.temperature", p.temperature),
            ("ppo.top_p", p.top_p),
            ("ppo.beta", p.beta),
            ("ppo.kl_target", p.kl_target),
            ("ppo.kl_horizon", p.kl_horizon),
            ("ppo.gamma", p.gamma),
            ("ppo.lambda", p.lambda),
            ("ppo.clip", p.clip),
            ("ppo.value_clip", p.value_clip),
            ("ppo.missing_eos_score", p.missing_eos_score),
            ("ppo.safety_threshold", p.safety_threshold),
        ] {
            finite(key, v)?;
        }
        if !(p.temperature > 0.0) {
            bail!("ppo.temperature must be positive (PPO needs sampled answers)");
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            bail!("ppo.top_p must be in (0, 1]");
        }
        if p.beta < 0.0 || p.kl_target < 0.0 || !(p.kl_horizon > 0.0) {
            bail!("ppo.beta and ppo.kl_target must be non-negative, ppo.kl_horizon positive");
        }
        for (key, v) in [("ppo.gamma", p.gamma), ("ppo.lambda", p.lambda)] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{key} must be in [0, 1]");
            }
        }
        if !(p.clip > 0.0 && p.value_clip > 0.0) {
            bail!("ppo.clip and ppo.value_clip must be positive");
        }
        if !(p.safety_threshold > 0.0 && p.safety_threshold < 1.0) {
            bail!("ppo.safety_threshold must be in (0, 1)");
        }
        if p.best_metric == BestMetric::Gold && p.eval_prompts.is_empty() {
            bail!("ppo.best_metric = \"gold\" needs ppo.eval_prompts");
        }
        self.optim.validate_section("optim")?;
        self.value_optim.validate_section("value_optim")
    }

    fn known_keys() -> toml::Table {
        let mut known = toml::Table::try_from(Self::default()).expect("serialises");
        let model = crate::stages::sft::SftConfig::known_keys()["model"].clone();
        known.insert("model".into(), model.clone());
        known.insert("value_model".into(), model);
        known
    }
}

impl PpoConfig {
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.ppo.temperature,
            top_p: self.ppo.top_p,
            min_p: 0.0,
            max_tokens: self.ppo.max_new_tokens,
        }
    }

    fn micro_batch(&self) -> usize {
        match self.ppo.micro_batch {
            0 => self.ppo.mini_batch,
            n => n,
        }
    }

    fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PpoState {
    /// Iterations completed.
    pub iteration: u64,
    /// Position in the shuffled prompt stream.
    pub prompts: DataCursor,
    pub kl: KlController,
    /// Optimizer steps of the policy and of the value model.
    pub policy_steps: u64,
    pub value_steps: u64,
    pub elapsed_s: f64,
    /// The best held-out evaluation so far: (iteration, value of `ppo.best_metric`).
    pub best: Option<(u64, f64)>,
    /// Optimizer steps of each model's learning-rate schedule, fixed when the run started
    /// (a resumed run with more iterations keeps the rates of the steps scheduled before).
    pub schedule_steps: u64,
    /// SHA-256 of the reference policy's weights: a resumed run checks that `ppo.init` is
    /// still the model it started from.
    pub reference_sha256: String,
}

/// One answer of a rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutAnswer {
    pub prompt_index: usize,
    /// `FILE:LINE` of the prompt.
    pub source: String,
    pub prompt: Turns,
    pub answer: String,
    pub finish: FinishReason,
    /// Answer tokens (the end token included when the answer finished).
    pub tokens: usize,
    #[serde(flatten)]
    pub reward: CombinedReward,
    /// The scalar the last token got: whitened logit, or the missing-EOS score.
    pub score: f64,
    /// The gym's gold score (gym task prompts only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gold: Option<f64>,
    /// Whether the answer refused (the gym's refusal check).
    pub refused: bool,
}

/// The record of one iteration in `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IterationRecord {
    pub iteration: u64,
    /// Mean R_c before logit and whitening; its standard deviation; the mean logit.
    pub reward: f64,
    pub reward_std: f64,
    pub reward_logit: f64,
    pub helpful: f64,
    pub safe: f64,
    /// Share of answers the safety model decided.
    pub safety_share: f64,
    /// KL to the reference (k1 of the sampled tokens): mean per token, mean sum per answer.
    pub kl_per_token: f64,
    pub kl_per_answer: f64,
    pub beta: f64,
    pub entropy: f64,
    pub clip_fraction: f64,
    pub approx_kl: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    pub value_clip_fraction: f64,
    pub explained_variance: f64,
    pub policy_grad_norm: f64,
    pub value_grad_norm: f64,
    pub answer_tokens: f64,
    /// Share of answers cut at `max_new_tokens` or the context (no end token).
    pub truncated: f64,
    /// Mean gold score over gym task prompts, and refusal rates (gym prompts only).
    pub gold: Option<f64>,
    pub unsafe_refused: Option<f64>,
    pub benign_refused: Option<f64>,
    pub generation_s: f64,
    pub scoring_s: f64,
    /// The reference and value passes without gradients.
    pub no_grad_s: f64,
    pub update_s: f64,
    /// Distinct prompts (not answers) per second of the iteration.
    pub prompts_per_s: f64,
    pub elapsed_s: f64,
}

/// The record of one held-out evaluation (greedy answers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub iteration: u64,
    pub eval_reward: f64,
    pub eval_gold: Option<f64>,
    pub eval_unsafe_refused: Option<f64>,
    pub eval_benign_refused: Option<f64>,
    pub eval_answer_tokens: f64,
    pub eval_truncated: f64,
    /// Whether this evaluation is the best so far (its checkpoint is in `OUT/best/`).
    pub best: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PpoRecord {
    Eval(EvalRecord),
    Iteration(Box<IterationRecord>),
}

impl Stepped for PpoRecord {
    fn step(&self) -> u64 {
        match self {
            PpoRecord::Iteration(r) => r.iteration,
            PpoRecord::Eval(r) => r.iteration,
        }
    }
}

/// Whether `dir` holds a PPO run (its `config.toml` has a `[ppo]` section).
pub fn is_ppo_run(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(crate::train::run_dir::CONFIG_FILE))
        .is_ok_and(|t| t.contains("\n[ppo]"))
}

/// Rates an answer to a prompt: the combined reward of the two reward models, or anything
/// programmatic (the tests' synthetic tasks).
pub trait Rewarder {
    /// One reward per answer; `prompts[i]` indexes the run's prompts (of `set`).
    fn score(
        &self,
        set: &Prompts,
        prompts: &[usize],
        answers: &[Answer],
        tokens: &[Vec<u32>],
    ) -> Result<Vec<CombinedReward>>;
}

impl Rewarder for RewardModels {
    fn score(
        &self,
        set: &Prompts,
        prompts: &[usize],
        answers: &[Answer],
        _tokens: &[Vec<u32>],
    ) -> Result<Vec<CombinedReward>> {
        let turns: Vec<Turns> = prompts.iter().map(|&i| set.prompts[i].clone()).collect();
        let safety: Vec<bool> = prompts.iter().map(|&i| set.safety[i]).collect();
        let grouped: Vec<Vec<Answer>> = answers.iter().map(|a| vec![a.clone()]).collect();
        let scored = RewardModels::score(self, &turns, &safety, &grouped, &|i| {
            set.sources[prompts[i]].clone()
        })?;
        Ok(scored.into_iter().map(|mut r| r.remove(0)).collect())
    }
}

/// The gym's checker as a reward: a task answer's gold score; for a prompt that is no gym
/// task (an unsafe one), 1 if the answer refused, else 0. `logit` is the score itself (it is
/// whitened next).
pub struct GymChecker;

impl Rewarder for GymChecker {
    fn score(
        &self,
        set: &Prompts,
        prompts: &[usize],
        answers: &[Answer],
        _tokens: &[Vec<u32>],
    ) -> Result<Vec<CombinedReward>> {
        let texts: Vec<String> = answers.iter().map(|a| a.text.clone()).collect();
        Ok(prompts
            .iter()
            .zip(gold_of(set, prompts, &texts))
            .map(|(&i, (score, refused))| {
                let gold = score.unwrap_or(refused as u8 as f64);
                CombinedReward {
                    helpful: gold,
                    safe: gold,
                    reward: gold,
                    branch: if set.safety[i] {
                        Branch::Safety
                    } else {
                        Branch::Helpfulness
                    },
                    logit: gold,
                }
            })
            .collect())
    }
}

/// Where a run ended.
#[derive(Debug, Clone)]
pub struct PpoSummary {
    pub iterations: u64,
    pub interrupted: bool,
    pub checkpoint: PathBuf,
    /// The best held-out checkpoint, when evaluations ran.
    pub best: Option<PathBuf>,
    pub last: Option<IterationRecord>,
    pub evals: Vec<EvalRecord>,
    /// Peak resident memory of the process (Linux), GiB.
    pub peak_rss_gib: Option<f64>,
}

/// The models and data of a run, loaded and checked before anything is written.
struct Inputs {
    prompts: Prompts,
    encoded: Vec<Vec<u32>>,
    eval: Option<(Prompts, Vec<Vec<u32>>)>,
    /// Frozen: the initial policy, without autodiff.
    reference: Llama,
    reference_sha256: String,
    tokenizer: Tokenizer,
    /// The token that ends an answer, and the padding.
    stop: u32,
    pad: u32,
    policy_config: ModelConfig,
    value_config: ModelConfig,
}

/// The weights a fresh run starts from, on the host: held only until the trained models are
/// built (for a 135M model, 540 MB each).
struct StartWeights {
    policy: Vec<NamedTensor>,
    value: Vec<NamedTensor>,
    value_path: PathBuf,
}

/// Runs (or resumes) PPO with the reward of the config.
pub fn run(launch: &Launch) -> Result<PpoSummary> {
    let (run, config) = read_config(launch)?;
    let p = &config.ppo;
    if p.reward == RewardSource::GymChecker {
        return train(launch, run, config, &GymChecker, None);
    }
    if p.rm_helpful.as_os_str().is_empty() || p.rm_safety.as_os_str().is_empty() {
        bail!(
            "--rm-helpful and --rm-safety are required: the two reward models (ppo.rm_helpful, ppo.rm_safety)"
        );
    }
    let device = launch.device.device.clone();
    let mut rms = RewardModels::load(
        &p.rm_helpful,
        &p.rm_safety,
        p.safety_threshold,
        p.score_batch,
        &device,
    )?;
    rms.gated = p.gate;
    train(launch, run, config, &rms, Some(&rms))
}

/// [`run`] with another reward than the reward models' (`ppo.rm_*` are not read).
pub fn run_with_rewarder(launch: &Launch, rewarder: &dyn Rewarder) -> Result<PpoSummary> {
    let (run, config) = read_config(launch)?;
    train(launch, run, config, rewarder, None)
}

/// The run's output directory, checked, and its configuration: the config file and overrides
/// of a fresh run (`--init` is `ppo.init`), or the stored one of a resumed run with the
/// changes it allows.
fn read_config(launch: &Launch) -> Result<(RunDir, PpoConfig)> {
    let mut overrides = launch.overrides.clone();
    if let Some(init) = &launch.init {
        overrides.push(format!(
            "ppo.init={}",
            toml::Value::String(init.display().to_string())
        ));
    }
    let run = RunDir::check(&launch.out_dir, launch.resume, launch.config.as_ref())?;
    let config = match &run.resume_from {
        Some(dir) => {
            let manifest = checkpoint::read_manifest(dir)?;
            config::load_resumed(
                &manifest.config,
                &dir.join(checkpoint::MANIFEST_FILE),
                "ppo",
                launch.config.as_ref(),
                &overrides,
            )?
        }
        None => config::load_from(launch.config.as_ref(), &overrides)?,
    };
    Ok((run, config))
}

/// SHA-256 over a model's parameters (names and f32 values).
fn weights_sha256(tensors: &[NamedTensor]) -> String {
    let mut hasher = Sha256::new();
    for t in tensors {
        hasher.update(t.name.as_bytes());
        hasher.update(bytemuck::cast_slice::<f32, u8>(&t.values));
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads prompts and models and checks them against each other: one tokenizer for policy,
/// reward models and value model; every prompt leaving room for `max_new_tokens` in every
/// context.
fn read_inputs(
    config: &PpoConfig,
    rms: Option<&RewardModels>,
    device: &Device,
) -> Result<(Inputs, StartWeights)> {
    let p = &config.ppo;
    let prompts = Prompts::read(&p.prompts)?;
    let eval_prompts = if p.eval_prompts.is_empty() {
        None
    } else {
        Some(Prompts::read(&p.eval_prompts)?)
    };
    let chat = convert::load_model(&p.init, device, config.model.kernels)?;
    let policy_config = chat.loaded.model_config.clone();
    let policy_path = chat.loaded.dir.clone();
    if let Some(rms) = rms {
        rms.check_tokenizer(&chat.loaded.tokenizer, &policy_path)?;
    }
    let policy = Policy::new(chat.loaded, config.data.template)?;
    let value_path = if p.value_init.as_os_str().is_empty() {
        if p.rm_helpful.as_os_str().is_empty() {
            bail!("ppo.value_init is required when no helpfulness reward model is given");
        }
        p.rm_helpful.clone()
    } else {
        p.value_init.clone()
    };
    let (value_config, value_tensors, value_tokenizer) =
        read_value_init(&value_path, config.model.kernels, p.seed, device)?;
    if value_tokenizer.to_json()? != policy.tokenizer.to_json()? {
        bail!(
            "the value model {} has another tokenizer than the policy {}: both must share the policy's tokenizer",
            value_path.display(),
            policy_path.display()
        );
    }
    let encode = |set: &Prompts| -> Result<Vec<Vec<u32>>> {
        let encoded = rs::encode_prompts(set, &policy, rms, p.max_new_tokens)?;
        for (i, ids) in encoded.iter().enumerate() {
            let longest = (ids.len() + p.max_new_tokens).min(policy_config.max_seq_len);
            if longest > value_config.max_seq_len {
                bail!(
                    "{}: the prompt has {} tokens; with ppo.max_new_tokens = {} the answer would not fit the value model's context of {}",
                    set.sources[i],
                    ids.len(),
                    p.max_new_tokens,
                    value_config.max_seq_len
                );
            }
        }
        Ok(encoded)
    };
    let encoded = encode(&prompts)?;
    let eval = match eval_prompts {
        Some(set) => {
            let ids = encode(&set)?;
            Some((set, ids))
        }
        None => None,
    };
    let policy_weights = params::export(&policy.model);
    let reference_sha256 = weights_sha256(&policy_weights);
    let stop = policy.template.stop_token(&policy.tokenizer)?;
    let pad = policy.tokenizer.pad_id.unwrap_or(policy.tokenizer.eos_id);
    let inputs = Inputs {
        stop,
        pad,
        prompts,
        encoded,
        eval,
        reference: policy.model,
        reference_sha256,
        tokenizer: policy.tokenizer,
        policy_config,
        value_config,
    };
    let start = StartWeights {
        policy: policy_weights,
        value: value_tensors,
        value_path,
    };
    Ok((inputs, start))
}

/// The value model's starting point: a reward model's weights, or a chat model's backbone
/// with a fresh scalar head. Returns its shape, its weights (named as [`RewardModel`]'s) and
/// its tokenizer.
fn read_value_init(
    path: &Path,
    kernels: crate::kernels::Kernels,
    seed: u64,
    device: &Device,
) -> Result<(ModelConfig, Vec<NamedTensor>, Tokenizer)> {
    let is_rm = convert::Format::detect(path)? == convert::Format::Kiln
        && checkpoint::read_manifest(&checkpoint::resolve(path)?)?
            .config
            .contains("[rm]");
    if is_rm {
        let rm = score::load(path, device)?;
        let config = ModelConfig {
            kernels,
            ..rm.config.model.clone()
        };
        return Ok((config, params::export(&rm.model), rm.tokenizer));
    }
    let chat = convert::load_model(path, device, kernels)?;
    let config = chat.loaded.model_config.clone();
    let mut backbone = chat.loaded.model;
    backbone.lm_head = None;
    let model = RewardModel {
        backbone,
        score: RewardModel::fresh_head(&config, seed, device),
    };
    Ok((config, params::export(&model), chat.loaded.tokenizer))
}

/// The trained models and their optimizers.
struct Trained {
    policy: Llama,
    value: RewardModel,
    policy_optim: AdamW,
    value_optim: AdamW,
}

fn train(
    launch: &Launch,
    run: RunDir,
    mut config: PpoConfig,
    rewarder: &dyn Rewarder,
    rms: Option<&RewardModels>,
) -> Result<PpoSummary> {
    let device = launch.device.device.clone();
    let autodiff = device.clone().autodiff();
    let (inputs, start) = read_inputs(&config, rms, &device)?;
    let kernels = config.model.kernels;
    let value_kernels = config.value_model.kernels;
    let (mut trained, mut state) = match &run.resume_from {
        Some(dir) => {
            let saved = checkpoint::load(dir)?;
            let state: PpoState = serde_json::from_str(&saved.state_json)
                .map_err(|e| anyhow!("{}: {e}", dir.join(checkpoint::STATE_FILE).display()))?;
            if state.reference_sha256 != inputs.reference_sha256 {
                bail!(
                    "--resume: ppo.init {} is not the model this run started from (its weights changed): the reference policy must stay the same",
                    config.ppo.init.display()
                );
            }
            let mut extra: BTreeMap<String, Vec<NamedTensor>> = saved.extra.into_iter().collect();
            let mut take = |name: &str| {
                extra.remove(name).ok_or_else(|| {
                    anyhow!("{}: {name} is missing: not a PPO checkpoint", dir.display())
                })
            };
            let (value_weights, value_moments) =
                (take(VALUE_MODEL_FILE)?, take(VALUE_OPTIMIZER_FILE)?);
            let policy = params::import(
                Llama::for_import(&config.model, &autodiff),
                saved.model,
                &dir.join(checkpoint::MODEL_FILE),
            )?;
            let value = params::import(
                RewardModel::for_import(&config.value_model, &autodiff),
                value_weights,
                &dir.join(VALUE_MODEL_FILE),
            )?;
            let policy_optim = AdamW::import(
                config.optim.clone(),
                &policy,
                state.policy_steps,
                saved.optimizer,
                &dir.join(checkpoint::OPTIMIZER_FILE),
            )?;
            let value_optim = AdamW::import(
                config.value_optim.clone(),
                &value,
                state.value_steps,
                value_moments,
                &dir.join(VALUE_OPTIMIZER_FILE),
            )?;
            launch.collective.say(&format!(
                "resuming from {} (iteration {})",
                dir.display(),
                state.iteration
            ));
            let trained = Trained {
                policy,
                value,
                policy_optim,
                value_optim,
            };
            (trained, state)
        }
        None => {
            config.model = ModelConfig {
                kernels,
                ..inputs.policy_config.clone()
            };
            config.value_model = ModelConfig {
                kernels: value_kernels,
                ..inputs.value_config.clone()
            };
            let policy = params::import(
                Llama::for_import(&config.model, &autodiff),
                start.policy,
                &config.ppo.init,
            )?;
            let value = params::import(
                RewardModel::for_import(&config.value_model, &autodiff),
                start.value,
                &start.value_path,
            )?;
            let state = PpoState {
                iteration: 0,
                prompts: DataCursor {
                    epoch: 0,
                    position: 0,
                },
                kl: KlController {
                    beta: config.ppo.beta,
                    target: config.ppo.kl_target,
                    horizon: config.ppo.kl_horizon,
                },
                policy_steps: 0,
                value_steps: 0,
                elapsed_s: 0.0,
                best: None,
                schedule_steps: total_steps(&config),
                reference_sha256: inputs.reference_sha256.clone(),
            };
            let trained = Trained {
                policy,
                value,
                policy_optim: AdamW::new(config.optim.clone()),
                value_optim: AdamW::new(config.value_optim.clone()),
            };
            (trained, state)
        }
    };
    // Data-parallel workers share each iteration's work (see `iteration`); worker 0 alone
    // evaluates, writes the run and prints, and the others wait for it when it saves.
    let collective = &*launch.collective;
    let writer = collective.is_writer();
    let config_toml = config.to_toml();
    let mut metrics: Option<MetricsLog<PpoRecord>> = None;
    if writer {
        run.create()?;
        run.write_config(&config_toml)?;
        metrics = Some(MetricsLog::open(
            &run.path,
            run.resume_from.as_ref().map(|_| state.iteration),
        )?);
    }
    let p = &inputs.prompts;
    collective.say(&format!(
        "ppo: {}, {} per iteration, mini-batch {}, beta {}, {} iteration(s) | device: {}",
        p.describe(),
        match config.ppo.samples_per_prompt {
            1 => format!("{} answers", config.ppo.rollout_batch),
            n => format!(
                "{} answers ({} prompts x {n}, group baseline)",
                config.ppo.rollout_batch,
                config.ppo.rollout_batch / n
            ),
        },
        config.ppo.mini_batch,
        state.kl.beta,
        config.ppo.iterations,
        launch.device.describe()
    ));
    let generation_batches = config
        .ppo
        .rollout_batch
        .div_ceil(config.ppo.generation_batch);
    if generation_batches < collective.world_size() {
        collective.say(&format!(
            "warning: ppo.generation_batch = {} makes {generation_batches} generation batch(es) per iteration for {} workers, so some wait while others sample: set it to {} or less",
            config.ppo.generation_batch,
            collective.world_size(),
            config.ppo.rollout_batch.div_ceil(collective.world_size())
        ));
    }
    let tokenizer_json = inputs.tokenizer.to_json()?;
    let checkpoint_data = |trained: &Trained, state: &PpoState| -> Result<CheckpointData> {
        Ok(CheckpointData {
            step: state.iteration,
            config_toml: config_toml.clone(),
            model: params::export(&trained.policy),
            optimizer: trained.policy_optim.export(&trained.policy),
            state_json: serde_json::to_string_pretty(state)?,
            tokenizer_json: tokenizer_json.clone(),
            extra: vec![
                (VALUE_MODEL_FILE.into(), params::export(&trained.value)),
                (
                    VALUE_OPTIMIZER_FILE.into(),
                    trained.value_optim.export(&trained.value),
                ),
            ],
        })
    };
    let best_dir = run.path.join(BEST_DIR);
    let evaluate_now = |trained: &Trained,
                        state: &mut PpoState,
                        metrics: &mut Option<MetricsLog<PpoRecord>>|
     -> Result<Option<EvalRecord>> {
        let (Some((set, encoded)), Some(metrics)) = (&inputs.eval, metrics) else {
            return Ok(None);
        };
        let mut record = evaluate(
            &trained.policy.valid(),
            &inputs,
            set,
            encoded,
            &config,
            rewarder,
            state.iteration,
        )?;
        let value = match config.ppo.best_metric {
            BestMetric::Reward => Some(record.eval_reward),
            BestMetric::Gold => record.eval_gold,
        };
        if let Some(value) = value
            && state.best.is_none_or(|(_, best)| value > best)
        {
            state.best = Some((state.iteration, value));
            record.best = true;
            checkpoint::save(
                &best_dir.join("checkpoints"),
                &checkpoint_data(trained, state)?,
                1,
            )?;
        }
        metrics.write(&PpoRecord::Eval(record.clone()))?;
        Ok(Some(record))
    };

    let mut evals = Vec::new();
    if state.iteration == 0
        && let Some(record) = evaluate_now(&trained, &mut state, &mut metrics)?
    {
        eprintln!("{}", describe_eval(&record));
        evals.push(record);
    }
    let total = config.ppo.iterations;
    let mut stream = ShuffledIndices::new(p.len(), config.ppo.seed, state.prompts);
    let mut progress = Progress::shown_if(writer, || {
        Progress::counter(state.iteration, total, "iterations")
    });
    // Worker 0 saves while the others wait, so none runs ahead of a checkpoint.
    let save = |trained: &Trained, state: &PpoState| -> Result<PathBuf> {
        if !writer {
            collective.barrier()?;
            return Ok(run.checkpoint_path(state.iteration));
        }
        let saved = run.save(
            &checkpoint_data(trained, state)?,
            config.train.keep_checkpoints,
        )?;
        collective.barrier()?;
        Ok(saved)
    };
    let started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut last = None;
    let mut last_checkpoint = run.resume_from.clone();
    let mut interrupted = false;
    let mut this_run = 0u64;
    while state.iteration < total {
        let n = config.ppo.samples_per_prompt;
        // Each prompt's answers side by side: the group baseline takes them in runs of n.
        let indices: Vec<usize> = stream
            .next_batch(config.ppo.rollout_batch / n)
            .into_iter()
            .flat_map(|i| std::iter::repeat_n(i, n))
            .collect();
        let (record, answers) = iteration(
            &mut trained,
            &mut state,
            &inputs,
            &indices,
            &config,
            rewarder,
            collective,
        )?;
        state.prompts = stream.cursor();
        state.iteration += 1;
        this_run += 1;
        state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        let record = IterationRecord {
            elapsed_s: state.elapsed_s,
            ..record
        };
        if let Some(metrics) = &mut metrics {
            write_rollout(&run.path, &answers)?;
            metrics.write(&PpoRecord::Iteration(Box::new(record.clone())))?;
        }
        progress.update(state.iteration, &describe(&record));
        let done = state.iteration == total;
        let at = state.iteration;
        let due = |interval: u64| interval > 0 && at % interval == 0;
        if (done || due(config.ppo.eval_interval))
            && let Some(eval) = evaluate_now(&trained, &mut state, &mut metrics)?
        {
            progress.message(&describe_eval(&eval));
            evals.push(eval);
        }
        // Every worker stops after the same iteration, whichever saw the Ctrl-C.
        interrupted = collective.any(INTERRUPTED.load(Ordering::SeqCst))?
            || launch.stop_after == Some(this_run);
        if done || interrupted || due(config.train.checkpoint_interval) {
            last_checkpoint = Some(save(&trained, &state)?);
        }
        last = Some(record);
        if interrupted {
            progress.message(&format!(
                "interrupted: saved checkpoint at iteration {}; continue with --resume",
                state.iteration
            ));
            break;
        }
    }
    progress.finish();
    let checkpoint = match last_checkpoint {
        Some(dir) => dir,
        None => save(&trained, &state)?,
    };
    Ok(PpoSummary {
        iterations: state.iteration,
        interrupted,
        checkpoint,
        best: state.best.map(|_| best_dir),
        last,
        evals,
        peak_rss_gib: peak_rss_gib(),
    })
}

fn describe(r: &IterationRecord) -> String {
    let gold = r.gold.map_or(String::new(), |g| format!(" gold {g:.3}"));
    format!(
        "it {} | reward {:.3}{gold} | kl {:.4}/tok | clip {:.2} | {:.1} prompts/s",
        r.iteration, r.reward, r.kl_per_token, r.clip_fraction, r.prompts_per_s
    )
}

fn describe_eval(r: &EvalRecord) -> String {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    format!(
        "eval at iteration {} | reward {:.3} | gold {} | unsafe refused {} | benign refused {}{}",
        r.iteration,
        r.eval_reward,
        opt(r.eval_gold),
        opt(r.eval_unsafe_refused),
        opt(r.eval_benign_refused),
        if r.best { " | best so far" } else { "" }
    )
}

/// Peak resident set size of this process (Linux `VmHWM`), GiB.
pub fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

/// Sampled answers of a rollout, one per prompt.
#[derive(Default, Serialize, Deserialize)]
struct Sampled {
    /// Answer tokens, the end token included when the answer finished.
    actions: Vec<Vec<u32>>,
    /// Their log-probabilities at sampling (the policy's own distribution).
    logprobs: Vec<Vec<f32>>,
    finish: Vec<FinishReason>,
    texts: Vec<String>,
}

impl Sampled {
    /// What the rewarder reads: each answer's text and whether it finished.
    fn answers(&self) -> Vec<Answer> {
        self.texts
            .iter()
            .zip(&self.finish)
            .map(|(text, finish)| Answer {
                text: text.clone(),
                complete: *finish == FinishReason::Eos,
            })
            .collect()
    }

    /// Share of answers without their end token.
    fn truncated_share(&self) -> f64 {
        let cut = self.finish.iter().filter(|&&f| f != FinishReason::Eos);
        cut.count() as f64 / self.finish.len().max(1) as f64
    }
}

/// Answers to `prompts` (token ids) in batches of `generation_batch`, batch `b` drawn with a
/// generator seeded from (seed, iteration, b). Data-parallel workers draw the batches in
/// turn ([`map_shared`]), and all get every answer.
fn sample(
    policy: &Llama,
    inputs: &Inputs,
    prompts: &[&Vec<u32>],
    params: &SamplingParams,
    generation_batch: usize,
    seed: impl Fn(usize) -> u64,
    collective: &dyn Collective,
) -> Result<Sampled> {
    let batches: Vec<&[&Vec<u32>]> = prompts.chunks(generation_batch).collect();
    let drawn = map_shared(collective, batches.len(), |b| {
        sample_batch(policy, inputs, batches[b], params, seed(b))
    })?;
    let mut out = Sampled::default();
    for batch in drawn {
        out.actions.extend(batch.actions);
        out.logprobs.extend(batch.logprobs);
        out.finish.extend(batch.finish);
        out.texts.extend(batch.texts);
    }
    Ok(out)
}

/// One generation batch of [`sample`].
fn sample_batch(
    policy: &Llama,
    inputs: &Inputs,
    chunk: &[&Vec<u32>],
    params: &SamplingParams,
    seed: u64,
) -> Result<Sampled> {
    let (stop, pad) = (inputs.stop, inputs.pad);
    let rows: Vec<Vec<u32>> = chunk.iter().map(|p| (*p).clone()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let generated =
        generate::generate_with(policy, &rows, params, stop, pad, &mut rng, &mut |_, _| {
            std::ops::ControlFlow::Continue(())
        })?;
    let mut out = Sampled::default();
    for g in generated {
        let mut actions = g.tokens.clone();
        if g.finish == FinishReason::Eos {
            actions.push(stop);
        }
        debug_assert_eq!(actions.len(), g.logprobs.len());
        out.texts
            .push(inputs.tokenizer.decode(&g.tokens)?.trim().to_string());
        out.actions.push(actions);
        out.logprobs.push(g.logprobs);
        out.finish.push(g.finish);
    }
    Ok(out)
}

/// What the gym's checker says of each answer: (gold score, refused), `None` where the
/// prompt is no gym task.
fn gold_of(set: &Prompts, prompts: &[usize], texts: &[String]) -> Vec<(Option<f64>, bool)> {
    prompts
        .iter()
        .zip(texts)
        .map(
            |(&i, text)| match judge(&last_user_text(&set.prompts[i]), text) {
                Gold::Task { score, .. } => (Some(score), crate::gym::is_refusal(text)),
                Gold::Other { refused } => (None, refused),
            },
        )
        .collect()
}

/// Mean gold score, unsafe-refusal and benign-refusal rates of answers to gym prompts.
/// Without a single gym task prompt among them, none of the three.
fn gold_rates(gold: &[(Option<f64>, bool)]) -> (Option<f64>, Option<f64>, Option<f64>) {
    let tasks: Vec<(f64, bool)> = gold.iter().filter_map(|g| g.0.map(|s| (s, g.1))).collect();
    if tasks.is_empty() {
        return (None, None, None);
    }
    let others: Vec<bool> = gold.iter().filter(|g| g.0.is_none()).map(|g| g.1).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let gold = mean(&tasks.iter().map(|t| t.0).collect::<Vec<_>>());
    let benign = mean(&tasks.iter().map(|t| t.1 as u8 as f64).collect::<Vec<_>>());
    let unsafe_refused = (!others.is_empty())
        .then(|| mean(&others.iter().map(|&r| r as u8 as f64).collect::<Vec<_>>()));
    (Some(gold), unsafe_refused, Some(benign))
}

/// One PPO iteration on the prompts `indices`: rollout, rewards, advantages, update. Returns
/// its metrics (without `elapsed_s`) and its answers.
fn iteration(
    trained: &mut Trained,
    state: &mut PpoState,
    inputs: &Inputs,
    indices: &[usize],
    config: &PpoConfig,
    rewarder: &dyn Rewarder,
    collective: &dyn Collective,
) -> Result<(IterationRecord, Vec<RolloutAnswer>)> {
    let p = &config.ppo;
    let it = state.iteration as usize;
    let started = Instant::now();
    let prompts: Vec<&Vec<u32>> = indices.iter().map(|&i| &inputs.encoded[i]).collect();
    // Data-parallel workers split the generation batches, the scoring and the no-grad passes
    // by chunks of rows (each result independent of who computes it), and every worker gets
    // the whole rollout; the update splits each mini-batch and sums the gradients.
    let sampled = sample(
        &trained.policy.valid(),
        inputs,
        &prompts,
        &config.sampling(),
        p.generation_batch,
        |b| rs::batch_seed(p.seed, it, b),
        collective,
    )?;
    let generation_s = started.elapsed().as_secs_f64();
    let chunks: Vec<Vec<usize>> = (0..indices.len())
        .collect::<Vec<_>>()
        .chunks(p.generation_batch.max(config.micro_batch()))
        .map(<[usize]>::to_vec)
        .collect();

    // Rewards: R_c, its logit whitened over the answers that finished.
    let t = Instant::now();
    let answers = sampled.answers();
    let rewards: Vec<CombinedReward> = map_shared(collective, chunks.len(), |c| {
        let rows = &chunks[c];
        let pick = |v: &[Answer]| rows.iter().map(|&r| v[r].clone()).collect::<Vec<_>>();
        let tokens: Vec<Vec<u32>> = rows.iter().map(|&r| sampled.actions[r].clone()).collect();
        let prompts: Vec<usize> = rows.iter().map(|&r| indices[r]).collect();
        rewarder.score(&inputs.prompts, &prompts, &pick(&answers), &tokens)
    })?
    .concat();
    let logits: Vec<f64> = rewards.iter().map(|r| r.logit).collect();
    let complete: Vec<bool> = answers.iter().map(|a| a.complete).collect();
    let missing_eos = p.missing_eos_penalty.then_some(p.missing_eos_score);
    let scores = answer_scores(&logits, &complete, missing_eos, p.samples_per_prompt);
    let scoring_s = t.elapsed().as_secs_f64();

    // The reference's log-probabilities and the values, without gradients.
    let t = Instant::now();
    let pad = inputs.pad;
    let micro = config.micro_batch();
    let value_model = trained.value.valid();
    let (mut ref_logprobs, mut values) = (Vec::new(), Vec::new());
    // Without gradients there are no activations to keep: generation-sized batches.
    let passes = map_shared(collective, chunks.len(), |c| {
        let batch = action_batch(&chunks[c], &prompts, &sampled.actions, pad);
        Ok((
            host(action_logprobs(&inputs.reference, &batch)),
            host(action_values(&value_model, &batch)),
        ))
    })?;
    for (r, v) in passes {
        ref_logprobs.extend(r);
        values.extend(v);
    }
    let lengths: Vec<usize> = sampled.actions.iter().map(Vec::len).collect();
    let ref_logprobs = split_rows(&ref_logprobs, &lengths);
    let values = split_rows(&values, &lengths);
    let no_grad_s = t.elapsed().as_secs_f64();

    // Per-token rewards, GAE, whitened advantages.
    // k1, the log-ratio of each sampled token, is also the KL the metrics report.
    let mut kl_k1 = Vec::with_capacity(indices.len());
    let mut advantages = Vec::with_capacity(indices.len());
    let mut returns = Vec::with_capacity(indices.len());
    for i in 0..indices.len() {
        let log_ratio: Vec<f64> = sampled.logprobs[i]
            .iter()
            .zip(&ref_logprobs[i])
            .map(|(&lp, &rp)| lp as f64 - rp)
            .collect();
        let kl: Vec<f64> = log_ratio
            .iter()
            .map(|&d| p.kl_estimator.of_log_ratio(d))
            .collect();
        kl_k1.push(log_ratio);
        let rewards = token_rewards(&kl, state.kl.beta, scores[i]);
        let (adv, ret) = gae(&rewards, &values[i], p.gamma, p.lambda);
        advantages.push(adv);
        returns.push(ret);
    }
    let advantages = whiten_tokens(&advantages);

    // The update: shuffled mini-batches, one step of each model per mini-batch.
    let t = Instant::now();
    let mut stats = UpdateStats::default();
    for epoch in 0..p.epochs {
        let mut order: Vec<usize> = (0..indices.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(rs::batch_seed(
            p.seed ^ 0x5050,
            it,
            epoch,
        )));
        for mini in order.chunks(p.mini_batch) {
            let mut policy_acc = Accumulated::default();
            let mut value_acc = Accumulated::default();
            let mine = share(mini, collective.rank(), collective.world_size());
            for rows in mine.chunks(micro) {
                let batch = action_batch(rows, &prompts, &sampled.actions, pad);
                let pick = |v: &[Vec<f64>]| flat(rows, v);
                let old_logprobs: Vec<f64> = rows
                    .iter()
                    .flat_map(|&r| sampled.logprobs[r].iter().map(|&x| x as f64))
                    .collect();
                let device = trained.policy.device();
                let (logp, entropy) = action_logprobs_and_entropy(&trained.policy, &batch);
                let old = tensor(&old_logprobs, &device);
                let adv = tensor(&pick(&advantages), &device);
                let loss = clipped_policy_loss(logp.clone(), old, adv, p.clip);
                let n = batch.num_actions() as f64;
                let tokens = (batch.rows * batch.seq_len) as u64;
                stats.policy(&host(logp.detach()), &old_logprobs, &host(entropy), p.clip);
                policy_acc.add(
                    &trained.policy,
                    MicroBatchLoss {
                        sum: loss.sum(),
                        counted: n,
                        tokens,
                    },
                );
                let device = trained.value.backbone.device();
                let v = action_values(&trained.value, &batch);
                let old_v = pick(&values);
                let loss = clipped_value_loss(
                    v.clone(),
                    tensor(&old_v, &device),
                    tensor(&pick(&returns), &device),
                    p.value_clip,
                );
                stats.value(&host(v.detach()), &old_v, p.value_clip);
                value_acc.add(
                    &trained.value,
                    MicroBatchLoss {
                        sum: loss.sum(),
                        counted: n,
                        tokens,
                    },
                );
            }
            let lr = optim::learning_rate(&config.optim, state.policy_steps, state.schedule_steps);
            let policy_acc = policy_acc.all_reduce(&trained.policy, collective)?;
            // The step owns the model it updates; a cheap placeholder stands in meanwhile
            // (a clone of the model itself would keep its old weights alive during the step).
            let policy = std::mem::replace(&mut trained.policy, inputs.reference.clone());
            let (policy, result) = step::apply(policy, &mut trained.policy_optim, policy_acc, lr)
                .map_err(|e| {
                anyhow!(
                    "PPO diverged at iteration {}: policy {e}",
                    state.iteration + 1
                )
            })?;
            trained.policy = policy;
            state.policy_steps += 1;
            stats.policy_loss.push(result.loss);
            stats.policy_grad_norm.push(result.grad_norm);
            let lr =
                optim::learning_rate(&config.value_optim, state.value_steps, state.schedule_steps);
            let value_acc = value_acc.all_reduce(&trained.value, collective)?;
            let value = std::mem::replace(&mut trained.value, value_model.clone());
            let (value, result) = step::apply(value, &mut trained.value_optim, value_acc, lr)
                .map_err(|e| {
                    anyhow!(
                        "PPO diverged at iteration {}: value model {e}",
                        state.iteration + 1
                    )
                })?;
            trained.value = value;
            state.value_steps += 1;
            stats.value_loss.push(result.loss);
            stats.value_grad_norm.push(result.grad_norm);
        }
    }
    stats.gather(collective)?;
    let update_s = t.elapsed().as_secs_f64();

    // Metrics.
    let n = indices.len() as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let reward_values: Vec<f64> = rewards.iter().map(|r| r.reward).collect();
    let (reward, reward_std) = mean_std(&reward_values);
    let kl_tokens: Vec<f64> = kl_k1.iter().flatten().copied().collect();
    let kl_sums: Vec<f64> = kl_k1.iter().map(|k| k.iter().sum()).collect();
    let kl_per_answer = mean(&kl_sums);
    let flat_returns: Vec<f64> = returns.iter().flatten().copied().collect();
    let residuals: Vec<f64> = returns
        .iter()
        .flatten()
        .zip(values.iter().flatten())
        .map(|(r, v)| r - v)
        .collect();
    let var = |v: &[f64]| mean_std(v).1.powi(2);
    let explained_variance = 1.0 - var(&residuals) / var(&flat_returns).max(1e-12);
    let gold = gold_of(&inputs.prompts, indices, &sampled.texts);
    let (gold_mean, unsafe_refused, benign_refused) = gold_rates(&gold);
    let beta = state.kl.beta;
    state.kl.update(kl_per_answer, indices.len());
    let record = IterationRecord {
        iteration: state.iteration + 1,
        reward,
        reward_std,
        reward_logit: mean(&rewards.iter().map(|r| r.logit).collect::<Vec<_>>()),
        helpful: mean(&rewards.iter().map(|r| r.helpful).collect::<Vec<_>>()),
        safe: mean(&rewards.iter().map(|r| r.safe).collect::<Vec<_>>()),
        safety_share: rewards
            .iter()
            .filter(|r| r.branch == Branch::Safety)
            .count() as f64
            / n,
        kl_per_token: mean(&kl_tokens),
        kl_per_answer,
        beta,
        entropy: mean(&stats.entropy),
        clip_fraction: stats.clipped as f64 / stats.tokens.max(1) as f64,
        approx_kl: mean(&stats.approx_kl),
        policy_loss: mean(&stats.policy_loss),
        value_loss: mean(&stats.value_loss),
        value_clip_fraction: stats.value_clipped as f64 / stats.tokens.max(1) as f64,
        explained_variance,
        policy_grad_norm: mean(&stats.policy_grad_norm),
        value_grad_norm: mean(&stats.value_grad_norm),
        answer_tokens: mean(&lengths.iter().map(|&l| l as f64).collect::<Vec<_>>()),
        truncated: sampled.truncated_share(),
        gold: gold_mean,
        unsafe_refused,
        benign_refused,
        generation_s,
        scoring_s,
        no_grad_s,
        update_s,
        prompts_per_s: n / p.samples_per_prompt as f64 / started.elapsed().as_secs_f64(),
        elapsed_s: 0.0,
    };
    let answers = indices
        .iter()
        .enumerate()
        .map(|(j, &i)| RolloutAnswer {
            prompt_index: i,
            source: inputs.prompts.sources[i].clone(),
            prompt: inputs.prompts.prompts[i].clone(),
            answer: sampled.texts[j].clone(),
            finish: sampled.finish[j],
            tokens: lengths[j],
            reward: rewards[j],
            score: scores[j],
            gold: gold[j].0,
            refused: gold[j].1,
        })
        .collect();
    Ok((record, answers))
}

/// Optimizer steps of each model over the whole run (the length of a learning-rate schedule).
fn total_steps(config: &PpoConfig) -> u64 {
    let p = &config.ppo;
    p.iterations * (p.epochs * (p.rollout_batch / p.mini_batch)) as u64
}

/// Statistics of an iteration's update, gathered per micro-batch.
#[derive(Clone, Default, Serialize, Deserialize)]
struct UpdateStats {
    tokens: usize,
    clipped: usize,
    value_clipped: usize,
    entropy: Vec<f64>,
    approx_kl: Vec<f64>,
    policy_loss: Vec<f64>,
    value_loss: Vec<f64>,
    policy_grad_norm: Vec<f64>,
    value_grad_norm: Vec<f64>,
}

impl UpdateStats {
    /// Every worker's per-token statistics (each saw its share of the mini-batches' rows);
    /// the losses and gradient norms are the steps', the same on every worker.
    fn gather(&mut self, collective: &dyn Collective) -> Result<()> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        let mine = UpdateStats {
            tokens: self.tokens,
            clipped: self.clipped,
            value_clipped: self.value_clipped,
            entropy: std::mem::take(&mut self.entropy),
            approx_kl: std::mem::take(&mut self.approx_kl),
            ..UpdateStats::default()
        };
        let all = map_shared(collective, collective.world_size(), |_| Ok(mine.clone()))?;
        (self.tokens, self.clipped, self.value_clipped) = (0, 0, 0);
        for part in all {
            self.tokens += part.tokens;
            self.clipped += part.clipped;
            self.value_clipped += part.value_clipped;
            self.entropy.extend(part.entropy);
            self.approx_kl.extend(part.approx_kl);
        }
        Ok(())
    }

    fn policy(&mut self, logp: &[f64], old: &[f64], entropy: &[f64], clip: f64) {
        self.tokens += logp.len();
        for (&new, &old) in logp.iter().zip(old) {
            let ratio = (new - old).exp();
            self.clipped += ((ratio - 1.0).abs() > clip) as usize;
            self.approx_kl.push(0.5 * (new - old).powi(2));
        }
        self.entropy.extend_from_slice(entropy);
    }

    fn value(&mut self, values: &[f64], old: &[f64], clip: f64) {
        for (v, o) in values.iter().zip(old) {
            self.value_clipped += ((v - o).abs() > clip) as usize;
        }
    }
}

/// The sequences of `rows` (prompt and answer) as one batch.
fn action_batch(
    rows: &[usize],
    prompts: &[&Vec<u32>],
    actions: &[Vec<u32>],
    pad: u32,
) -> ActionBatch {
    let sequences: Vec<(&[u32], &[u32])> = rows
        .iter()
        .map(|&r| (prompts[r].as_slice(), actions[r].as_slice()))
        .collect();
    ActionBatch::new(&sequences, pad)
}

/// The per-token values of `rows`, concatenated.
fn flat(rows: &[usize], values: &[Vec<f64>]) -> Vec<f64> {
    rows.iter()
        .flat_map(|&r| values[r].iter().copied())
        .collect()
}

fn tensor(values: &[f64], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

fn host(t: Tensor<1>) -> Vec<f64> {
    t.into_data()
        .try_into_vec_as::<f64>()
        .expect("float tensor")
}

/// Greedy answers of the policy to the held-out prompts, scored by the rewarder and the gym's
/// checker.
fn evaluate(
    policy: &Llama,
    inputs: &Inputs,
    set: &Prompts,
    encoded: &[Vec<u32>],
    config: &PpoConfig,
    rewarder: &dyn Rewarder,
    iteration: u64,
) -> Result<EvalRecord> {
    let p = &config.ppo;
    let count = match p.eval_limit {
        0 => set.len(),
        n => n.min(set.len()),
    };
    let indices: Vec<usize> = (0..count).collect();
    let prompts: Vec<&Vec<u32>> = indices.iter().map(|&i| &encoded[i]).collect();
    let params = SamplingParams {
        temperature: 0.0,
        ..config.sampling()
    };
    let sampled = sample(
        policy,
        inputs,
        &prompts,
        &params,
        p.generation_batch,
        |_| 0,
        &Solo,
    )?;
    let rewards = rewarder.score(set, &indices, &sampled.answers(), &sampled.actions)?;
    let n = count as f64;
    let gold = gold_of(set, &indices, &sampled.texts);
    let (eval_gold, eval_unsafe_refused, eval_benign_refused) = gold_rates(&gold);
    Ok(EvalRecord {
        iteration,
        eval_reward: rewards.iter().map(|r| r.reward).sum::<f64>() / n,
        eval_gold,
        eval_unsafe_refused,
        eval_benign_refused,
        eval_answer_tokens: sampled.actions.iter().map(Vec::len).sum::<usize>() as f64 / n,
        eval_truncated: sampled.truncated_share(),
        best: false,
    })
}

/// `OUT/rollout.jsonl`: the latest iteration's answers (replaced atomically each iteration).
fn write_rollout(out: &Path, answers: &[RolloutAnswer]) -> Result<()> {
    checkpoint::write_jsonl_atomic(&out.join(ROLLOUT_FILE), answers)
}

/// What `kiln bench ppo` measured: seconds per iteration and where they went.
#[derive(Debug, Clone, Serialize)]
pub struct PpoBench {
    pub device: String,
    /// Data-parallel workers (MPI ranks) sharing each iteration.
    pub workers: usize,
    pub rollout_batch: usize,
    pub mini_batch: usize,
    pub prompt_tokens: usize,
    pub answer_tokens: usize,
    /// Median over the timed iterations.
    pub seconds_per_iteration: f64,
    pub prompts_per_s: f64,
    pub generation_s: f64,
    /// Reward model, reference and value passes without gradients.
    pub no_grad_s: f64,
    pub update_s: f64,
    pub peak_rss_gib: Option<f64>,
}

/// A reward model reading token ids directly (prompt and answer), as TRL's PPO does: the
/// benchmark's reward, one forward pass per answer.
struct TokenRewardModel<'a> {
    model: RewardModel,
    prompts: &'a [Vec<u32>],
    pad: u32,
}

impl Rewarder for TokenRewardModel<'_> {
    fn score(
        &self,
        _set: &Prompts,
        prompts: &[usize],
        _answers: &[Answer],
        tokens: &[Vec<u32>],
    ) -> Result<Vec<CombinedReward>> {
        let mut out = Vec::with_capacity(tokens.len());
        let sequences: Vec<Vec<u32>> = prompts
            .iter()
            .zip(tokens)
            .map(|(&i, t)| self.prompts[i].iter().chain(t).copied().collect())
            .collect();
        for chunk in sequences.chunks(64) {
            let groups: Vec<Vec<&[u32]>> = chunk.iter().map(|s| vec![s.as_slice()]).collect();
            let scores = crate::model::reward::shared_prefix_scores(&self.model, &groups, self.pad)
                .into_data()
                .try_into_vec_as::<f32>()
                .map_err(|e| anyhow!("{e:?}"))?;
            out.extend(
                scores
                    .into_iter()
                    .map(|x| CombinedReward::helpfulness_only(x, x)),
            );
        }
        Ok(out)
    }
}

/// A tokenizer of `vocab` plain tokens (`t0`, `t1`, ...; `<s>` and `</s>` first): what
/// random-weight benchmark models decode with.
fn plain_tokenizer(vocab: usize) -> Result<Tokenizer> {
    let mut entries = serde_json::Map::new();
    for i in 0..vocab {
        let name = match i {
            0 => "<s>".to_string(),
            1 => "</s>".to_string(),
            _ => format!("t{i}"),
        };
        entries.insert(name, serde_json::Value::from(i));
    }
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": entries, "unk_token": "<s>"}
    });
    Tokenizer::from_json(&json.to_string())
}

/// PPO iterations on random-weight models of shape `shape` (policy, reference, value model
/// and one reward model, as TRL's PPO has), random `prompt_tokens`-token prompts and answers
/// of exactly `answer_tokens` tokens (the end token is never drawn): the loop of `kiln ppo`,
/// timed. `warmup` iterations run first, untimed.
#[allow(clippy::too_many_arguments)]
pub fn benchmark(
    shape: &ModelConfig,
    device: &crate::device::ComputeDevice,
    rollout_batch: usize,
    mini_batch: usize,
    prompt_tokens: usize,
    answer_tokens: usize,
    iterations: usize,
    warmup: usize,
    collective: &dyn Collective,
) -> Result<PpoBench> {
    let mut config = PpoConfig {
        model: shape.clone(),
        value_model: shape.clone(),
        ..PpoConfig::default()
    };
    let p = &mut config.ppo;
    // One generation batch per worker, so that data-parallel workers share the sampling.
    let workers = collective.world_size();
    (p.rollout_batch, p.mini_batch, p.generation_batch) =
        (rollout_batch, mini_batch, rollout_batch.div_ceil(workers));
    p.max_new_tokens = answer_tokens;
    p.prompts = vec![PathBuf::from("random")];
    p.init = PathBuf::from("random");
    config.validate()?;
    anyhow::ensure!(
        prompt_tokens + answer_tokens <= shape.max_seq_len && iterations > 0,
        "prompt and answer must fit the context of {}, and at least one iteration is timed",
        shape.max_seq_len
    );
    let plain = device.device.clone();
    let autodiff = plain.clone().autodiff();
    let reference = Llama::new(shape, 1, &plain);
    let policy = params::import(
        Llama::for_import(shape, &autodiff),
        params::export(&reference),
        Path::new("random"),
    )?;
    let value = RewardModel::new(shape, 2, &autodiff);
    let tokenizer = plain_tokenizer(shape.vocab_size)?;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let count = rollout_batch * (iterations + warmup);
    let encoded: Vec<Vec<u32>> = (0..count)
        .map(|_| {
            (0..prompt_tokens)
                .map(|_| rand::Rng::random_range(&mut rng, 2..shape.vocab_size as u32))
                .collect()
        })
        .collect();
    let prompts = Prompts {
        prompts: vec![Turns::Text(String::new()); count],
        safety: vec![false; count],
        sources: (0..count).map(|i| format!("random:{i}")).collect(),
        missing_safety: 0,
    };
    let inputs = Inputs {
        prompts,
        encoded: encoded.clone(),
        eval: None,
        reference,
        reference_sha256: String::new(),
        tokenizer,
        // Outside the vocabulary: never drawn, so every answer has `answer_tokens` tokens.
        stop: shape.vocab_size as u32,
        pad: 0,
        policy_config: shape.clone(),
        value_config: shape.clone(),
    };
    let rewarder = TokenRewardModel {
        model: RewardModel::new(shape, 4, &plain),
        prompts: &encoded,
        pad: 0,
    };
    let mut trained = Trained {
        policy,
        value,
        policy_optim: AdamW::new(config.optim.clone()),
        value_optim: AdamW::new(config.value_optim.clone()),
    };
    let mut state = PpoState {
        iteration: 0,
        prompts: DataCursor {
            epoch: 0,
            position: 0,
        },
        kl: KlController {
            beta: config.ppo.beta,
            target: 0.0,
            horizon: 1.0,
        },
        policy_steps: 0,
        value_steps: 0,
        elapsed_s: 0.0,
        best: None,
        schedule_steps: total_steps(&config),
        reference_sha256: String::new(),
    };
    let mut timed = Vec::new();
    for it in 0..iterations + warmup {
        let indices: Vec<usize> = (it * rollout_batch..(it + 1) * rollout_batch).collect();
        let start = Instant::now();
        let (record, _) = iteration(
            &mut trained,
            &mut state,
            &inputs,
            &indices,
            &config,
            &rewarder,
            collective,
        )?;
        let seconds = start.elapsed().as_secs_f64();
        state.iteration += 1;
        if it >= warmup {
            timed.push((seconds, record));
        }
    }
    timed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (seconds, median) = &timed[timed.len() / 2];
    Ok(PpoBench {
        device: device.describe(),
        workers,
        rollout_batch,
        mini_batch,
        prompt_tokens,
        answer_tokens,
        seconds_per_iteration: *seconds,
        prompts_per_s: rollout_batch as f64 / seconds,
        generation_s: median.generation_s,
        no_grad_s: median.scoring_s + median.no_grad_s,
        update_s: median.update_s,
        peak_rss_gib: peak_rss_gib(),
    })
}
