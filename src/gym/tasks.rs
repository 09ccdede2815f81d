//! Single-turn tasks with exact, programmatically checkable answers, their gold scorer and
//! a near-miss generator for preference pairs.

use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

/// Operands stay small: a 1-5M parameter model trained for minutes cannot learn carries
/// over many digits, and every digit is its own token anyway.
pub const MAX_OPERAND: u32 = 49;

/// The most a wrong answer can score, so that only an exact answer earns 1.0.
pub const NEAR_MISS_CAP: f64 = 0.9;

/// The kinds of single-turn task, each with one fixed phrasing (a tiny model needs that).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// "What is 37 + 12?" -> "49"
    Add,
    /// "What is 37 - 12?" -> "25" (never negative)
    Subtract,
    /// "Reverse the letters: k p a z" -> "z a p k"
    Reverse,
    /// "Sort the letters: k p a z" -> "a k p z"
    Sort,
    /// "How many times does a appear in: a b a c a?" -> "3"
    Count,
    /// "Write in capitals: k p a z" -> "K P A Z"
    Uppercase,
}

impl TaskKind {
    pub const ALL: [TaskKind; 6] = [
        TaskKind::Add,
        TaskKind::Subtract,
        TaskKind::Reverse,
        TaskKind::Sort,
        TaskKind::Count,
        TaskKind::Uppercase,
    ];

    /// Numeric answers get credit by distance; letter answers by edit distance.
    pub fn is_numeric(self) -> bool {
        matches!(self, TaskKind::Add | TaskKind::Subtract | TaskKind::Count)
    }

    /// The kind's name in files and reports (its serde name).
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Add => "add",
            TaskKind::Subtract => "subtract",
            TaskKind::Reverse => "reverse",
            TaskKind::Sort => "sort",
            TaskKind::Count => "count",
            TaskKind::Uppercase => "uppercase",
        }
    }
}

/// One task: the user prompt and its only correct answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub kind: TaskKind,
    pub prompt: String,
    pub answer: String,
}

/// `len` random lowercase letters.
fn random_letters<R: Rng + ?Sized>(rng: &mut R, len: usize) -> Vec<char> {
    (0..len)
        .map(|_| rng.random_range(b'a'..=b'z') as char)
        .collect()
}

