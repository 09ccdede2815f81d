//! Writes the gym's files. Held-out material is drawn first; training material never reuses
//! a held-out prompt, so every evaluation measures generalisation.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::instructions::{Instruction, InstructionKind, sample_instruction};
use super::safety::{REFUSAL, compliant_answer, load_unsafe_prompts};
use super::tasks::{Task, TaskKind, close_miss, near_miss, sample_any_task, sample_task, score};
use super::{
    ChatExample, EvalDialogue, EvalTurn, InstructionEntry, Message, PreferencePair, PromptRecord,
    Rating, Role, Turns, UnsafePrompt,
};
use crate::interop::checkpoint;

/// How many records each file gets. The defaults give ~30k SFT examples and held-out sets
/// of a few hundred.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GymSizes {
    /// Directory of `*.jsonl` unsafe prompts.
    pub unsafe_dir: PathBuf,
    /// Fraction of unsafe prompts held out for evaluation.
    pub heldout_unsafe_fraction: f64,
    /// Distinct held-out single-turn tasks; every held-out file draws its tasks from them.
    pub eval_tasks: usize,
    pub eval_dialogues: usize,
    pub eval_dialogue_turns: usize,
    pub sft_train: usize,
    pub sft_val: usize,
    pub pref_train: usize,
    /// Extra helpfulness pairs in the training preferences: a task's gold answer against one
    /// slip ([`close_miss`]): a number off by 1, 2, 3 or 10 (add, subtract, count), or one
    /// swapped or replaced letter (reverse, sort). Held-out pairs get none, so the held-out
    /// accuracies keep their meaning.
    pub pref_close_misses: usize,
    pub pref_heldout: usize,
    pub prompts_train: usize,
    pub prompts_heldout: usize,
    pub gatt_dialogues: usize,
    pub gatt_turns: usize,
}

impl Default for GymSizes {
    fn default() -> Self {
        GymSizes {
            unsafe_dir: PathBuf::from("data/gym/donotanswer"),
            heldout_unsafe_fraction: 0.2,
            eval_tasks: 600,
            eval_dialogues: 200,
            eval_dialogue_turns: 6,
            sft_train: 30_000,
            sft_val: 500,
            pref_train: 10_000,
            pref_close_misses: 90_000,
            pref_heldout: 500,
            prompts_train: 5_000,
            prompts_heldout: 400,
            gatt_dialogues: 600,
            gatt_turns: 6,
        }
    }
}

/// Line counts per written file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GymSummary {
    pub files: BTreeMap<String, usize>,
}

#[derive(Serialize)]
struct Manifest<'a> {
    seed: u64,
    sizes: &'a GymSizes,
    files: &'a BTreeMap<String, usize>,
}

/// SFT mixture, in percent: plain single-turn tasks take the rest.
const SFT_INSTRUCTED_PERCENT: usize = 15;
const SFT_UNSAFE_PERCENT: usize = 10;
const SFT_MULTI_TURN_PERCENT: usize = 15;
/// Of all SFT examples: multi-turn ones with the instruction before every user turn.
const SFT_REPEATED_INSTRUCTION_PERCENT: usize = 5;
/// Preference mixture, in percent: near-miss helpfulness pairs take the rest.
const PREF_BENIGN_REFUSAL_PERCENT: usize = 10;
const PREF_SAFETY_PERCENT: usize = 25;
/// Task kinds of the close-miss pairs: those where the policy slips. Without reverse and
/// sort here, best-of-8 by the reward model picked a right letter answer no more often than
/// a random sample, and RS lost letter skills round by round (docs/results.md).
/// Uppercase, which the policy gets right, is left to the general pairs.
pub(crate) const CLOSE_MISS_KINDS: [TaskKind; 5] = [
    TaskKind::Add,
    TaskKind::Subtract,
    TaskKind::Count,
    TaskKind::Reverse,
    TaskKind::Sort,
];
/// Share of unsafe prompts in the prompt sets.
const PROMPTS_UNSAFE_PERCENT: usize = 20;
const MAX_COMBINED_INSTRUCTIONS: usize = 2;

const MANIFEST: &str = "manifest.json";

/// One independent random stream per part, so resizing one file leaves the others unchanged.
fn stream_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Where a part's material comes from: the held-out pools, or fresh training tasks that
/// avoid every held-out prompt.
struct Source<'a> {
    heldout_tasks: Option<&'a [Task]>,
    excluded: &'a HashSet<String>,
    unsafe_prompts: &'a [String],
}

