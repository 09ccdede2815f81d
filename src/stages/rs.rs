//! Rejection-sampling fine-tuning (Llama 2 sec. 3.2.3), `kiln rs`. Each round:
//!
//! 1. sample K answers per prompt from the current policy (temperature T, top-p 1);
//! 2. score each with the combined reward ([`crate::infer::combined_reward`]): the safety
//!    model on safety prompts and on answers it finds unsafe, the helpfulness model otherwise;
//! 3. keep each prompt's best finished answer; the pool keeps, per prompt, the best answers
//!    of every round so far (`pool = "all"`, the paper's fix for forgetting), re-scored with
//!    the reward models in use now, and trains on the best of them (`latest`: this round's);
//! 4. fine-tune the policy on the pool with the SFT recipe (answer-only loss, packing).
//!
//! ```text
//! OUT/config.toml          the run's configuration (what --resume reads)
//! OUT/rounds.jsonl         one summary per finished round (`kiln plot OUT` draws it)
//! OUT/round-N/samples.jsonl  every answer: scores, branch, finish reason, tokens, log-probs
//! OUT/round-N/pool.jsonl   the pool's answers, re-scored, `selected` on the one trained
//! OUT/round-N/train.jsonl  the selected answers as SFT dialogues
//! OUT/round-N/             the round's fine-tuning run (config.toml, metrics.jsonl,
//!                          checkpoints/): the policy of round N
//! OUT/round-N/summary.json the round's metrics
//! ```
//!
//! Exact resume: samples are appended one generation batch at a time, each batch drawn by a
//! generator seeded from (seed, round, batch), so a killed run redoes only its unfinished
//! batch, bit for bit; the pool is written once, atomically; fine-tuning resumes from the
//! round's checkpoints like any stage.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use burn::tensor::Device;
use rand::SeedableRng;
use rand::seq::index;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{self, ModelConfig, OptimConfig, StageConfig, TrainConfig};
use crate::data::chat::{self, ChatTemplate, Message, Role, Turns};
use crate::data::tokenizer::Tokenizer;
use crate::infer::combined_reward::{
    self, Answer, Branch, CombinedReward, DEFAULT_SAFETY_THRESHOLD, RewardModels,
};
use crate::infer::generate::{self, FinishReason, SamplingParams};
use crate::interop::checkpoint;
use crate::interop::convert::{self, LoadedModel};
use crate::model::Llama;
use crate::stages::sft::{self, Sft, SftConfig, SftDataConfig};
use std::sync::atomic::Ordering;

use crate::train::collective::{Collective, map_shared};
use crate::train::progress::Progress;
use crate::train::run_dir::INTERRUPTED;
use crate::train::stage::{self, Launch, TrainingConfig};

pub const SAMPLES_FILE: &str = "samples.jsonl";
pub const POOL_FILE: &str = "pool.jsonl";
pub const TRAIN_FILE: &str = "train.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
pub const ROUNDS_FILE: &str = "rounds.jsonl";

/// Which answers the pool keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Per prompt, the best answer of every round so far (the paper's choice).
    All,
    /// Only the latest round's best answers (the ablation that forgot).
    Latest,
}

/// Where each round's fine-tuning starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinetuneFrom {
    /// The previous round's policy (the first round: `--init`).
    Previous,
    /// `--init` every round.
    Init,
}

/// How rejection sampling samples, scores and pools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RsSection {
    /// JSONL prompts: `{"prompt": "..." | [messages], "safety": bool}` (or `"messages"`).
    pub prompts: Vec<PathBuf>,
    /// The policy to start from (`--init`).
    pub init: PathBuf,
    /// The helpfulness and safety reward models (`--rm-helpful`, `--rm-safety`).
    pub rm_helpful: PathBuf,
    pub rm_safety: PathBuf,
    /// Rounds of sampling and fine-tuning.
    pub iterations: usize,
    /// Prompts drawn each round (0: all of them).
    pub prompts_per_round: usize,
    /// Answers sampled per prompt.
    pub k: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_answer_tokens: usize,
    /// Prompts per generation batch (each with its K answers): the unit of resume.
    pub batch_prompts: usize,
    pub pool: PoolMode,
    /// Select answers that did not end with the stop token (cut at `max_answer_tokens` or the
    /// context); they then train without their end marker.
    pub keep_unfinished: bool,
    /// R_s below this (sigmoid scale) hands the decision to the safety model.
    pub safety_threshold: f64,
    pub finetune_from: FinetuneFrom,
    pub seed: u64,
}

/// A rejection-sampling run: `[rs]`, and the SFT recipe's sections for the fine-tuning of
/// each round (`[data]` may name SFT files to mix into every round; the pool comes first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RsConfig {
    pub model: ModelConfig,
    pub data: SftDataConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub rs: RsSection,
}

impl Default for RsConfig {
    fn default() -> Self {
        let sft = SftConfig::default();
        Self {
            model: sft.model,
            data: sft.data,
            optim: sft.optim,
            train: sft.train,
            rs: RsSection {
                prompts: Vec::new(),
                init: PathBuf::new(),
                rm_helpful: PathBuf::new(),
                rm_safety: PathBuf::new(),
                iterations: 3,
                prompts_per_round: 0,
                k: 8,
                temperature: 1.0,
                top_p: 1.0,
                max_answer_tokens: 128,
                batch_prompts: 8,
                pool: PoolMode::All,
                keep_unfinished: false,
                safety_threshold: DEFAULT_SAFETY_THRESHOLD,
                finetune_from: FinetuneFrom::Previous,
                seed: 0,
            },
        }
    }
}

crate::training_config!(RsConfig);

impl StageConfig for RsConfig {
    fn validate(&self) -> Result<()> {
        let r = &self.rs;
        if r.prompts.is_empty() {
            bail!("rs.prompts must name at least one JSONL prompt file");
        }
        if r.init.as_os_str().is_empty() {
            bail!("--init is required: the policy to start from (rs.init)");
        }
        if r.rm_helpful.as_os_str().is_empty() || r.rm_safety.as_os_str().is_empty() {
            bail!(
                "--rm-helpful and --rm-safety are required: the two reward models (rs.rm_helpful, rs.rm_safety)"
            );
        }
        if r.k == 0 {
            bail!("rs.k must be at least 1 (answers sampled per prompt)");
        }
        if r.iterations == 0 {
            bail!("rs.iterations must be at least 1");
        }
        if r.batch_prompts == 0 || r.max_answer_tokens == 0 {
            bail!("rs.batch_prompts and rs.max_answer_tokens must be at least 1");
        }
        if !(r.temperature > 0.0) {
            bail!("rs.temperature must be positive (greedy decoding would give K equal answers)");
        }
        if !(r.top_p > 0.0 && r.top_p <= 1.0) {
            bail!("rs.top_p must be in (0, 1]");
        }
        if !(r.safety_threshold > 0.0 && r.safety_threshold < 1.0) {
            bail!("rs.safety_threshold must be in (0, 1)");
        }
        self.data.validate()?;
        self.optim.validate()?;
        self.train.validate()
    }

