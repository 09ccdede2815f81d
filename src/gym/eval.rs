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

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
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
}

/// The held-out sets of a gym directory (`kiln gym generate`), read and checked: a bad line
/// is reported before any model is loaded.
pub struct EvalSets {
    pub tasks: Vec<super::Task>,
    pub unsafe_prompts: Vec<String>,
    pub dialogues: Vec<EvalDialogue>,
}

impl EvalSets {
    /// At most `limit` items of each set (0: all).
    pub fn read(data: &Path, limit: usize) -> Result<Self> {
        let keep = |n: usize| if limit == 0 { n } else { n.min(limit) };
        let mut tasks = read_eval_tasks(&data.join("eval_tasks.jsonl"))?;
        tasks.truncate(keep(tasks.len()));
        let mut unsafe_prompts = read_eval_unsafe(&data.join("eval_unsafe.jsonl"))?;
        unsafe_prompts.truncate(keep(unsafe_prompts.len()));
        let mut dialogues = read_eval_dialogues(&data.join("eval_dialogues.jsonl"))?;
        dialogues.truncate(keep(dialogues.len()));
        Ok(Self {
            tasks,
            unsafe_prompts,
            dialogues,
        })
    }
}

/// The chat model to evaluate at `path` (any format the one loader reads), with `template`
/// or its own, checked against its tokenizer.
pub fn load_chat_model(
    path: &Path,
    template: Option<ChatTemplate>,
    device: &burn::tensor::Device,
) -> Result<(crate::interop::convert::LoadedModel, ChatTemplate)> {
    let loaded = crate::interop::convert::load_model(path, device, Default::default())?;
    let template = template.unwrap_or(loaded.template);
    template.check(&loaded.loaded.tokenizer)?;
    Ok((loaded.loaded, template))
}

fn rate(hits: usize, total: usize) -> f64 {
    hits as f64 / total.max(1) as f64
}

pub fn evaluate(
    model: &Llama,
    tokenizer: &Tokenizer,
    sets: &EvalSets,
    options: &EvalOptions,
) -> Result<GymReport> {
    let EvalSets {
        tasks,
        unsafe_prompts,
        dialogues,
    } = sets;

    let greedy = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        min_p: 0.0,
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
        let entry = by_kind.entry(task.kind.name().to_string()).or_default();
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

    let compliance_by_turn = compliance(dialogues, &mut answer)?;
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

/// What the gym's gold checker says of one answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Gold {
    /// The prompt states a gym task: the answer's gold score in [0, 1] (1 iff exact).
    Task { task: super::Task, score: f64 },
    /// The prompt is no gym task (an unsafe prompt): whether the answer refused.
    Other { refused: bool },
}

/// The gold view of `answer` to `prompt` (the user's text): the task is read back from the
/// prompt ([`super::tasks::solve`]).
pub fn judge(prompt: &str, answer: &str) -> Gold {
    match super::tasks::solve(prompt) {
        Some(task) => {
            let score = score(task.kind, &task.answer, answer);
            Gold::Task { task, score }
        }
        None => Gold::Other {
            refused: is_refusal(answer),
        },
    }
}

/// The text of a prompt's last user message (what a gym task is read back from).
pub fn last_user_text(prompt: &crate::data::chat::Turns) -> String {
    use crate::data::chat::Turns;
    match prompt {
        Turns::Text(text) => text.clone(),
        Turns::Messages(messages) => messages
            .iter()
            .rev()
            .find(|m| m.role == crate::data::chat::Role::User)
            .map(|m| m.content.clone())
            .unwrap_or_default(),
    }
}

/// The gold check of answers written to a file ([`check_answers`]), per task kind and for
/// the prompts that are no task (the unsafe ones).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AnswerCheck {
    pub by_kind: BTreeMap<String, KindCheck>,
    /// Every task answer together.
    pub tasks: KindCheck,
    /// Answers to prompts that are no gym task (unsafe prompts): how many, how many refused.
    pub other: usize,
    pub other_refused: usize,
    /// Mean `reward` field of those answers, if the file has one.
    pub other_reward: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct KindCheck {
    pub answers: usize,
    /// Exact answers and the mean gold score (partial credit).
    pub exact: usize,
    pub gold_score: f64,
    /// Task answers that refused (unhelpful).
    pub refused: usize,
    /// Mean `reward` field (the reward model's view), if the file has one.
    pub reward: Option<f64>,
}

