//! `kiln eval gym`: a chat model on the gym's held-out sets, greedy decoding.
//!
//! - task accuracy: exact match on `eval_tasks.jsonl` (and the mean gold score, with partial
//!   credit), overall and per task kind;
//! - refusal rates: on the held-out unsafe prompts (`eval_unsafe.jsonl`, higher is safer) and
//!   on the benign task prompts (lower is more helpful);
//! - instruction compliance at each turn of `eval_dialogues.jsonl`, the instruction given
//!   only as the system message of the first turn and the model answering every turn itself.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::{
    EvalDialogue, exact_match, is_refusal, read_eval_dialogues, read_eval_tasks, read_eval_unsafe,
    score,
};
use crate::data::chat::{ChatTemplate, Message};
use crate::data::tokenizer::Tokenizer;
use crate::infer::generate::{self, SamplingParams};
use crate::model::Llama;

#[derive(Debug, Clone, Serialize)]
pub struct GymReport {
    /// Exact-match accuracy on held-out single-turn tasks.
    pub task_accuracy: f64,
    /// Mean gold score (partial credit for near misses).
    pub task_score: f64,
    pub task_accuracy_by_kind: BTreeMap<String, f64>,
    /// Share of held-out unsafe prompts refused (the safe answer).
    pub unsafe_refusal_rate: f64,
    /// Share of benign task prompts refused (unhelpful).
    pub benign_refusal_rate: f64,
    /// Share of dialogues whose answer at turn i+1 complies with the first turn's instruction.
    pub compliance_by_turn: Vec<f64>,
    pub tasks: usize,
    pub unsafe_prompts: usize,
    pub dialogues: usize,
    /// Prompts (of every set and turn) that left no room to answer in the model's context:
    /// they count as unanswered (an empty answer).
    pub prompts_over_context: usize,
}

pub struct EvalOptions {
    pub template: ChatTemplate,
    pub batch_size: usize,
    pub max_answer_tokens: usize,
    /// Use at most this many items of each set (0: all).
    pub limit: usize,
}

fn rate(hits: usize, total: usize) -> f64 {
    hits as f64 / total.max(1) as f64
}

pub fn evaluate(
    model: &Llama,
    tokenizer: &Tokenizer,
    data: &Path,
    options: &EvalOptions,
) -> Result<GymReport> {
    let limit = |n: usize| {
        if options.limit == 0 {
            n
        } else {
            n.min(options.limit)
        }
    };
    let mut tasks = read_eval_tasks(&data.join("eval_tasks.jsonl"))?;
    tasks.truncate(limit(tasks.len()));
    let mut unsafe_prompts = read_eval_unsafe(&data.join("eval_unsafe.jsonl"))?;
    unsafe_prompts.truncate(limit(unsafe_prompts.len()));
    let mut dialogues = read_eval_dialogues(&data.join("eval_dialogues.jsonl"))?;
    dialogues.truncate(limit(dialogues.len()));

    let greedy = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        max_tokens: options.max_answer_tokens,
    };
    let mut rng = generate::seeded_rng(0);
    let mut over_context = 0;
    let mut answer = |prompts: Vec<Vec<Message>>| -> Result<Vec<String>> {
        // A prompt that fills the context (a long dialogue on a small model) gets no answer,
        // counted in the report, rather than stopping the evaluation.
        let context = model.config.max_seq_len;
        let mut fits = Vec::with_capacity(prompts.len());
        for p in &prompts {
            fits.push(options.template.encode_prompt(tokenizer, p)?.len() < context);
        }
        over_context += fits.iter().filter(|&&f| !f).count();
        let answerable: Vec<Vec<Message>> = prompts
            .into_iter()
            .zip(&fits)
            .filter(|(_, f)| **f)
            .map(|(p, _)| p)
            .collect();
        let mut answers = generate::complete_chat(
            model,
            tokenizer,
            options.template,
            &answerable,
            &greedy,
            options.batch_size,
            &mut rng,
        )?
        .into_iter()
        .map(|a| a.text);
        Ok(fits
            .iter()
            .map(|&f| {
                if f {
                    answers.next().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .collect())
    };

    let task_answers = answer(
        tasks
            .iter()
            .map(|t| vec![Message::user(t.prompt.clone())])
            .collect(),
    )?;
    let mut by_kind: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut correct, mut total_score, mut benign_refused) = (0, 0.0, 0);
    for (task, got) in tasks.iter().zip(&task_answers) {
        let hit = exact_match(&task.answer, got);
        correct += hit as usize;
        total_score += score(task.kind, &task.answer, got);
        benign_refused += is_refusal(got) as usize;
        let kind = serde_json::to_value(task.kind)?
            .as_str()
            .unwrap_or("?")
            .to_string();
        let entry = by_kind.entry(kind).or_default();
        entry.0 += hit as usize;
        entry.1 += 1;
    }

    let unsafe_answers = answer(
        unsafe_prompts
            .iter()
            .map(|p| vec![Message::user(p.clone())])
            .collect(),
    )?;
    let unsafe_refused = unsafe_answers.iter().filter(|a| is_refusal(a)).count();

    let compliance_by_turn = compliance(&dialogues, &mut answer)?;
    Ok(GymReport {
        prompts_over_context: over_context,
        task_accuracy: rate(correct, tasks.len()),
        task_score: total_score / tasks.len().max(1) as f64,
        task_accuracy_by_kind: by_kind
            .into_iter()
            .map(|(k, (hit, n))| (k, rate(hit, n)))
            .collect(),
        unsafe_refusal_rate: rate(unsafe_refused, unsafe_prompts.len()),
        benign_refusal_rate: rate(benign_refused, tasks.len()),
        compliance_by_turn,
        tasks: tasks.len(),
        unsafe_prompts: unsafe_prompts.len(),
        dialogues: dialogues.len(),
    })
}

/// Plays every dialogue turn by turn (the model's own answers stay in the context) and
/// checks each answer against the instruction of the first turn's system message.
fn compliance(
    dialogues: &[EvalDialogue],
    answer: &mut impl FnMut(Vec<Vec<Message>>) -> Result<Vec<String>>,
) -> Result<Vec<f64>> {
    let turns = dialogues.iter().map(|d| d.turns.len()).max().unwrap_or(0);
    let mut contexts: Vec<Vec<Message>> = dialogues
        .iter()
        .map(|d| vec![Message::system(d.system.clone())])
        .collect();
    let mut by_turn = Vec::with_capacity(turns);
    for turn in 0..turns {
        let active: Vec<usize> = (0..dialogues.len())
            .filter(|&i| dialogues[i].turns.len() > turn)
            .collect();
        let prompts: Vec<Vec<Message>> = active
            .iter()
            .map(|&i| {
                let mut m = contexts[i].clone();
                m.push(Message::user(dialogues[i].turns[turn].user.clone()));
                m
            })
            .collect();
        let answers = answer(prompts.clone())?;
        let mut complied = 0;
        for ((&i, mut context), got) in active.iter().zip(prompts).zip(answers) {
            complied += dialogues[i].instruction.complies(&got) as usize;
            context.push(Message::assistant(got));
            contexts[i] = context;
        }
        by_turn.push(rate(complied, active.len()));
    }
    Ok(by_turn)
}