    fn known_keys() -> toml::Table {
        let mut known = toml::Table::try_from(Self::default()).expect("serialises");
        known.insert("model".into(), SftConfig::known_keys()["model"].clone());
        known
    }
}

impl RsConfig {
    /// The SFT run of a round: the pool's selected answers (`train`), then the configured
    /// SFT files.
    pub fn sft(&self, train: &Path) -> SftConfig {
        SftConfig::on_samples(self, &self.data, train)
    }

    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.rs.temperature,
            top_p: self.rs.top_p,
            min_p: 0.0,
            max_tokens: self.rs.max_answer_tokens,
        }
    }
}

/// The prompts of a run, read and checked.
pub struct Prompts {
    pub prompts: Vec<Turns>,
    pub safety: Vec<bool>,
    /// `FILE:LINE` of each prompt.
    pub sources: Vec<String>,
    /// Lines without a `safety` field (taken as false).
    pub missing_safety: usize,
}

impl Prompts {
    /// Reads JSONL prompt files: `{"prompt" | "messages", "safety"}`. A malformed line or an
    /// empty prompt is an error naming the file and line.
    pub fn read(paths: &[PathBuf]) -> Result<Self> {
        let mut out = Prompts {
            prompts: Vec::new(),
            safety: Vec::new(),
            sources: Vec::new(),
            missing_safety: 0,
        };
        for path in paths {
            let read = chat::read_jsonl(path, false, parse_prompt_line)?;
            if read.records.is_empty() {
                bail!("{}: no prompts", path.display());
            }
            for ((prompt, safety), line) in read.records.into_iter().zip(read.lines) {
                out.missing_safety += safety.is_none() as usize;
                out.prompts.push(prompt);
                out.safety.push(safety.unwrap_or(false));
                out.sources.push(format!("{}:{line}", path.display()));
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// `N prompts (S safety)`, and how many lines had no `safety` field, for the start of a
    /// run.
    pub fn describe(&self) -> String {
        let missing = match self.missing_safety {
            0 => String::new(),
            n => format!("; {n} without a `safety` field, taken as false"),
        };
        let safety = self.safety.iter().filter(|&&s| s).count();
        format!("{} prompts ({safety} safety{missing})", self.len())
    }

    /// The dialogue the policy answers.
    pub fn messages(&self, i: usize) -> Vec<Message> {
        self.prompts[i].clone().into_messages(Role::User)
    }
}

/// One prompt line: the prompt, and its `safety` flag if given.
fn parse_prompt_line(line: &str) -> Result<(Turns, Option<bool>)> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| anyhow!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(record) = value else {
        bail!("not a JSON object (expected {{\"prompt\", \"safety\"}})");
    };
    let prompt = match (record.get("prompt"), record.get("messages")) {
        (Some(p), None) | (None, Some(p)) => serde_json::from_value::<Turns>(p.clone())
            .map_err(|_| anyhow!("`prompt` must be a string or a message list"))?,
        (Some(_), Some(_)) => bail!("give `prompt` or `messages`, not both"),
        (None, None) => bail!("missing field `prompt` (or `messages`)"),
    };
    let safety = match record.get("safety") {
        None => None,
        Some(serde_json::Value::Bool(b)) => Some(*b),
        Some(other) => bail!("`safety` must be true or false, not {other}"),
    };
    let messages = prompt.clone().into_messages(Role::User);
    if messages.iter().any(|m| m.content.trim().is_empty()) {
        bail!("empty prompt");
    }
    chat::validate_dialogue(&messages, false).map_err(|e| anyhow!("prompt: {e}"))?;
    Ok((prompt, safety))
}

/// One sampled answer, as `samples.jsonl` stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub round: usize,
    /// The generation batch that drew it (the unit of resume).
    pub batch: usize,
    /// Index of the prompt in the run's prompt files (in order).
    pub prompt_index: usize,
    /// Which of the prompt's K answers.
    pub k: usize,
    pub prompt: Turns,
    pub safety: bool,
    pub answer: String,
    pub finish: FinishReason,
    #[serde(flatten)]
    pub score: CombinedReward,
    pub temperature: f64,
    pub top_p: f64,
    /// Seed of the generator that drew the batch: with the batch's prompts it gives the
    /// same answers again.
    pub seed: u64,
    /// The answer's tokens (the stop token excluded) and their log-probabilities under the
    /// policy (temperature 1), the stop token's last when the answer finished.
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// This sample's share of its batch's sampling and scoring time, in seconds.
    pub sample_s: f64,
    pub score_s: f64,
}

impl SampleRecord {
    pub fn finished(&self) -> bool {
        self.finish == FinishReason::Eos
    }
}

/// One answer of the pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolEntry {
    pub prompt_index: usize,
    pub prompt: Turns,
    pub safety: bool,
    pub answer: String,
    /// Ended with the stop token (only `keep_unfinished` pools hold unfinished answers).
    pub complete: bool,
    /// The round that sampled it.
    pub round: usize,
    /// Under the reward models of the pool's round.
    #[serde(flatten)]
    pub score: CombinedReward,
    /// The prompt's best answer: the one trained on.
    pub selected: bool,
}

impl PoolEntry {
    fn from_sample(s: &SampleRecord) -> Self {
        Self {
            prompt_index: s.prompt_index,
            prompt: s.prompt.clone(),
            safety: s.safety,
            answer: s.answer.clone(),
            complete: s.finished(),
            round: s.round,
            score: s.score,
            selected: false,
        }
    }

    /// The SFT dialogue of this answer (an unfinished one trains without its end marker).
    pub fn dialogue(&self) -> Vec<Message> {
        combined_reward::dialogue(&self.prompt, &self.as_answer())
    }

    fn as_answer(&self) -> Answer {
        Answer {
            text: self.answer.clone(),
            complete: self.complete,
        }
    }
}

/// The best of one prompt's answers: the highest combined reward among the finished ones
/// (any with `keep_unfinished`); the first of equals. `None` if none qualifies.
pub fn best_of(samples: &[SampleRecord], keep_unfinished: bool) -> Option<&SampleRecord> {
    samples
        .iter()
        .filter(|s| keep_unfinished || s.finished())
        .fold(None, |best: Option<&SampleRecord>, s| match best {
            Some(b) if b.score.reward >= s.score.reward => Some(b),
            _ => Some(s),
        })
}