/// Checks every `{"prompt", "answer"}` line of `path` (only `"selected": true` ones with
/// `selected_only`) with the gym's gold checker: the task is read back from the prompt
/// ([`super::tasks::solve`]); a prompt that is no task counts as unsafe, its answer as
/// refused or not.
pub fn check_answers(path: &Path, selected_only: bool) -> Result<AnswerCheck> {
    let lines = read_answers(path, selected_only)?;
    #[derive(Default)]
    struct Sums {
        check: KindCheck,
        reward: f64,
        rewarded: usize,
    }
    let mut kinds: BTreeMap<String, Sums> = BTreeMap::new();
    let mut all = Sums::default();
    let mut out = AnswerCheck::default();
    let (mut other_reward, mut other_rewarded) = (0.0, 0usize);
    for line in lines {
        let (task, gold) = match judge(&line.prompt, &line.answer) {
            Gold::Task { task, score } => (task, score),
            Gold::Other { refused } => {
                out.other += 1;
                out.other_refused += refused as usize;
                if let Some(r) = line.reward {
                    other_reward += r;
                    other_rewarded += 1;
                }
                continue;
            }
        };
        for sums in [
            kinds.entry(task.kind.name().to_string()).or_default(),
            &mut all,
        ] {
            sums.check.answers += 1;
            sums.check.exact += exact_match(&task.answer, &line.answer) as usize;
            sums.check.gold_score += gold;
            sums.check.refused += is_refusal(&line.answer) as usize;
            if let Some(r) = line.reward {
                sums.reward += r;
                sums.rewarded += 1;
            }
        }
    }
    let finish = |s: Sums| {
        let mut c = s.check;
        c.gold_score /= c.answers.max(1) as f64;
        c.reward = (s.rewarded > 0).then(|| s.reward / s.rewarded as f64);
        c
    };
    out.by_kind = kinds.into_iter().map(|(k, s)| (k, finish(s))).collect();
    out.tasks = finish(all);
    out.other_reward = (other_rewarded > 0).then(|| other_reward / other_rewarded as f64);
    if out.tasks.answers + out.other == 0 {
        anyhow::bail!("{}: no answers to check", path.display());
    }
    Ok(out)
}

/// Every line of an answers file (`{"prompt", "answer", ...}`) with the gold checker's view
/// added: for a gym task `"gold_kind"`, `"gold_answer"`, `"exact"` and `"gold_score"`; for
/// any other prompt `"refused"`. The line's own fields are kept, so a script can put the
/// checker's verdict next to a sample's reward and log-probs without re-implementing it.
pub fn annotate_answers(path: &Path) -> Result<Vec<serde_json::Value>> {
    use serde::Deserialize;
    let records = crate::data::chat::read_jsonl(path, false, |text| {
        let mut value: serde_json::Value = serde_json::from_str(text)?;
        let line = AnswerFileLine::deserialize(&value)?;
        let object = value
            .as_object_mut()
            .ok_or_else(|| anyhow::anyhow!("not a JSON object"))?;
        match judge(&last_user_text(&line.prompt), &line.answer) {
            Gold::Task { task, score } => {
                object.insert("gold_kind".into(), task.kind.name().into());
                let exact = exact_match(&task.answer, &line.answer);
                object.insert("gold_answer".into(), task.answer.into());
                object.insert("exact".into(), exact.into());
                object.insert("gold_score".into(), score.into());
            }
            Gold::Other { refused } => {
                object.insert("refused".into(), refused.into());
            }
        }
        Ok(value)
    })?;
    Ok(records.records)
}

/// A line of an answers file (RS samples and pools, PPO rollouts): what the checks read.
#[derive(serde::Deserialize)]
pub(crate) struct AnswerFileLine {
    pub prompt: crate::data::chat::Turns,
    pub answer: String,
    #[serde(default)]
    pub reward: Option<f64>,
    #[serde(default)]
    pub selected: Option<bool>,
}

/// Every line of an answers file; a malformed one is an error naming the file and line.
pub(crate) fn read_answer_file(path: &Path) -> Result<Vec<AnswerFileLine>> {
    Ok(crate::data::chat::read_jsonl(path, false, |line| {
        serde_json::from_str::<AnswerFileLine>(line).map_err(|e| anyhow::anyhow!("{e}"))
    })?
    .records)
}

/// One answer of an answers file: the prompt's last user text, the answer, its reward.
struct AnswerLine {
    prompt: String,
    answer: String,
    reward: Option<f64>,
}

/// The `{"prompt", "answer"}` lines of `path` (only `"selected": true` ones with
/// `selected_only`).
fn read_answers(path: &Path, selected_only: bool) -> Result<Vec<AnswerLine>> {
    Ok(read_answer_file(path)?
        .into_iter()
        .filter(|line| !selected_only || line.selected == Some(true))
        .map(|line| AnswerLine {
            prompt: last_user_text(&line.prompt),
            answer: line.answer,
            reward: line.reward,
        })
        .collect())
}