impl Source<'_> {
    fn task(&self, rng: &mut ChaCha8Rng) -> Task {
        self.drawn(rng, sample_any_task)
    }

    fn task_of(&self, kind: TaskKind, rng: &mut ChaCha8Rng) -> Task {
        loop {
            // Training tasks are of `kind` at once; the held-out pool is drawn from until one is.
            let task = self.drawn(rng, |rng| sample_task(kind, rng));
            if task.kind == kind {
                return task;
            }
        }
    }

    /// A task from the held-out pool where there is one, else one of `sample`'s that is not a
    /// held-out prompt.
    fn drawn(&self, rng: &mut ChaCha8Rng, sample: impl Fn(&mut ChaCha8Rng) -> Task) -> Task {
        if let Some(pool) = self.heldout_tasks {
            return pool.choose(rng).unwrap().clone();
        }
        loop {
            let task = sample(rng);
            if !self.excluded.contains(&task.prompt) {
                return task;
            }
        }
    }

    fn fitting_task(&self, instruction: &Instruction, rng: &mut ChaCha8Rng) -> Task {
        loop {
            let task = self.task(rng);
            if instruction.task_fits(&task) {
                return task;
            }
        }
    }

    /// Unsafe prompts taken in turn, so repeats are spread evenly.
    fn unsafe_prompt(&self, index: usize) -> &str {
        &self.unsafe_prompts[index % self.unsafe_prompts.len()]
    }
}

fn message(role: Role, content: &str) -> Message {
    Message::new(role, content)
}

fn percent(total: usize, share: usize) -> usize {
    (total * share + 50) / 100
}

/// The SFT mixture. A system instruction is always visible where it applies: in single-turn
/// examples, and in multi-turn ones repeated before every user turn (the form Ghost Attention
/// samples in). No example gives it in the first turn only: carrying it across turns unseen
/// is what Ghost Attention has to teach later.
fn sft_examples(count: usize, source: &Source, rng: &mut ChaCha8Rng) -> Vec<ChatExample> {
    let instructed = percent(count, SFT_INSTRUCTED_PERCENT);
    let unsafe_count = percent(count, SFT_UNSAFE_PERCENT);
    let multi_turn = percent(count, SFT_MULTI_TURN_PERCENT).min(count - instructed - unsafe_count);
    let single = count - instructed - unsafe_count - multi_turn;
    let mut examples = Vec::with_capacity(count);
    for _ in 0..single {
        let task = source.task(rng);
        examples.push(vec![
            message(Role::User, &task.prompt),
            message(Role::Assistant, &task.answer),
        ]);
    }
    for _ in 0..instructed {
        let instruction = sample_instruction(rng, MAX_COMBINED_INSTRUCTIONS);
        let task = source.fitting_task(&instruction, rng);
        examples.push(vec![
            message(Role::System, &instruction.text(rng.random_bool(0.5))),
            message(Role::User, &task.prompt),
            message(Role::Assistant, &instruction.apply(&task.answer)),
        ]);
    }
    for index in 0..unsafe_count {
        examples.push(vec![
            message(Role::User, source.unsafe_prompt(index)),
            message(Role::Assistant, REFUSAL),
        ]);
    }
    let repeated = percent(count, SFT_REPEATED_INSTRUCTION_PERCENT).min(multi_turn);
    for index in 0..multi_turn {
        let mut messages = Vec::new();
        let instruction = (index < repeated).then(|| {
            let instruction = sample_instruction(rng, MAX_COMBINED_INSTRUCTIONS);
            let text = instruction.text(rng.random_bool(0.5));
            (instruction, text)
        });
        for _ in 0..rng.random_range(2..=4) {
            match &instruction {
                Some((instruction, text)) => {
                    let task = source.fitting_task(instruction, rng);
                    messages.push(message(Role::System, text));
                    messages.push(message(Role::User, &task.prompt));
                    messages.push(message(Role::Assistant, &instruction.apply(&task.answer)));
                }
                None => {
                    let task = source.task(rng);
                    messages.push(message(Role::User, &task.prompt));
                    messages.push(message(Role::Assistant, &task.answer));
                }
            }
        }
        examples.push(messages);
    }
    examples.shuffle(rng);
    examples
        .into_iter()
        .map(|messages| ChatExample { messages })
        .collect()
}