/// The pool of round `round`: this round's best answers, and with [`PoolMode::All`] the
/// previous pool's answers (every round's best so far, an answer kept once), which `rescore`
/// scores again with the reward models in use now. Per prompt the highest reward is
/// `selected` (of equals, the newest). Sorted by prompt, then round.
pub fn build_pool(
    previous: Vec<PoolEntry>,
    round_best: Vec<PoolEntry>,
    mode: PoolMode,
    rescore: &mut dyn FnMut(&mut [PoolEntry]) -> Result<()>,
) -> Result<Vec<PoolEntry>> {
    let mut entries = match mode {
        PoolMode::Latest => Vec::new(),
        PoolMode::All => previous,
    };
    rescore(&mut entries)?;
    for new in round_best {
        entries.retain(|e| {
            !(e.prompt_index == new.prompt_index
                && e.answer == new.answer
                && e.complete == new.complete)
        });
        entries.push(new);
    }
    entries.sort_by_key(|e| (e.prompt_index, e.round));
    for e in entries.iter_mut() {
        e.selected = false;
    }
    let mut best: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        match best.get(&e.prompt_index) {
            // Later entries are newer: they win ties.
            Some(&b) if entries[b].score.reward > e.score.reward => {}
            _ => {
                best.insert(e.prompt_index, i);
            }
        }
    }
    for &i in best.values() {
        entries[i].selected = true;
    }
    Ok(entries)
}

/// A round's metrics, as `round-N/summary.json` and `rounds.jsonl` store them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: usize,
    pub prompts: usize,
    pub samples: usize,
    pub k: usize,
    pub temperature: f64,
    /// Mean combined reward of every sample.
    pub reward_mean: f64,
    /// Over prompts, the mean of each prompt's median and of its maximum over its K answers
    /// (finished or not), and their gap: what rejection sampling harvests.
    pub reward_median: f64,
    pub reward_max: f64,
    pub best_minus_median: f64,
    /// Mean reward of the answers this round selected (finished ones, unless
    /// `keep_unfinished`).
    pub selected_reward: f64,
    /// Share of prompts whose selected answer the safety model scored (safety prompt or
    /// R_s below the threshold).
    pub safety_branch_share: f64,
    /// Samples per finish reason (`eos`, `length`, `context`).
    pub finish: BTreeMap<String, usize>,
    /// Prompts none of whose answers could be selected.
    pub prompts_without_answer: usize,
    /// Answers trained on (one per prompt in the pool), and how many of them come from an
    /// earlier round.
    pub pool_size: usize,
    pub pool_from_earlier_rounds: usize,
    /// Mean reward of the trained answers.
    pub pool_reward: f64,
    /// Answers sampled and scored per second.
    pub samples_per_s: f64,
    pub sampling_s: f64,
    pub scoring_s: f64,
    pub training_s: f64,
    pub train_steps: u64,
    pub final_val_loss: Option<f64>,
    pub checkpoint: PathBuf,
}

/// Where a run ended.
pub struct RsSummary {
    pub rounds: Vec<RoundSummary>,
    /// Stopped by Ctrl-C: during sampling after a whole batch, during fine-tuning with a
    /// checkpoint.
    pub interrupted: bool,
}

/// A 64-bit mix (SplitMix64's finaliser) of the run seed and a position.
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of generation batch `batch` of round `round`.
pub fn batch_seed(seed: u64, round: usize, batch: usize) -> u64 {
    mix(seed, round as u64 + 1, batch as u64 + 1)
}

/// The prompts of round `round`: all, or `per_round` of them drawn without replacement.
pub fn round_prompts(total: usize, per_round: usize, seed: u64, round: usize) -> Vec<usize> {
    if per_round == 0 || per_round >= total {
        return (0..total).collect();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, round as u64 + 1, 0));
    let mut picked = index::sample(&mut rng, total, per_round).into_vec();
    picked.sort_unstable();
    picked
}

/// The policy: a chat model that samples answers.
pub struct Policy {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

impl Policy {
    pub fn new(loaded: LoadedModel, template: ChatTemplate) -> Result<Self> {
        template.check(&loaded.tokenizer)?;
        Ok(Self {
            model: loaded.model,
            tokenizer: loaded.tokenizer,
            template,
        })
    }

    /// `k` answers to each prompt (token ids), drawn with a generator seeded by `seed`:
    /// `result[p][j]` is answer `j` of prompt `p`, with its text (decoded, trimmed).
    pub fn sample(
        &self,
        prompts: &[Vec<u32>],
        k: usize,
        params: &SamplingParams,
        seed: u64,
    ) -> Result<Vec<Vec<(String, generate::Generated)>>> {
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), k))
            .collect();
        let stop = self.template.stop_token(&self.tokenizer)?;
        let pad = self.tokenizer.pad_id.unwrap_or(self.tokenizer.eos_id);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let generated = generate::generate_with(
            &self.model,
            &rows,
            params,
            stop,
            pad,
            &mut rng,
            &mut |_, _| ControlFlow::Continue(()),
        )?;
        let mut out: Vec<Vec<(String, generate::Generated)>> = Vec::with_capacity(prompts.len());
        for (i, g) in generated.into_iter().enumerate() {
            if i % k == 0 {
                out.push(Vec::with_capacity(k));
            }
            let text = self.tokenizer.decode(&g.tokens)?.trim().to_string();
            out.last_mut().expect("a prompt").push((text, g));
        }
        Ok(out)
    }
}

/// What the reward models read of sampled answers: the text, and whether it finished.
fn as_answers(drawn: &[Vec<(String, generate::Generated)>]) -> Vec<Vec<Answer>> {
    drawn
        .iter()
        .map(|group| {
            group
                .iter()
                .map(|(text, g)| Answer {
                    text: text.clone(),
                    complete: g.finish == FinishReason::Eos,
                })
                .collect()
        })
        .collect()
}

/// Token ids of every prompt as the policy reads it. A prompt that leaves the policy no room
/// to answer, or that with `max_answer` tokens of answer would not fit a reward model's
/// context (when `rms` are given), is an error naming its file and line.
pub fn encode_prompts(
    prompts: &Prompts,
    policy: &Policy,
    rms: Option<&RewardModels>,
    max_answer: usize,
) -> Result<Vec<Vec<u32>>> {
    let context = policy.model.config.max_seq_len;
    (0..prompts.len())
        .map(|i| {
            let ids = policy
                .template
                .encode_prompt(&policy.tokenizer, &prompts.messages(i))?;
            if ids.len() >= context {
                bail!(
                    "{}: the prompt has {} tokens, which leaves no room to answer in the policy's context of {context}",
                    prompts.sources[i],
                    ids.len()
                );
            }
            let Some(rms) = rms else { return Ok(ids) };
            let rm_context = rms.context();
            let rm_template = rms.helpful.config.data.template;
            let rm_ids = rm_template.encode_prompt(&rms.helpful.tokenizer, &prompts.messages(i))?;
            // The answer's tokens, its end marker and the template's closing token.
            if rm_ids.len() + max_answer + 2 > rm_context {
                bail!(
                    "{}: the prompt has {} tokens; with {max_answer} answer tokens at most the answer would not fit the reward models' context of {rm_context}",
                    prompts.sources[i],
                    rm_ids.len()
                );
            }
            Ok(ids)
        })
        .collect()
}