/// Letters are written space-separated so the byte-level tokenizer gives each its own token.
fn spaced(letters: &[char]) -> String {
    letters
        .iter()
        .map(char::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A random task of `kind` with its correct answer.
pub fn sample_task<R: Rng + ?Sized>(kind: TaskKind, rng: &mut R) -> Task {
    let (prompt, answer) = match kind {
        TaskKind::Add => {
            let (a, b) = (
                rng.random_range(0..=MAX_OPERAND),
                rng.random_range(0..=MAX_OPERAND),
            );
            (format!("What is {a} + {b}?"), (a + b).to_string())
        }
        TaskKind::Subtract => {
            let a = rng.random_range(0..=MAX_OPERAND);
            let b = rng.random_range(0..=a);
            (format!("What is {a} - {b}?"), (a - b).to_string())
        }
        TaskKind::Reverse | TaskKind::Sort | TaskKind::Uppercase => {
            let len = rng.random_range(3..=6);
            let letters = random_letters(rng, len);
            let mut result = letters.clone();
            let phrase = match kind {
                TaskKind::Reverse => {
                    result.reverse();
                    "Reverse the letters"
                }
                TaskKind::Sort => {
                    result.sort_unstable();
                    "Sort the letters"
                }
                _ => {
                    result.iter_mut().for_each(|c| *c = c.to_ascii_uppercase());
                    "Write in capitals"
                }
            };
            (format!("{phrase}: {}", spaced(&letters)), spaced(&result))
        }
        TaskKind::Count => {
            // Draw from a 3-letter alphabet so the target usually repeats (and may be absent).
            let alphabet = random_letters(rng, 3);
            let len = rng.random_range(4..=7);
            let letters: Vec<char> = (0..len).map(|_| *alphabet.choose(rng).unwrap()).collect();
            let target = *alphabet.choose(rng).unwrap();
            let count = letters.iter().filter(|&&c| c == target).count();
            let prompt = format!(
                "How many times does {target} appear in: {}?",
                spaced(&letters)
            );
            (prompt, count.to_string())
        }
    };
    Task {
        kind,
        prompt,
        answer,
    }
}

/// A task of a uniformly chosen kind.
pub fn sample_any_task<R: Rng + ?Sized>(rng: &mut R) -> Task {
    sample_task(*TaskKind::ALL.choose(rng).unwrap(), rng)
}

/// The task `prompt` states, with its correct answer, for any prompt in the gym's phrasing
/// (the gold checker of answers to prompts the gym did not keep answers for, such as the
/// rejection-sampling prompts); `None` for anything else, an unsafe prompt for one.
pub fn solve(prompt: &str) -> Option<Task> {
    let letters = |text: &str| -> Option<Vec<char>> {
        let items: Vec<&str> = text.split(' ').collect();
        items
            .iter()
            .all(|l| l.len() == 1 && l.as_bytes()[0].is_ascii_lowercase())
            .then(|| items.iter().map(|l| l.as_bytes()[0] as char).collect())
    };
    let task = |kind, answer: String| {
        Some(Task {
            kind,
            prompt: prompt.to_string(),
            answer,
        })
    };
    if let Some(rest) = prompt
        .strip_prefix("What is ")
        .and_then(|r| r.strip_suffix('?'))
    {
        let (a, op, b) = {
            let mut parts = rest.split(' ');
            (parts.next()?, parts.next()?, parts.next()?)
        };
        let (a, b): (i64, i64) = (a.parse().ok()?, b.parse().ok()?);
        return match op {
            "+" => task(TaskKind::Add, (a + b).to_string()),
            "-" => task(TaskKind::Subtract, (a - b).to_string()),
            _ => None,
        };
    }
    if let Some(rest) = prompt
        .strip_prefix("How many times does ")
        .and_then(|r| r.strip_suffix('?'))
    {
        let (target, text) = rest.split_once(" appear in: ")?;
        let target = letters(target)?;
        let count = letters(text)?.iter().filter(|&&c| c == target[0]).count();
        return task(TaskKind::Count, count.to_string());
    }
    let (phrase, text) = prompt.split_once(": ")?;
    let mut result = letters(text)?;
    let kind = match phrase {
        "Reverse the letters" => {
            result.reverse();
            TaskKind::Reverse
        }
        "Sort the letters" => {
            result.sort_unstable();
            TaskKind::Sort
        }
        "Write in capitals" => {
            result.iter_mut().for_each(|c| *c = c.to_ascii_uppercase());
            TaskKind::Uppercase
        }
        _ => return None,
    };
    task(kind, spaced(&result))
}

/// Exact after trimming surrounding whitespace; inner spacing must match too.
pub fn exact_match(gold: &str, answer: &str) -> bool {
    gold.trim() == answer.trim()
}

/// Gold score in [0, 1]: 1.0 iff exact, partial credit (below [`NEAR_MISS_CAP`]) otherwise.
pub fn score(kind: TaskKind, gold: &str, answer: &str) -> f64 {
    if exact_match(gold, answer) {
        return 1.0;
    }
    let credit = if kind.is_numeric() {
        match (gold.trim().parse::<i64>(), answer.trim().parse::<i64>()) {
            (Ok(g), Ok(a)) => 1.0 - (g - a).abs() as f64 / g.abs().max(1) as f64,
            _ => 0.0,
        }
    } else {
        let gold_items: Vec<&str> = gold.split_whitespace().collect();
        let answer_items: Vec<&str> = answer.split_whitespace().collect();
        let longest = gold_items.len().max(answer_items.len()).max(1);
        1.0 - edit_distance(&gold_items, &answer_items) as f64 / longest as f64
    };
    credit.clamp(0.0, NEAR_MISS_CAP)
}

/// Levenshtein distance over items (letters here), one substitution, insertion or deletion each.
fn edit_distance<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(x != y);
            current[j + 1] = substitute.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// A wrong answer for `task`. The kinds of mistake vary (off by one, a swapped or dropped
/// letter, something unrelated) so that gold-score gaps in preference pairs cover the range.
pub fn near_miss<R: Rng + ?Sized>(task: &Task, rng: &mut R) -> String {
    for _ in 0..32 {
        let candidate = if task.kind.is_numeric() {
            numeric_miss(&task.answer, rng)
        } else {
            letter_miss(task, rng)
        };
        if !exact_match(&task.answer, &candidate) {
            return candidate;
        }
    }
    // Only reached by very unlucky draws: one extra item is always wrong.
    format!(
        "{} {}",
        task.answer.trim(),
        if task.kind.is_numeric() { "1" } else { "a" }
    )
}

/// A wrong answer one small slip from the gold one, the kind the policy itself makes: a
/// number off by 1-3 or by 10, or two neighbouring letters swapped or one letter replaced.
/// Telling these from the gold answer is what best-of-K selection needs of a reward model
/// (docs/results.md, rejection sampling); the broader [`near_miss`] rarely asks it.
pub fn close_miss<R: Rng + ?Sized>(task: &Task, rng: &mut R) -> String {
    loop {
        let candidate = if task.kind.is_numeric() {
            let gold: i64 = task.answer.trim().parse().unwrap_or(0);
            let steps: &[i64] = if task.kind == TaskKind::Count {
                &[1, 1, 2]
            } else {
                &[1, 1, 2, 3, 10]
            };
            let step = *steps.choose(rng).unwrap();
            let step = if rng.random_bool(0.5) { step } else { -step };
            // A count or a difference is never negative: slip the other way.
            (if gold + step < 0 {
                gold - step
            } else {
                gold + step
            })
            .to_string()
        } else {
            let mut items = answer_letters(task);
            let i = rng.random_range(0..items.len());
            if rng.random_bool(0.5) && items.len() >= 2 {
                let i = i.min(items.len() - 2);
                items.swap(i, i + 1);
            } else {
                items[i] = random_letter_for(task, rng);
            }
            spaced(&items)
        };
        // A swap of equal letters or a replacement by the same letter changes nothing.
        if !exact_match(&task.answer, &candidate) {
            return candidate;
        }
    }
}

fn numeric_miss<R: Rng + ?Sized>(gold: &str, rng: &mut R) -> String {
    let gold: i64 = gold.trim().parse().unwrap_or(0);
    let sign = if gold == 0 || rng.random_bool(0.5) {
        1
    } else {
        -1
    };
    match rng.random_range(0..5) {
        0 => (gold + sign).to_string(),
        1 => (gold + sign * rng.random_range(2..=5)).to_string(),
        2 => (gold + 10).to_string(),
        3 => rng.random_range(0..=2 * MAX_OPERAND as i64).to_string(),
        _ => spaced(&random_letters(rng, 2)),
    }
}

/// The letters of a letter task's gold answer.
fn answer_letters(task: &Task) -> Vec<char> {
    task.answer
        .split_whitespace()
        .filter_map(|s| s.chars().next())
        .collect()
}

/// A random letter in the case of `task`'s answers.
fn random_letter_for<R: Rng + ?Sized>(task: &Task, rng: &mut R) -> char {
    let c = rng.random_range(b'a'..=b'z') as char;
    if task.kind == TaskKind::Uppercase {
        c.to_ascii_uppercase()
    } else {
        c
    }
}

fn letter_miss<R: Rng + ?Sized>(task: &Task, rng: &mut R) -> String {
    let mut items = answer_letters(task);
    let random_letter = |rng: &mut R| random_letter_for(task, rng);
    match rng.random_range(0..6) {
        0 if items.len() >= 2 => {
            let i = rng.random_range(0..items.len() - 1);
            items.swap(i, i + 1);
        }
        1 if items.len() >= 2 => {
            items.remove(rng.random_range(0..items.len()));
        }
        2 => {
            let i = rng.random_range(0..items.len().max(1));
            let letter = random_letter(rng);
            if items.is_empty() {
                items.push(letter)
            } else {
                items[i] = letter
            }
        }
        3 => {
            let letter = random_letter(rng);
            items.insert(rng.random_range(0..=items.len()), letter);
        }
        4 => {
            // The input letters unchanged: what a model that ignores the operation writes.
            let input = task.prompt.rsplit(": ").next().unwrap_or("");
            return input.to_string();
        }
        _ => items = (0..items.len()).map(|_| random_letter(rng)).collect(),
    }
    spaced(&items)
}
