//! Llama 2's combined reward (sec. 3.2.3), used by rejection sampling and PPO: the safety
//! reward model decides when the prompt is a safety prompt or the answer looks unsafe, the
//! helpfulness reward model otherwise.
//!
//! ```text
//! R_c = R_s  if safety(p) or R_s < threshold (0.15)
//!       R_h  otherwise
//! ```
//!
//! R_s and R_h are sigmoids of the two models' scores. `logit(R_c)` is the chosen model's raw
//! score (exact, where the sigmoid of a large score rounds to 1). Whitening is PPO's.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::data::chat::{Message, Role, Turns};
use crate::data::tokenizer::Tokenizer;
use crate::infer::score::{self, LoadedRm};
use crate::model::reward::shared_prefix_scores;
use crate::stages::reward::RmKind;

/// The paper's safety threshold on the sigmoid scale (precision 0.89, recall 0.55 on its
/// safety test set).
pub const DEFAULT_SAFETY_THRESHOLD: f64 = 0.15;

/// Which reward model decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Branch {
    Safety,
    Helpfulness,
}

/// Both scores of one answer and the combined reward.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CombinedReward {
    /// R_h: sigmoid of the helpfulness model's score.
    pub helpful: f64,
    /// R_s: sigmoid of the safety model's score.
    pub safe: f64,
    /// R_c: `safe` or `helpful`, as `branch` says.
    pub reward: f64,
    pub branch: Branch,
    /// logit(R_c): the raw score of the model that decided.
    pub logit: f64,
}

impl CombinedReward {
    /// The gate on raw scores (the reward models' outputs).
    pub fn from_scores(
        helpful_score: f32,
        safety_score: f32,
        safety_prompt: bool,
        threshold: f64,
    ) -> Self {
        let (helpful, safe) = (sigmoid(helpful_score), sigmoid(safety_score));
        let branch = gate(safe, safety_prompt, threshold);
        let (reward, logit) = match branch {
            Branch::Safety => (safe, safety_score as f64),
            Branch::Helpfulness => (helpful, helpful_score as f64),
        };
        Self {
            helpful,
            safe,
            reward,
            branch,
            logit,
        }
    }

    /// The helpfulness model's score for every answer, the safety score only reported.
    pub fn helpfulness_only(helpful_score: f32, safety_score: f32) -> Self {
        Self {
            helpful: sigmoid(helpful_score),
            safe: sigmoid(safety_score),
            reward: sigmoid(helpful_score),
            branch: Branch::Helpfulness,
            logit: helpful_score as f64,
        }
    }
}

/// The sigmoid of a raw score, in f64 (a large score stays below 1 longer than in f32).
fn sigmoid(x: f32) -> f64 {
    1.0 / (1.0 + (-(x as f64)).exp())
}

/// Which model decides for an answer whose safety reward is `safe` (sigmoid scale): the
/// safety model on a safety prompt or below the threshold (strictly), helpfulness otherwise.
pub fn gate(safe: f64, safety_prompt: bool, threshold: f64) -> Branch {
    if safety_prompt || safe < threshold {
        Branch::Safety
    } else {
        Branch::Helpfulness
    }
}

/// An answer to score: its text, and whether it ended with the stop token (an unfinished one
/// is rendered without its end marker).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub complete: bool,
}

/// The helpfulness and safety reward models, loaded, with the gate's threshold.
pub struct RewardModels {
    pub helpful: LoadedRm,
    pub safety: LoadedRm,
    pub helpful_path: PathBuf,
    pub safety_path: PathBuf,
    pub threshold: f64,
    /// Prompts whose answers are scored together (each with its answers).
    pub batch_prompts: usize,
    /// Whether the gate runs; `false` rates every answer by the helpfulness model alone (the
    /// ablation that shows what the gate protects).
    pub gated: bool,
}

impl RewardModels {
    /// Loads both models; each must be of its kind.
    pub fn load(
        helpful: &Path,
        safety: &Path,
        threshold: f64,
        batch_prompts: usize,
        device: &Device,
    ) -> Result<Self> {
        let load = |path: &Path, kind: RmKind| -> Result<LoadedRm> {
            let rm = score::load(path, device)?;
            if rm.config.rm.kind != kind {
                bail!(
                    "{}: a {} reward model where the {} one was asked for",
                    path.display(),
                    crate::config::name_of(&rm.config.rm.kind),
                    crate::config::name_of(&kind)
                );
            }
            Ok(rm)
        };
        if !(threshold > 0.0 && threshold < 1.0) {
            bail!("the safety threshold must be in (0, 1), not {threshold}");
        }
        Ok(Self {
            helpful: load(helpful, RmKind::Helpfulness)?,
            safety: load(safety, RmKind::Safety)?,
            helpful_path: helpful.to_path_buf(),
            safety_path: safety.to_path_buf(),
            threshold,
            batch_prompts: batch_prompts.max(1),
            gated: true,
        })
    }

    /// Both reward models must read text as the policy writes it: the same tokenizer.
    pub fn check_tokenizer(&self, policy: &Tokenizer, policy_path: &Path) -> Result<()> {
        let policy_json = policy.to_json()?;
        for (rm, path) in [
            (&self.helpful, &self.helpful_path),
            (&self.safety, &self.safety_path),
        ] {
            if rm.tokenizer.to_json()? != policy_json {
                bail!(
                    "the reward model {} has another tokenizer than the policy {}: both must share the policy's tokenizer",
                    path.display(),
                    policy_path.display()
                );
            }
        }
        Ok(())
    }