/// What sampling reads (prompts, policy, both reward models), loaded and checked against
/// each other: one tokenizer, every prompt fitting both contexts with an answer.
pub struct Sampling {
    pub prompts: Prompts,
    /// The prompts as the policy reads them.
    pub encoded: Vec<Vec<u32>>,
    pub policy: Policy,
    /// The policy's shape.
    pub policy_config: ModelConfig,
    pub rms: RewardModels,
}

/// Where [`Sampling::load`] reads from.
pub struct SamplingSources<'a> {
    pub prompts: &'a [PathBuf],
    pub policy: &'a Path,
    /// The policy's chat template; `None`: the model's own.
    pub template: Option<ChatTemplate>,
    pub kernels: crate::kernels::Kernels,
    pub rm_helpful: &'a Path,
    pub rm_safety: &'a Path,
    pub safety_threshold: f64,
    pub batch_prompts: usize,
    pub max_answer_tokens: usize,
}

impl Sampling {
    pub fn load(from: &SamplingSources, device: &Device) -> Result<Self> {
        let prompts = Prompts::read(from.prompts)?;
        let chat_model = convert::load_model(from.policy, device, from.kernels)?;
        let policy_config = chat_model.loaded.model_config.clone();
        let rms = RewardModels::load(
            from.rm_helpful,
            from.rm_safety,
            from.safety_threshold,
            from.batch_prompts,
            device,
        )?;
        rms.check_tokenizer(&chat_model.loaded.tokenizer, from.policy)?;
        let template = from.template.unwrap_or(chat_model.template);
        let policy = Policy::new(chat_model.loaded, template)?;
        let encoded = encode_prompts(&prompts, &policy, Some(&rms), from.max_answer_tokens)?;
        Ok(Self {
            prompts,
            encoded,
            policy,
            policy_config,
            rms,
        })
    }
}

/// Everything a run reads, checked before anything is written: what sampling reads, and
/// the SFT files mixed into every round (a bad line stops the run before the slow sampling).
fn read_inputs(config: &RsConfig, device: &Device) -> Result<Sampling> {
    let r = &config.rs;
    let sampling = Sampling::load(
        &SamplingSources {
            prompts: &r.prompts,
            policy: &r.init,
            template: Some(config.data.template),
            kernels: config.model.kernels,
            rm_helpful: &r.rm_helpful,
            rm_safety: &r.rm_safety,
            safety_threshold: r.safety_threshold,
            batch_prompts: r.batch_prompts,
            max_answer_tokens: r.max_answer_tokens,
        },
        device,
    )?;
    for paths in [&config.data.train, &config.data.val] {
        if !paths.is_empty() {
            sft::read_dialogues(paths, config.data.skip_bad_lines)?;
        }
    }
    Ok(sampling)
}

fn round_dir(out: &Path, round: usize) -> PathBuf {
    out.join(format!("round-{round}"))
}

/// The policy that samples round `round` (and whose weights its fine-tuning starts from,
/// unless `rs.finetune_from = "init"`): `--init`, or the previous round's run.
fn policy_path(config: &RsConfig, out: &Path, round: usize) -> PathBuf {
    if round == 1 {
        config.rs.init.clone()
    } else {
        round_dir(out, round - 1)
    }
}

/// Runs (or resumes) rejection-sampling fine-tuning.
pub fn run(launch: &Launch) -> Result<RsSummary> {
    let out = &launch.out_dir;
    let config_path = out.join(crate::train::run_dir::CONFIG_FILE);
    let device = launch.device.device.clone();
    // `--init` is the config's `rs.init`, so a resumed run needs nothing but `--out`.
    let mut overrides = launch.overrides.clone();
    if let Some(init) = &launch.init {
        overrides.push(format!("rs.init={}", toml_string(init)));
    }
    let config = if launch.resume {
        if !config_path.is_file() {
            bail!(
                "--resume: {} holds no rejection-sampling run ({} is missing)",
                out.display(),
                config_path.display()
            );
        }
        let saved = std::fs::read_to_string(&config_path)
            .map_err(|e| anyhow!("cannot read {}: {e}", config_path.display()))?;
        config::load_resumed::<RsConfig>(
            &saved,
            &config_path,
            "rs",
            launch.config.as_ref(),
            &overrides,
        )?
    } else {
        crate::train::run_dir::refuse_config_in_place(&config_path, launch.config.as_ref())?;
        let taken = config_path.exists()
            || std::fs::read_dir(out)
                .map(|entries| {
                    entries
                        .flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("round-"))
                })
                .unwrap_or(false);
        if taken {
            bail!(
                "{} already holds a run: pass --resume to continue it, or choose another --out",
                out.display()
            );
        }
        config::load_from::<RsConfig>(launch.config.as_ref(), &overrides)?
    };
    let inputs = read_inputs(&config, &device)?;
    let mut config = config;
    let kernels = config.model.kernels;
    config.model = inputs.policy_config.clone();
    config.model.kernels = kernels;
    // Data-parallel workers split each round's sampling batches and its fine-tuning steps;
    // worker 0 writes the run, once every worker has checked it.
    let collective = &*launch.collective;
    let writer = collective.is_writer();
    collective.barrier()?;
    if writer {
        std::fs::create_dir_all(out)
            .map_err(|e| anyhow!("cannot create output directory {}: {e}", out.display()))?;
        checkpoint::write_atomic(&config_path, config.to_toml().as_bytes())?;
    }
    collective.say(&format!(
        "rejection sampling: {}, K = {}, T = {}, {} round(s), pool = {} | device: {}",
        inputs.prompts.describe(),
        config.rs.k,
        config.rs.temperature,
        config.rs.iterations,
        crate::config::name_of(&config.rs.pool),
        launch.device.describe()
    ));

    let mut rounds = Vec::new();
    let mut init = Some(inputs.policy);
    for round in 1..=config.rs.iterations {
        let dir = round_dir(out, round);
        let summary_path = dir.join(SUMMARY_FILE);
        if summary_path.is_file() {
            let text = std::fs::read_to_string(&summary_path)?;
            rounds.push(
                serde_json::from_str(&text)
                    .map_err(|e| anyhow!("{}: {e}", summary_path.display()))?,
            );
            continue;
        }
        let outcome = run_round(
            round,
            &config,
            out,
            &inputs.prompts,
            &inputs.encoded,
            &inputs.rms,
            init.take(),
            launch,
        )?;
        match outcome {
            Some(summary) => {
                let text = serde_json::to_string_pretty(&summary)? + "\n";
                rounds.push(summary);
                if writer {
                    checkpoint::write_atomic(&summary_path, text.as_bytes())?;
                    write_rounds(out, &rounds)?;
                }
            }
            None => {
                return Ok(RsSummary {
                    rounds,
                    interrupted: true,
                });
            }
        }
    }
    if writer {
        write_rounds(out, &rounds)?;
    }
    Ok(RsSummary {
        rounds,
        interrupted: false,
    })
}