fn preference_pairs(
    count: usize,
    close_misses: usize,
    source: &Source,
    rng: &mut ChaCha8Rng,
) -> Vec<PreferencePair> {
    let pair = |prompt: &str, chosen: &str, rejected: &str, rating, safety| PreferencePair {
        prompt: Turns::Text(prompt.into()),
        chosen: Turns::Text(chosen.into()),
        rejected: Turns::Text(rejected.into()),
        rating,
        safety,
    };
    let benign_refusal = percent(count, PREF_BENIGN_REFUSAL_PERCENT);
    let safety = percent(count, PREF_SAFETY_PERCENT).min(count - benign_refusal);
    let mut pairs = Vec::with_capacity(count);
    for index in 0..count - benign_refusal - safety {
        let task = source.task(rng);
        // Half the pairs set the gold answer against a near miss; the other half two near
        // misses, the closer one chosen, so that small gold-score gaps (the "negligibly
        // better" end of the scale) are hard to tell apart, as close human ratings are.
        let credit = |answer: &str| score(task.kind, &task.answer, answer);
        let mut misses = (0..8).map(|_| near_miss(&task, rng));
        let two_misses = (index % 2 == 1)
            .then(|| {
                let first = misses.next()?;
                // Some tasks give every miss the same credit (a gold answer of 0): then the
                // pair falls back to gold against a miss.
                let second = misses.find(|m| credit(m) != credit(&first))?;
                Some(if credit(&first) > credit(&second) {
                    (first, second)
                } else {
                    (second, first)
                })
            })
            .flatten();
        let (chosen, rejected) =
            two_misses.unwrap_or_else(|| (task.answer.clone(), near_miss(&task, rng)));
        let gap = credit(&chosen) - credit(&rejected);
        pairs.push(pair(
            &task.prompt,
            &chosen,
            &rejected,
            Rating::from_gap(gap),
            false,
        ));
    }
    // Refusing a benign prompt is unhelpful, so the helpfulness model must learn that too.
    for _ in 0..benign_refusal {
        let task = source.task(rng);
        pairs.push(pair(
            &task.prompt,
            &task.answer,
            REFUSAL,
            Rating::SignificantlyBetter,
            false,
        ));
    }
    for index in 0..safety {
        let prompt = source.unsafe_prompt(index);
        let rejected = compliant_answer(prompt, rng);
        pairs.push(pair(
            prompt,
            REFUSAL,
            &rejected,
            Rating::SignificantlyBetter,
            true,
        ));
    }
    // Exact against wrong, however close: the distinction task accuracy makes, so rated
    // `significantly_better` rather than by the gold score's partial credit.
    for _ in 0..close_misses {
        let task = source.task_of(*CLOSE_MISS_KINDS.choose(rng).unwrap(), rng);
        let miss = close_miss(&task, rng);
        pairs.push(pair(
            &task.prompt,
            &task.answer,
            &miss,
            Rating::SignificantlyBetter,
            false,
        ));
    }
    pairs.shuffle(rng);
    pairs
}

fn prompt_records(count: usize, source: &Source, rng: &mut ChaCha8Rng) -> Vec<PromptRecord> {
    let unsafe_count = percent(count, PROMPTS_UNSAFE_PERCENT);
    let mut records: Vec<PromptRecord> = (0..count - unsafe_count)
        .map(|_| PromptRecord {
            prompt: Turns::Text(source.task(rng).prompt),
            safety: false,
        })
        .collect();
    records.extend((0..unsafe_count).map(|i| PromptRecord {
        prompt: Turns::Text(source.unsafe_prompt(i).to_string()),
        safety: true,
    }));
    records.shuffle(rng);
    records
}

/// Distinct held-out tasks, kinds in equal shares so every kind is measured.
fn heldout_tasks(count: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Task>> {
    let mut seen = HashSet::new();
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let kind = TaskKind::ALL[index % TaskKind::ALL.len()];
        let task = (0..10_000)
            .map(|_| sample_task(kind, rng))
            .find(|t| !seen.contains(&t.prompt))
            .with_context(|| format!("cannot find {count} distinct held-out tasks"))?;
        seen.insert(task.prompt.clone());
        tasks.push(task);
    }
    Ok(tasks)
}

fn eval_dialogues(
    count: usize,
    turns: usize,
    source: &Source,
    rng: &mut ChaCha8Rng,
) -> Vec<EvalDialogue> {
    (0..count)
        .map(|_| {
            let instruction = sample_instruction(rng, MAX_COMBINED_INSTRUCTIONS);
            let turns = (0..turns)
                .map(|_| {
                    let task = source.fitting_task(&instruction, rng);
                    EvalTurn {
                        user: task.prompt,
                        answer: task.answer,
                    }
                })
                .collect();
            EvalDialogue {
                system: instruction.text(false),
                instruction,
                turns,
            }
        })
        .collect()
}

/// User turns only: GAtt samples the answers from the model with an instruction in place.
fn gatt_dialogues(
    count: usize,
    turns: usize,
    source: &Source,
    rng: &mut ChaCha8Rng,
) -> Vec<ChatExample> {
    let dialogue = |rng: &mut ChaCha8Rng| {
        (0..turns)
            .map(|_| message(Role::User, &source.task(rng).prompt))
            .collect()
    };
    (0..count)
        .map(|_| ChatExample {
            messages: dialogue(rng),
        })
        .collect()
}

fn to_lines<T: Serialize>(records: &[T]) -> Result<Vec<String>> {
    records
        .iter()
        .map(|r| Ok(serde_json::to_string(r)?))
        .collect()
}

