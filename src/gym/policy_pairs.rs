//! Preference pairs from a policy's own answers, labelled by the gym's checker.
//!
//! Llama 2 retrained its reward models on fresh comparisons of the newest chat model's
//! answers before each RLHF round (paper sec. 3.2.1): a reward model trained on an older
//! model's distribution misranks the slips the newer model makes. The gym's annotator is
//! its checker, so the comparisons cost nothing: for each prompt answered several times
//! (`kiln rs` samples, `kiln ppo` rollouts), a right answer is preferred over each wrong
//! one, and for an unsafe prompt a refusal over each compliant answer.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Result, bail};

use super::eval::{Gold, judge, last_user_text, read_answer_file};
use super::{PreferencePair, Rating, Turns, exact_match};

/// The pairs and what they were made from.
#[derive(Debug, Default)]
pub struct PolicyPairs {
    pub pairs: Vec<PreferencePair>,
    pub answers: usize,
    pub prompts: usize,
    /// Prompts with at least one right (or refusing) and one wrong (or compliant) answer.
    pub prompts_with_pairs: usize,
}

impl PolicyPairs {
    pub fn safety_pairs(&self) -> usize {
        self.pairs.iter().filter(|p| p.safety).count()
    }

    pub fn task_pairs(&self) -> usize {
        self.pairs.len() - self.safety_pairs()
    }
}

/// One prompt's distinct answers: text, how often sampled, whether the checker accepts it.
struct PromptAnswers {
    prompt: Turns,
    safety: bool,
    answers: Vec<(String, usize, bool)>,
}

/// Pairs from every `{"prompt", "answer"}` line of `paths` (a prompt answered in several
/// files, such as every round of rejection sampling, counts as one): per prompt, its most
/// frequent accepted answer over each of its `per_prompt` most frequent rejected ones (ties
/// in file order), rated `significantly_better` (right against wrong, as the gym's close-miss
/// pairs). A task answer is accepted when exact; an answer to an unsafe prompt (no gym
/// task) when it refuses, and those pairs are safety pairs. Prompts whose answers are all
/// right or all wrong give no pair. Deterministic: file order throughout.
pub fn pairs_from_answers(paths: &[PathBuf], per_prompt: usize) -> Result<PolicyPairs> {
    if per_prompt == 0 {
        bail!("per_prompt must be at least 1");
    }
    let mut lines = Vec::new();
    for path in paths {
        lines.extend(read_answer_file(path)?);
    }
    let mut out = PolicyPairs {
        answers: lines.len(),
        ..Default::default()
    };
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut prompts: Vec<PromptAnswers> = Vec::new();
    for line in lines {
        let (accepted, safety) = match judge(&last_user_text(&line.prompt), &line.answer) {
            Gold::Task { task, .. } => (exact_match(&task.answer, &line.answer), false),
            Gold::Other { refused } => (refused, true),
        };
        let key = serde_json::to_string(&line.prompt)?;
        let at = *index.entry(key).or_insert_with(|| {
            prompts.push(PromptAnswers {
                prompt: line.prompt.clone(),
                safety,
                answers: Vec::new(),
            });
            prompts.len() - 1
        });
        let answers = &mut prompts[at].answers;
        match answers.iter_mut().find(|(text, ..)| *text == line.answer) {
            Some((_, count, _)) => *count += 1,
            None => answers.push((line.answer, 1, accepted)),
        }
    }
    out.prompts = prompts.len();
    for PromptAnswers {
        prompt,
        safety,
        mut answers,
    } in prompts
    {
        // Stable: equal counts keep file order.
        answers.sort_by_key(|a| std::cmp::Reverse(a.1));
        let Some((chosen, ..)) = answers.iter().find(|a| a.2) else {
            continue;
        };
        let rejected: Vec<_> = answers.iter().filter(|a| !a.2).take(per_prompt).collect();
        if rejected.is_empty() {
            continue;
        }
        out.prompts_with_pairs += 1;
        for (text, ..) in rejected {
            out.pairs.push(PreferencePair {
                prompt: prompt.clone(),
                chosen: Turns::Text(chosen.clone()),
                rejected: Turns::Text(text.clone()),
                rating: Rating::SignificantlyBetter,
                safety,
            });
        }
    }
    Ok(out)
}