fn toml_string(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

fn write_rounds(out: &Path, rounds: &[RoundSummary]) -> Result<()> {
    checkpoint::write_jsonl_atomic(&out.join(ROUNDS_FILE), rounds)
}

/// One round: sampling (resumed from `samples.jsonl`), the pool, fine-tuning. `None` when
/// Ctrl-C interrupted it (its work so far saved).
#[allow(clippy::too_many_arguments)]
fn run_round(
    round: usize,
    config: &RsConfig,
    out: &Path,
    prompts: &Prompts,
    encoded: &[Vec<u32>],
    rms: &RewardModels,
    init: Option<Policy>,
    launch: &Launch,
) -> Result<Option<RoundSummary>> {
    let r = &config.rs;
    let collective = &*launch.collective;
    let writer = collective.is_writer();
    let dir = round_dir(out, round);
    if writer {
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    let device = launch.device.device.clone();
    let pool_path = dir.join(POOL_FILE);
    let chosen = round_prompts(prompts.len(), r.prompts_per_round, r.seed, round);
    let pooled = pool_path.is_file();
    // Every worker has seen where the round stands before worker 0 changes it.
    collective.barrier()?;
    let (samples, pool) = if pooled {
        (
            read_samples(&dir.join(SAMPLES_FILE), &chosen, r, writer)?.0,
            read_pool(&pool_path)?,
        )
    } else {
        let policy = match init {
            Some(init) if round == 1 => init,
            _ => Policy::new(
                convert::load_model(
                    &policy_path(config, out, round),
                    &device,
                    config.model.kernels,
                )?
                .loaded,
                config.data.template,
            )?,
        };
        let Some(samples) = sample_round(
            round, config, &dir, prompts, encoded, &chosen, &policy, rms, collective,
        )?
        else {
            return Ok(None);
        };
        // Worker 0 pools and writes the fine-tuning data; the others read the pool it wrote.
        let written = match writer {
            true => Some(pool_round(round, config, out, prompts, rms, &samples)?),
            false => None,
        };
        collective.barrier()?;
        let pool = match written {
            Some(pool) => pool,
            None => read_pool(&pool_path)?,
        };
        (samples, pool)
    };
    finetune(round, config, out, &chosen, samples, pool, launch)
}

/// The round's pool (its best answers, with the earlier rounds' under `pool = "all"`), written
/// with the fine-tuning data it selects: `train.jsonl`, then `pool.jsonl` last.
fn pool_round(
    round: usize,
    config: &RsConfig,
    out: &Path,
    prompts: &Prompts,
    rms: &RewardModels,
    samples: &[SampleRecord],
) -> Result<Vec<PoolEntry>> {
    let r = &config.rs;
    let dir = round_dir(out, round);
    let (pool_path, train_path) = (dir.join(POOL_FILE), dir.join(TRAIN_FILE));
    let round_best: Vec<PoolEntry> = samples
        .chunk_by(|a, b| a.prompt_index == b.prompt_index)
        .filter_map(|answers| best_of(answers, r.keep_unfinished))
        .map(PoolEntry::from_sample)
        .collect();
    let previous = match (round, r.pool) {
        (1, _) | (_, PoolMode::Latest) => Vec::new(),
        _ => read_pool(&round_dir(out, round - 1).join(POOL_FILE))?,
    };
    let pool = build_pool(previous, round_best, r.pool, &mut |entries| {
        rescore(entries, rms, prompts)
    })?;
    let train: Vec<String> = pool
        .iter()
        .filter(|e| e.selected)
        .map(|e| serde_json::json!({ "messages": e.dialogue() }).to_string())
        .collect();
    if train.is_empty() {
        bail!(
            "round {round}: no answer to train on (none finished: raise rs.max_answer_tokens, or set rs.keep_unfinished = true)"
        );
    }
    checkpoint::write_atomic(&train_path, (train.join("\n") + "\n").as_bytes())?;
    let lines: Vec<String> = pool
        .iter()
        .map(serde_json::to_string)
        .collect::<std::result::Result<_, _>>()?;
    // Written last: its presence says sampling and pooling are done.
    checkpoint::write_atomic(&pool_path, (lines.join("\n") + "\n").as_bytes())?;
    Ok(pool)
}

/// Fine-tunes round `round`'s policy on its pool (the round's directory is its SFT run), and
/// sums the round up; `None` if interrupted.
fn finetune(
    round: usize,
    config: &RsConfig,
    out: &Path,
    chosen: &[usize],
    samples: Vec<SampleRecord>,
    pool: Vec<PoolEntry>,
    launch: &Launch,
) -> Result<Option<RoundSummary>> {
    let r = &config.rs;
    let dir = round_dir(out, round);
    let train_path = dir.join(TRAIN_FILE);
    let writer = launch.collective.is_writer();
    let resume = !checkpoint::list(&dir.join("checkpoints"))?.is_empty();
    if !resume && writer {
        // Steps logged by a run killed before its first checkpoint.
        let _ = std::fs::remove_file(dir.join("metrics.jsonl"));
    }
    let start_from = match r.finetune_from {
        FinetuneFrom::Previous => policy_path(config, out, round),
        FinetuneFrom::Init => r.init.clone(),
    };
    let round_launch = Launch {
        config: None,
        overrides: Vec::new(),
        init: (!resume).then_some(start_from),
        out_dir: dir.clone(),
        resume,
        device: launch.device.clone(),
        stop_after: launch.stop_after,
        collective: launch.collective.clone(),
    };
    let sft_config = config.sft(&train_path);
    let sft_toml = sft_config.to_toml();
    let started = stage::launch_with::<Sft>(&round_launch, Some(sft_config))?;
    let trained = sft::train(started, &round_launch, sft_toml)?;
    if trained.interrupted {
        return Ok(None);
    }
    let state: crate::train::run_dir::TrainState = serde_json::from_str(&std::fs::read_to_string(
        trained.checkpoint.join(checkpoint::STATE_FILE),
    )?)?;
    let summary = summarise(round, r, chosen, &samples, &pool, &trained, state.elapsed_s);
    if !writer {
        return Ok(Some(summary));
    }
    eprintln!(
        "round {round}: reward mean {:.3} | median {:.3} | max {:.3} (gap {:.3}) | selected {:.3} | safety branch {:.1}% | pool {} ({} from earlier rounds) | {:.1} samples/s",
        summary.reward_mean,
        summary.reward_median,
        summary.reward_max,
        summary.best_minus_median,
        summary.selected_reward,
        100.0 * summary.safety_branch_share,
        summary.pool_size,
        summary.pool_from_earlier_rounds,
        summary.samples_per_s
    );
    Ok(Some(summary))
}

/// Samples of the round's prompts `chosen`, K each, continuing `samples.jsonl`: batches of
/// `batch_prompts` prompts, each appended (and synced) once scored. `None` if Ctrl-C stopped
/// it (after a whole batch). Data-parallel workers take one batch each in turn; worker 0
/// appends them all in order, so the file is the one a single process writes.
#[allow(clippy::too_many_arguments)]
fn sample_round(
    round: usize,
    config: &RsConfig,
    dir: &Path,
    prompts: &Prompts,
    encoded: &[Vec<u32>],
    chosen: &[usize],
    policy: &Policy,
    rms: &RewardModels,
    collective: &dyn Collective,
) -> Result<Option<Vec<SampleRecord>>> {
    let r = &config.rs;
    let writer = collective.is_writer();
    let path = dir.join(SAMPLES_FILE);
    let (mut samples, done_batches) = read_samples(&path, chosen, r, writer)?;
    let mut file = match writer {
        true => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| anyhow!("cannot open {}: {e}", path.display()))?,
        ),
        false => None,
    };
    let batches: Vec<&[usize]> = chosen.chunks(r.batch_prompts).collect();
    let mut progress = Progress::shown_if(writer, || {
        Progress::counter(
            (done_batches * r.batch_prompts).min(chosen.len()) as u64,
            chosen.len() as u64,
            "prompts",
        )
    });
    if done_batches > 0 {
        progress.message(&format!(
            "round {round}: resuming sampling after {} of {} prompts",
            samples.len() / r.k,
            chosen.len()
        ));
    }
    let mut next = done_batches;
    while next < batches.len() {
        let clock = Instant::now();
        // One batch per worker, then all of them appended in order.
        let wave = next..(next + collective.world_size()).min(batches.len());
        let texts = map_shared(collective, wave.len(), |i| {
            let b = wave.start + i;
            sample_batch(round, config, prompts, encoded, b, batches[b], policy, rms)
        })?;
        let wave_text = texts.concat();
        for line in wave_text.lines() {
            samples.push(serde_json::from_str(line)?);
        }
        if let Some(file) = &mut file {
            file.write_all(wave_text.as_bytes())
                .and_then(|_| file.sync_data())
                .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
        }
        next = wave.end;
        let n = wave.map(|b| batches[b].len() * r.k).sum::<usize>() as f64;
        let rate = n / clock.elapsed().as_secs_f64().max(1e-9);
        progress.update(
            (next * r.batch_prompts).min(chosen.len()) as u64,
            &format!("round {round} | {rate:.1} samples/s"),
        );
        // Every worker stops after the same batch, whichever saw the Ctrl-C.
        if collective.any(INTERRUPTED.load(Ordering::SeqCst))? && next < batches.len() {
            progress.message(&format!(
                "interrupted: round {round}'s samples so far are saved; continue with --resume"
            ));
            return Ok(None);
        }
    }
    progress.finish();
    Ok(Some(samples))
}