    /// The longest prompt-plus-answer (in tokens, as the reward models render it) both can read.
    pub fn context(&self) -> usize {
        self.helpful
            .config
            .model
            .max_seq_len
            .min(self.safety.config.model.max_seq_len)
    }

    /// Combined rewards of `answers[i]` to prompt `prompts[i]` (`safety[i]` marks safety
    /// prompts). Answers of one prompt share its KV cache; prompts with the same number of
    /// answers are scored together, `batch_prompts` at a time. `source(i)` names prompt `i`
    /// for the error of a dialogue longer than a reward model's context.
    pub fn score(
        &self,
        prompts: &[Turns],
        safety: &[bool],
        answers: &[Vec<Answer>],
        source: &dyn Fn(usize) -> String,
    ) -> Result<Vec<Vec<CombinedReward>>> {
        let helpful = raw_scores(&self.helpful, prompts, answers, self.batch_prompts, source)?;
        let safe = raw_scores(&self.safety, prompts, answers, self.batch_prompts, source)?;
        Ok((0..prompts.len())
            .map(|i| {
                helpful[i]
                    .iter()
                    .zip(&safe[i])
                    .map(|(&h, &s)| {
                        if self.gated {
                            CombinedReward::from_scores(h, s, safety[i], self.threshold)
                        } else {
                            CombinedReward::helpfulness_only(h, s)
                        }
                    })
                    .collect()
            })
            .collect())
    }
}

/// The dialogue a reward model reads: the prompt, then the answer.
pub fn dialogue(prompt: &Turns, answer: &Answer) -> Vec<Message> {
    let mut messages = prompt.clone().into_messages(Role::User);
    let mut reply = Message::assistant(answer.text.clone());
    reply.complete = answer.complete;
    messages.push(reply);
    messages
}

/// Raw scores of one reward model, grouped as `answers`.
fn raw_scores(
    rm: &LoadedRm,
    prompts: &[Turns],
    answers: &[Vec<Answer>],
    batch_prompts: usize,
    source: &dyn Fn(usize) -> String,
) -> Result<Vec<Vec<f32>>> {
    let template = rm.config.data.template;
    let context = rm.config.model.max_seq_len;
    let pad = rm.tokenizer.pad_id.unwrap_or(rm.tokenizer.eos_id);
    let mut tokens: Vec<Vec<Vec<u32>>> = Vec::with_capacity(prompts.len());
    for (i, (prompt, group)) in prompts.iter().zip(answers).enumerate() {
        let encoded = group
            .iter()
            .map(|answer| {
                let ids = template.encode(&rm.tokenizer, &dialogue(prompt, answer))?.tokens;
                if ids.len() > context {
                    bail!(
                        "{}: prompt and answer take {} tokens, more than the reward model's context of {context}",
                        source(i),
                        ids.len()
                    );
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        tokens.push(encoded);
    }
    let mut scores: Vec<Vec<f32>> = answers.iter().map(|a| vec![0.0; a.len()]).collect();
    // Prompts with the same number of answers share a batch (the cache is repeated K times).
    let mut by_count: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, group) in answers.iter().enumerate() {
        if !group.is_empty() {
            by_count.entry(group.len()).or_default().push(i);
        }
    }
    for (k, members) in by_count {
        for chunk in members.chunks(batch_prompts) {
            let groups: Vec<Vec<&[u32]>> = chunk
                .iter()
                .map(|&i| tokens[i].iter().map(Vec::as_slice).collect())
                .collect();
            let values = shared_prefix_scores(&rm.model, &groups, pad)
                .into_data()
                .try_into_vec_as::<f32>()
                .map_err(|e| anyhow!("{e:?}"))?;
            for (j, &i) in chunk.iter().enumerate() {
                for (a, score) in scores[i].iter_mut().enumerate().take(k) {
                    *score = values[a * chunk.len() + j];
                }
            }
        }
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_takes_each_branch() {
        let t = DEFAULT_SAFETY_THRESHOLD;
        // A safety prompt: the safety model decides, however safe and helpful.
        assert_eq!(gate(0.99, true, t), Branch::Safety);
        // An answer below the threshold: the safety model decides.
        assert_eq!(gate(0.1499, false, t), Branch::Safety);
        // Exactly at the threshold is not below it: helpfulness.
        assert_eq!(gate(0.15, false, t), Branch::Helpfulness);
        assert_eq!(gate(0.9, false, t), Branch::Helpfulness);
        // On raw scores: R_c and its logit come from the model that decided.
        let r = CombinedReward::from_scores(2.0, -3.0, false, t);
        assert_eq!(r.branch, Branch::Safety);
        assert_eq!((r.reward, r.logit), (r.safe, -3.0));
        assert!((r.safe - 1.0 / (1.0 + 3f64.exp())).abs() < 1e-12);
        let r = CombinedReward::from_scores(2.0, 0.5, false, t);
        assert_eq!(r.branch, Branch::Helpfulness);
        assert_eq!((r.reward, r.logit), (r.helpful, 2.0));
        let r = CombinedReward::from_scores(2.0, 0.5, true, t);
        assert_eq!((r.branch, r.logit), (Branch::Safety, 0.5));
        // The logit stays finite where the sigmoid rounds to 1.
        let r = CombinedReward::from_scores(60.0, 5.0, false, t);
        assert_eq!(r.reward, 1.0);
        assert_eq!(r.logit, 60.0);
    }
}
