//! `kiln gym`: a suite of synthetic chat tasks whose answers a program can check.
//!
//! It exists to measure SFT, Ghost Attention (GAtt) and reward models on a tiny model
//! (1-5M parameters, 2048-token byte-level BPE, 512-token context) trained for minutes on
//! a CPU, so everything is small: short fixed-phrasing prompts, numbers below 100, letters
//! written space-separated so each is one token.
//!
//! - [`tasks`]: single-turn tasks (add, subtract, reverse, sort, count, uppercase), the gold
//!   scorer with partial credit, and near misses for preference pairs.
//! - [`safety`]: unsafe prompts from the bundled Do-Not-Answer set (`data/gym/donotanswer`),
//!   whose safe answer is the fixed [`REFUSAL`].
//! - [`instructions`]: system instructions (ahoy, exclaim, capitals, brackets) whose
//!   compliance is checkable turn by turn.
//! - [`generate`]: writes the JSON Lines files (SFT, preference pairs, prompts, held-out
//!   evaluation sets) with held-out prompts never used for training.
//! - [`policy_pairs`]: preference pairs from a policy's own sampled answers, labelled by the
//!   gold checker (the paper's fresh comparisons of the newest model's answers).
//!
//! Everything is deterministic for a seed (`ChaCha8Rng::seed_from_u64`).

pub mod eval;
pub mod generate;
pub mod instructions;
pub mod policy_pairs;
pub mod safety;
pub mod tasks;
#[cfg(test)]
mod tests;

use std::path::Path;

use anyhow::{Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::data::chat::{Message, PreferencePair, PromptRecord, Rating, Role, Turns};
pub use generate::{GymSizes, GymSummary, generate};
pub use instructions::{Instruction, InstructionKind, sample_instruction};
pub use safety::{REFUSAL, compliant_answer, is_refusal, load_unsafe_prompts};
pub use tasks::{
    Task, TaskKind, close_miss, exact_match, near_miss, sample_any_task, sample_task, score,
};

/// One line of `sft_*.jsonl` and `gatt_dialogues.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatExample {
    pub messages: Vec<Message>,
}

impl Rating {
    /// The rating for a gold-score gap `score(chosen) - score(rejected)`.
    pub fn from_gap(gap: f64) -> Rating {
        match gap {
            g if g > 0.75 => Rating::SignificantlyBetter,
            g if g > 0.5 => Rating::Better,
            g if g > 0.25 => Rating::SlightlyBetter,
            _ => Rating::NegligiblyBetter,
        }
    }
}

/// One line of `eval_unsafe.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsafePrompt {
    pub prompt: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalTurn {
    pub user: String,
    /// The gold plain answer; the instruction is not applied to it.
    pub answer: String,
}

/// One line of `eval_dialogues.jsonl`: a held-out dialogue in which every turn's task fits
/// the instruction, for measuring compliance turn by turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalDialogue {
    pub instruction: Instruction,
    pub system: String,
    pub turns: Vec<EvalTurn>,
}

/// One line of `instructions.jsonl`: what GAtt draws its instructions from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstructionEntry {
    pub kind: InstructionKind,
    pub text: String,
    pub short: String,
}

/// Parses every non-blank line of a JSON Lines file; errors read `FILE:LINE: what is wrong`.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    read_checked(path, |_| Ok(()))
}

/// [`read_jsonl`], also applying `check` to each record.
fn read_checked<T: DeserializeOwned>(
    path: &Path,
    check: impl Fn(&T) -> Result<()>,
) -> Result<Vec<T>> {
    let records = crate::data::chat::read_jsonl(path, false, |line| {
        let record: T = serde_json::from_str(line)?;
        check(&record)?;
        Ok(record)
    })?
    .records;
    if records.is_empty() {
        bail!("{}: no records", path.display());
    }
    Ok(records)
}

fn non_empty(what: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        bail!("empty {what}");
    }
    Ok(())
}

/// Reads `eval_tasks.jsonl`: `{"kind", "prompt", "answer"}` per line.
pub fn read_eval_tasks(path: &Path) -> Result<Vec<Task>> {
    read_checked(path, |t: &Task| {
        non_empty("prompt", &t.prompt)?;
        non_empty("answer", &t.answer)
    })
}

/// Reads `eval_unsafe.jsonl`: `{"prompt"}` per line.
pub fn read_eval_unsafe(path: &Path) -> Result<Vec<String>> {
    let records = read_checked(path, |r: &UnsafePrompt| non_empty("prompt", &r.prompt))?;
    Ok(records.into_iter().map(|r| r.prompt).collect())
}

/// Reads `eval_dialogues.jsonl`.
pub fn read_eval_dialogues(path: &Path) -> Result<Vec<EvalDialogue>> {
    read_checked(path, |d: &EvalDialogue| {
        non_empty("system", &d.system)?;
        if d.turns.is_empty() {
            bail!("dialogue has no turns");
        }
        d.turns
            .iter()
            .try_for_each(|t| non_empty("user turn", &t.user))
    })
}

/// Reads `instructions.jsonl`.
pub fn read_instructions(path: &Path) -> Result<Vec<InstructionEntry>> {
    read_checked(path, |e: &InstructionEntry| {
        non_empty("text", &e.text)?;
        non_empty("short", &e.short)
    })
}