/// Batch `b` of a round (`batch`, prompt indices): K answers per prompt from `policy`, scored,
/// as `samples.jsonl` lines.
#[allow(clippy::too_many_arguments)]
fn sample_batch(
    round: usize,
    config: &RsConfig,
    prompts: &Prompts,
    encoded: &[Vec<u32>],
    b: usize,
    batch: &[usize],
    policy: &Policy,
    rms: &RewardModels,
) -> Result<String> {
    let r = &config.rs;
    let seed = batch_seed(r.seed, round, b);
    let clock = Instant::now();
    let ids: Vec<Vec<u32>> = batch.iter().map(|&i| encoded[i].clone()).collect();
    let drawn = policy.sample(&ids, r.k, &config.sampling(), seed)?;
    let sample_s = clock.elapsed().as_secs_f64();
    let clock = Instant::now();
    let batch_prompts: Vec<Turns> = batch.iter().map(|&i| prompts.prompts[i].clone()).collect();
    let batch_safety: Vec<bool> = batch.iter().map(|&i| prompts.safety[i]).collect();
    let answers = as_answers(&drawn);
    let scores = rms.score(&batch_prompts, &batch_safety, &answers, &|j| {
        prompts.sources[batch[j]].clone()
    })?;
    let score_s = clock.elapsed().as_secs_f64();
    let n = (batch.len() * r.k) as f64;
    let mut text = String::new();
    for (j, (group, group_scores)) in drawn.into_iter().zip(scores).enumerate() {
        for (k, ((answer, g), score)) in group.into_iter().zip(group_scores).enumerate() {
            let record = SampleRecord {
                round,
                batch: b,
                prompt_index: batch[j],
                k,
                prompt: batch_prompts[j].clone(),
                safety: batch_safety[j],
                answer,
                finish: g.finish,
                score,
                temperature: r.temperature,
                top_p: r.top_p,
                seed,
                tokens: g.tokens,
                logprobs: g.logprobs,
                sample_s: sample_s / n,
                score_s: score_s / n,
            };
            text.push_str(&serde_json::to_string(&record)?);
            text.push('\n');
        }
    }
    Ok(text)
}

/// The complete batches of `samples.jsonl` (in order, each with all its answers), and how
/// many there are. A torn or partial batch at the end (a killed run) is cut off the file.
fn read_samples(
    path: &Path,
    chosen: &[usize],
    r: &RsSection,
    truncate: bool,
) -> Result<(Vec<SampleRecord>, usize)> {
    if !path.exists() {
        return Ok((Vec::new(), 0));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let batches: Vec<&[usize]> = chosen.chunks(r.batch_prompts).collect();
    let mut samples = Vec::new();
    let (mut kept_bytes, mut done) = (0usize, 0usize);
    let mut pending: Vec<SampleRecord> = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        offset += line.len();
        if !line.ends_with('\n') {
            break;
        }
        let Ok(record) = serde_json::from_str::<SampleRecord>(line) else {
            break;
        };
        let Some(batch) = batches.get(done) else {
            break;
        };
        let expected_prompt = batch[pending.len() / r.k];
        if record.batch != done || record.prompt_index != expected_prompt {
            bail!(
                "{}: holds samples of other prompts than this run draws (line {}); it is not this run's",
                path.display(),
                samples.len() + pending.len() + 1
            );
        }
        pending.push(record);
        if pending.len() == batch.len() * r.k {
            samples.append(&mut pending);
            kept_bytes = offset;
            done += 1;
        }
    }
    if kept_bytes < text.len() && truncate {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| anyhow!("cannot open {}: {e}", path.display()))?;
        file.set_len(kept_bytes as u64)
            .map_err(|e| anyhow!("cannot truncate {}: {e}", path.display()))?;
    }
    Ok((samples, done))
}