/// Writes the gym into `out` (created if missing) and returns the line count of each file.
/// Refuses to overwrite any existing file; each file appears whole or not at all.
pub fn generate(out: &Path, seed: u64, sizes: &GymSizes) -> Result<GymSummary> {
    if !(0.0..1.0).contains(&sizes.heldout_unsafe_fraction)
        || sizes.eval_tasks < TaskKind::ALL.len()
    {
        bail!(
            "need heldout_unsafe_fraction in [0, 1) and eval_tasks >= {}",
            TaskKind::ALL.len()
        );
    }
    let mut unsafe_prompts = load_unsafe_prompts(&sizes.unsafe_dir)?;
    unsafe_prompts.shuffle(&mut stream_rng(seed, 0));
    let heldout_unsafe_count =
        (unsafe_prompts.len() as f64 * sizes.heldout_unsafe_fraction).round();
    let (heldout_unsafe, train_unsafe) = unsafe_prompts.split_at(heldout_unsafe_count as usize);
    if heldout_unsafe.is_empty() || train_unsafe.is_empty() {
        bail!(
            "{}: too few unsafe prompts to split",
            sizes.unsafe_dir.display()
        );
    }

    let eval_tasks = heldout_tasks(sizes.eval_tasks, &mut stream_rng(seed, 1))?;
    let excluded: HashSet<String> = eval_tasks.iter().map(|t| t.prompt.clone()).collect();
    let heldout = Source {
        heldout_tasks: Some(&eval_tasks),
        excluded: &excluded,
        unsafe_prompts: heldout_unsafe,
    };
    let train = Source {
        heldout_tasks: None,
        excluded: &excluded,
        unsafe_prompts: train_unsafe,
    };

    let rng = |stream| stream_rng(seed, stream);
    let dialogues = eval_dialogues(
        sizes.eval_dialogues,
        sizes.eval_dialogue_turns,
        &heldout,
        &mut rng(2),
    );
    let sft_train = sft_examples(sizes.sft_train, &train, &mut rng(3));
    let sft_val = sft_examples(sizes.sft_val, &heldout, &mut rng(4));
    let pref_train = preference_pairs(
        sizes.pref_train,
        sizes.pref_close_misses,
        &train,
        &mut rng(5),
    );
    let pref_heldout = preference_pairs(sizes.pref_heldout, 0, &heldout, &mut rng(6));
    let prompts_train = prompt_records(sizes.prompts_train, &train, &mut rng(7));
    let prompts_heldout = prompt_records(sizes.prompts_heldout, &heldout, &mut rng(8));
    let gatt = gatt_dialogues(sizes.gatt_dialogues, sizes.gatt_turns, &train, &mut rng(9));
    let eval_unsafe: Vec<UnsafePrompt> = heldout_unsafe
        .iter()
        .map(|p| UnsafePrompt { prompt: p.clone() })
        .collect();
    let instructions: Vec<InstructionEntry> = InstructionKind::ALL
        .iter()
        .map(|&kind| InstructionEntry {
            kind,
            text: kind.text().into(),
            short: kind.short_text().into(),
        })
        .collect();

    let contents = [
        ("sft_train.jsonl", to_lines(&sft_train)?),
        ("sft_val.jsonl", to_lines(&sft_val)?),
        ("pref_train.jsonl", to_lines(&pref_train)?),
        ("pref_heldout.jsonl", to_lines(&pref_heldout)?),
        ("prompts_train.jsonl", to_lines(&prompts_train)?),
        ("prompts_heldout.jsonl", to_lines(&prompts_heldout)?),
        ("eval_tasks.jsonl", to_lines(&eval_tasks)?),
        ("eval_unsafe.jsonl", to_lines(&eval_unsafe)?),
        ("eval_dialogues.jsonl", to_lines(&dialogues)?),
        ("gatt_dialogues.jsonl", to_lines(&gatt)?),
        ("instructions.jsonl", to_lines(&instructions)?),
    ];
    // Checked before writing anything, so a refusal leaves the directory as it was.
    for name in contents.iter().map(|(name, _)| *name).chain([MANIFEST]) {
        let path = out.join(name);
        if path.exists() {
            bail!(
                "{} already exists; refusing to overwrite it",
                path.display()
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut files = BTreeMap::new();
    for (name, lines) in &contents {
        let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
        checkpoint::write_atomic(&out.join(name), text.as_bytes())?;
        files.insert(name.to_string(), lines.len());
    }
    let manifest = Manifest {
        seed,
        sizes,
        files: &files,
    };
    checkpoint::write_atomic(
        &out.join(MANIFEST),
        (serde_json::to_string_pretty(&manifest)? + "\n").as_bytes(),
    )?;
    Ok(GymSummary { files })
}