/// Two answer files on the same prompts compared with the gold checker, prompt by prompt:
/// each prompt's mean over its answers in either file, then the mean over the prompts both
/// files answer of candidate minus baseline, with the standard error of that paired
/// difference. Pairing by prompt removes the prompts' own difficulty from the noise, so a
/// difference of a few standard errors is a change of the model, not of the draw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PairedComparison {
    pub by_kind: BTreeMap<String, PairedKind>,
    pub tasks: PairedKind,
    /// Unsafe prompts (no gym task): the share of answers refused.
    pub unsafe_refused: PairedMean,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PairedKind {
    pub exact: PairedMean,
    pub gold_score: PairedMean,
}

/// Means over the paired prompts of a per-prompt value in each file, and of their difference.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PairedMean {
    pub prompts: usize,
    pub baseline: f64,
    pub candidate: f64,
    /// candidate - baseline.
    pub difference: f64,
    /// Sample standard deviation of the per-prompt differences over sqrt(prompts); 0 for
    /// fewer than two prompts.
    pub standard_error: f64,
}

impl PairedMean {
    /// `pairs`: (baseline, candidate) per prompt.
    pub fn of(pairs: &[(f64, f64)]) -> Self {
        let n = pairs.len();
        if n == 0 {
            return Self::default();
        }
        let mean = |f: &dyn Fn(&(f64, f64)) -> f64| pairs.iter().map(f).sum::<f64>() / n as f64;
        let difference = mean(&|p| p.1 - p.0);
        let standard_error = if n < 2 {
            0.0
        } else {
            let ss: f64 = pairs.iter().map(|p| (p.1 - p.0 - difference).powi(2)).sum();
            (ss / (n - 1) as f64).sqrt() / (n as f64).sqrt()
        };
        Self {
            prompts: n,
            baseline: mean(&|p| p.0),
            candidate: mean(&|p| p.1),
            difference,
            standard_error,
        }
    }
}

/// Per prompt of one answers file: the task kind (None for an unsafe prompt) and the means
/// of (exact, gold score) or (refused, refused) over its answers.
fn per_prompt_means(
    path: &Path,
    selected_only: bool,
) -> Result<BTreeMap<String, (Option<String>, f64, f64)>> {
    let mut sums: BTreeMap<String, (Option<String>, f64, f64, usize)> = BTreeMap::new();
    for line in read_answers(path, selected_only)? {
        let (kind, a, b) = match judge(&line.prompt, &line.answer) {
            Gold::Task { task, score } => (
                Some(task.kind.name().to_string()),
                exact_match(&task.answer, &line.answer) as u8 as f64,
                score,
            ),
            Gold::Other { refused } => (None, refused as u8 as f64, refused as u8 as f64),
        };
        let entry = sums.entry(line.prompt).or_insert((kind, 0.0, 0.0, 0));
        entry.1 += a;
        entry.2 += b;
        entry.3 += 1;
    }
    if sums.is_empty() {
        anyhow::bail!("{}: no answers to check", path.display());
    }
    Ok(sums
        .into_iter()
        .map(|(prompt, (kind, a, b, n))| (prompt, (kind, a / n as f64, b / n as f64)))
        .collect())
}

/// Compares `candidate`'s answers with `baseline`'s ([`PairedComparison`]). An error if the
/// two files share no prompt.
pub fn compare_answers(
    baseline: &Path,
    candidate: &Path,
    selected_only: bool,
) -> Result<PairedComparison> {
    let base = per_prompt_means(baseline, selected_only)?;
    let cand = per_prompt_means(candidate, selected_only)?;
    type Pairs = (Vec<(f64, f64)>, Vec<(f64, f64)>);
    let mut kinds: BTreeMap<String, Pairs> = BTreeMap::new();
    let (mut all, mut unsafe_refused): (Pairs, Vec<(f64, f64)>) = Default::default();
    for (prompt, (kind, a0, b0)) in &base {
        let Some((_, a1, b1)) = cand.get(prompt) else {
            continue;
        };
        match kind {
            Some(kind) => {
                for pairs in [kinds.entry(kind.clone()).or_default(), &mut all] {
                    pairs.0.push((*a0, *a1));
                    pairs.1.push((*b0, *b1));
                }
            }
            None => unsafe_refused.push((*a0, *a1)),
        }
    }
    if all.0.is_empty() && unsafe_refused.is_empty() {
        anyhow::bail!(
            "{} and {} share no prompt: nothing to compare",
            baseline.display(),
            candidate.display()
        );
    }
    let paired = |p: &Pairs| PairedKind {
        exact: PairedMean::of(&p.0),
        gold_score: PairedMean::of(&p.1),
    };
    Ok(PairedComparison {
        by_kind: kinds.iter().map(|(k, p)| (k.clone(), paired(p))).collect(),
        tasks: paired(&all),
        unsafe_refused: PairedMean::of(&unsafe_refused),
    })
}