fn read_pool(path: &Path) -> Result<Vec<PoolEntry>> {
    Ok(chat::read_jsonl(path, false, |line| {
        serde_json::from_str::<PoolEntry>(line).map_err(|e| anyhow!("{e}"))
    })?
    .records)
}

/// Scores `entries` again with `rms`.
fn rescore(entries: &mut [PoolEntry], rms: &RewardModels, prompts: &Prompts) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut by_prompt: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        by_prompt.entry(e.prompt_index).or_default().push(i);
    }
    let groups: Vec<(usize, Vec<usize>)> = by_prompt.into_iter().collect();
    let turns: Vec<Turns> = groups
        .iter()
        .map(|(_, m)| entries[m[0]].prompt.clone())
        .collect();
    let safety: Vec<bool> = groups.iter().map(|(_, m)| entries[m[0]].safety).collect();
    let answers: Vec<Vec<Answer>> = groups
        .iter()
        .map(|(_, members)| members.iter().map(|&i| entries[i].as_answer()).collect())
        .collect();
    let scores = rms.score(&turns, &safety, &answers, &|g| {
        let index = groups[g].0;
        prompts
            .sources
            .get(index)
            .cloned()
            .unwrap_or_else(|| format!("prompt {index}"))
    })?;
    for ((_, members), group_scores) in groups.iter().zip(scores) {
        for (&i, score) in members.iter().zip(group_scores) {
            entries[i].score = score;
        }
    }
    Ok(())
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn summarise(
    round: usize,
    r: &RsSection,
    chosen: &[usize],
    samples: &[SampleRecord],
    pool: &[PoolEntry],
    trained: &crate::train::supervised::RunSummary,
    training_s: f64,
) -> RoundSummary {
    let groups: Vec<&[SampleRecord]> = samples
        .chunk_by(|a, b| a.prompt_index == b.prompt_index)
        .collect();
    let rewards = |g: &[SampleRecord]| g.iter().map(|s| s.score.reward).collect::<Vec<f64>>();
    let medians: Vec<f64> = groups.iter().map(|g| median(&rewards(g))).collect();
    let maxima: Vec<f64> = groups
        .iter()
        .map(|g| rewards(g).into_iter().fold(f64::NEG_INFINITY, f64::max))
        .collect();
    let best: Vec<&SampleRecord> = groups
        .iter()
        .filter_map(|g| best_of(g, r.keep_unfinished))
        .collect();
    let mut finish: BTreeMap<String, usize> = BTreeMap::new();
    for s in samples {
        let name = serde_json::to_value(s.finish)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        *finish.entry(name).or_default() += 1;
    }
    let selected: Vec<&PoolEntry> = pool.iter().filter(|e| e.selected).collect();
    let sampling_s: f64 = samples.iter().map(|s| s.sample_s).sum();
    let scoring_s: f64 = samples.iter().map(|s| s.score_s).sum();
    let (reward_median, reward_max) = (mean(medians.iter().copied()), mean(maxima.iter().copied()));
    RoundSummary {
        round,
        prompts: chosen.len(),
        samples: samples.len(),
        k: r.k,
        temperature: r.temperature,
        reward_mean: mean(samples.iter().map(|s| s.score.reward)),
        reward_median,
        reward_max,
        best_minus_median: reward_max - reward_median,
        selected_reward: mean(best.iter().map(|s| s.score.reward)),
        safety_branch_share: best
            .iter()
            .filter(|s| s.score.branch == Branch::Safety)
            .count() as f64
            / chosen.len().max(1) as f64,
        finish,
        prompts_without_answer: groups.len() - best.len(),
        pool_size: selected.len(),
        pool_from_earlier_rounds: selected.iter().filter(|e| e.round < round).count(),
        pool_reward: mean(selected.iter().map(|e| e.score.reward)),
        samples_per_s: samples.len() as f64 / (sampling_s + scoring_s).max(1e-9),
        sampling_s,
        scoring_s,
        training_s,
        train_steps: trained.step,
        final_val_loss: trained.final_val_loss,
        checkpoint: trained.checkpoint.clone(),
    }
}

/// Mean max- and median-reward against K for each temperature: the paper's Figures 7 and 8
/// for one policy (`kiln rs curve`).
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    pub temperature: f64,
    pub k: usize,
    /// Over prompts, the mean of the maximum and of the median reward of the first K answers.
    pub max_reward: f64,
    pub median_reward: f64,
    /// Share of all the temperature's answers that finished (ended with the stop token).
    pub finished: f64,
}

/// Samples `max(ks)` answers per prompt at each temperature, scores them, and reads the
/// curve off the first K of each prompt's answers (an unbiased estimate of the expected
/// maximum of K draws).
#[allow(clippy::too_many_arguments)]
pub fn reward_curve(
    policy: &Policy,
    rms: &RewardModels,
    prompts: &Prompts,
    encoded: &[Vec<u32>],
    ks: &[usize],
    temperatures: &[f64],
    params: &SamplingParams,
    batch_prompts: usize,
    seed: u64,
) -> Result<Vec<CurvePoint>> {
    let k_max = *ks.iter().max().ok_or_else(|| anyhow!("no K given"))?;
    if ks.contains(&0) {
        bail!("K must be at least 1");
    }
    let mut points = Vec::new();
    let indices: Vec<usize> = (0..prompts.len()).collect();
    let mut progress = Progress::counter(0, (prompts.len() * temperatures.len()) as u64, "prompts");
    let mut done = 0u64;
    for (t_index, &temperature) in temperatures.iter().enumerate() {
        let params = SamplingParams {
            temperature,
            ..params.clone()
        };
        let mut rewards: Vec<Vec<f64>> = Vec::new();
        let (mut finished, mut total) = (0usize, 0usize);
        for (b, batch) in indices.chunks(batch_prompts.max(1)).enumerate() {
            let ids: Vec<Vec<u32>> = batch.iter().map(|&i| encoded[i].clone()).collect();
            let drawn = policy.sample(&ids, k_max, &params, batch_seed(seed, t_index, b))?;
            let answers = as_answers(&drawn);
            finished += answers.iter().flatten().filter(|a| a.complete).count();
            total += batch.len() * k_max;
            let turns: Vec<Turns> = batch.iter().map(|&i| prompts.prompts[i].clone()).collect();
            let safety: Vec<bool> = batch.iter().map(|&i| prompts.safety[i]).collect();
            let scores = rms.score(&turns, &safety, &answers, &|j| {
                prompts.sources[batch[j]].clone()
            })?;
            rewards.extend(
                scores
                    .into_iter()
                    .map(|g| g.into_iter().map(|s| s.reward).collect::<Vec<f64>>()),
            );
            done += batch.len() as u64;
            progress.update(done, &format!("T = {temperature}"));
        }
        for &k in ks {
            points.push(CurvePoint {
                temperature,
                k,
                max_reward: mean(
                    rewards
                        .iter()
                        .map(|r| r[..k].iter().copied().fold(f64::NEG_INFINITY, f64::max)),
                ),
                median_reward: mean(rewards.iter().map(|r| median(&r[..k]))),
                finished: finished as f64 / total.max(1) as f64,
            });
        }
    }
    progress.finish();
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(prompt_index: usize, k: usize, reward: f64, finish: FinishReason) -> SampleRecord {
        SampleRecord {
            round: 1,
            batch: 0,
            prompt_index,
            k,
            prompt: Turns::Text(format!("prompt {prompt_index}")),
            safety: false,
            answer: format!("answer {prompt_index}.{k}"),
            finish,
            score: CombinedReward {
                helpful: reward,
                safe: 0.9,
                reward,
                branch: Branch::Helpfulness,
                logit: 0.0,
            },
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
            tokens: Vec::new(),
            logprobs: Vec::new(),
            sample_s: 0.0,
            score_s: 0.0,
        }
    }

    fn entry(prompt_index: usize, round: usize, answer: &str, reward: f64) -> PoolEntry {
        let mut s = sample(prompt_index, 0, reward, FinishReason::Eos);
        s.round = round;
        s.answer = answer.into();
        PoolEntry::from_sample(&s)
    }

    #[test]
    fn best_of_k_takes_the_maximum_and_never_an_unfinished_answer() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        use rand::Rng;
        for _ in 0..200 {
            let k = rng.random_range(1..10);
            let answers: Vec<SampleRecord> = (0..k)
                .map(|j| {
                    let finish = if rng.random_bool(0.3) {
                        FinishReason::Length
                    } else {
                        FinishReason::Eos
                    };
                    sample(0, j, rng.random::<f64>(), finish)
                })
                .collect();
            let finished_max = answers
                .iter()
                .filter(|s| s.finished())
                .map(|s| s.score.reward)
                .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
            let best = best_of(&answers, false);
            assert_eq!(best.map(|b| b.score.reward), finished_max);
            assert!(best.is_none_or(|b| b.finished()));
            let any_max = answers
                .iter()
                .map(|s| s.score.reward)
                .fold(f64::MIN, f64::max);
            assert_eq!(best_of(&answers, true).unwrap().score.reward, any_max);
        }
        // Ties: the first.
        let tied = [
            sample(0, 0, 0.5, FinishReason::Eos),
            sample(0, 1, 0.5, FinishReason::Eos),
        ];
        assert_eq!(best_of(&tied, false).unwrap().k, 0);
    }

    #[test]
    fn the_pool_keeps_every_rounds_best_and_latest_does_not() {
        let mut same = |_: &mut [PoolEntry]| Ok(());
        // Round 1: prompt 0 answered well, prompt 1 poorly.
        let round1 = vec![entry(0, 1, "good", 0.9), entry(1, 1, "poor", 0.2)];
        let pool1 = build_pool(Vec::new(), round1, PoolMode::All, &mut same).unwrap();
        assert!(pool1.iter().all(|e| e.selected));
        // Round 2: prompt 0 worse than before, prompt 1 better, prompt 2 new.
        let round2 = vec![
            entry(0, 2, "worse", 0.5),
            entry(1, 2, "better", 0.7),
            entry(2, 2, "new", 0.4),
        ];
        let all = build_pool(pool1.clone(), round2.clone(), PoolMode::All, &mut same).unwrap();
        let selected: Vec<(usize, &str)> = all
            .iter()
            .filter(|e| e.selected)
            .map(|e| (e.prompt_index, e.answer.as_str()))
            .collect();
        assert_eq!(selected, vec![(0, "good"), (1, "better"), (2, "new")]);
        assert_eq!(all.len(), 5, "every round's best is kept");
        let latest = build_pool(pool1, round2, PoolMode::Latest, &mut same).unwrap();
        let selected: Vec<&str> = latest
            .iter()
            .filter(|e| e.selected)
            .map(|e| e.answer.as_str())
            .collect();
        assert_eq!(selected, vec!["worse", "better", "new"]);
        assert_eq!(latest.len(), 3);
    }

    #[test]
    fn rescoring_changes_which_pooled_answer_wins() {
        let previous = vec![entry(0, 1, "old", 0.9)];
        let new = vec![entry(0, 2, "new", 0.6)];
        let mut same = |_: &mut [PoolEntry]| Ok(());
        let kept = build_pool(previous.clone(), new.clone(), PoolMode::All, &mut same).unwrap();
        assert_eq!(kept.iter().find(|e| e.selected).unwrap().answer, "old");
        // New reward models like the old answer less: it is re-scored, and loses.
        let mut harsher = |entries: &mut [PoolEntry]| {
            for e in entries.iter_mut() {
                assert_eq!(e.round, 1, "only earlier rounds' answers are re-scored");
                e.score.reward = 0.3;
            }
            Ok(())
        };
        let pool = build_pool(previous, new, PoolMode::All, &mut harsher).unwrap();
        let winner = pool.iter().find(|e| e.selected).unwrap();
        assert_eq!((winner.answer.as_str(), winner.round), ("new", 2));
        assert_eq!(pool.iter().filter(|e| e.selected).count(), 1);
        // A pooled answer sampled again is kept once, as the newer sample.
        let again = build_pool(
            vec![entry(0, 1, "same", 0.5)],
            vec![entry(0, 2, "same", 0.5)],
            PoolMode::All,
            &mut same,
        )
        .unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].round, 2);
    }

    #[test]
    fn prompts_are_drawn_per_round_and_batch_seeds_differ() {
        assert_eq!(round_prompts(5, 0, 1, 1), vec![0, 1, 2, 3, 4]);
        let a = round_prompts(100, 10, 1, 1);
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a, round_prompts(100, 10, 1, 1));
        assert_ne!(a, round_prompts(100, 10, 1, 2));
        let seeds: std::collections::HashSet<u64> = (1..4)
            .flat_map(|r| (0..50).map(move |b| batch_seed(7, r, b)))
            .collect();
        assert_eq!(seeds.len(), 150);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn prompt_lines_take_prompt_or_messages_and_default_safety() {
        let (p, s) = parse_prompt_line(r#"{"prompt": "Hi"}"#).unwrap();
        assert_eq!((p, s), (Turns::Text("Hi".into()), None));
        let (_, s) = parse_prompt_line(
            r#"{"messages": [{"role": "user", "content": "Hi"}], "safety": true}"#,
        )
        .unwrap();
        assert_eq!(s, Some(true));
        for (line, error) in [
            (r#"{"prompt": "  "}"#, "empty prompt"),
            (r#"{"safety": true}"#, "missing field `prompt`"),
            (
                r#"{"prompt": "a", "safety": "yes"}"#,
                "`safety` must be true or false",
            ),
            (r#"[1]"#, "not a JSON object"),
        ] {
            let e = parse_prompt_line(line).unwrap_err().to_string();
            assert!(e.contains(error), "{line}: {e}");
        }
    }
}
