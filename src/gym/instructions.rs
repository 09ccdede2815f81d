//! Checkable system instructions for Ghost Attention: each one changes the answer in a way
//! a program can verify, so instruction persistence over many turns can be measured.

use anyhow::{Result, bail};
use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

use super::tasks::Task;

/// One checkable instruction. The declaration order is also the order [`Instruction::apply`]
/// applies them in, so any combination has one well-defined compliant answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstructionKind {
    /// Wraps the answer: `[answer]`.
    Brackets,
    /// Prefixes `Ahoy! `.
    Ahoy,
    /// Suffixes ` !!`.
    Exclaim,
    /// Upper-cases everything, the prefix included (`AHOY! ...`); applied last for that reason.
    Capitals,
}

const AHOY: &str = "Ahoy!";
const EXCLAIM: &str = "!!";

impl InstructionKind {
    pub const ALL: [InstructionKind; 4] = [
        InstructionKind::Brackets,
        InstructionKind::Ahoy,
        InstructionKind::Exclaim,
        InstructionKind::Capitals,
    ];

    pub fn text(self) -> &'static str {
        match self {
            InstructionKind::Ahoy => "Start every answer with Ahoy!",
            InstructionKind::Exclaim => "End every answer with !!",
            InstructionKind::Capitals => "Answer in capital letters.",
            InstructionKind::Brackets => "Wrap every answer in square brackets.",
        }
    }

    /// The short form, so a model also learns to follow a terse system prompt.
    pub fn short_text(self) -> &'static str {
        match self {
            InstructionKind::Ahoy => "Ahoy first.",
            InstructionKind::Exclaim => "End with !!",
            InstructionKind::Capitals => "Capitals.",
            InstructionKind::Brackets => "Brackets.",
        }
    }
}

/// A system instruction of one or more distinct kinds, kept in application order.
/// Serialises as a list of kind names, e.g. `["ahoy","exclaim"]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<InstructionKind>", into = "Vec<InstructionKind>")]
pub struct Instruction {
    pub kinds: Vec<InstructionKind>,
}

impl TryFrom<Vec<InstructionKind>> for Instruction {
    type Error = anyhow::Error;
    fn try_from(kinds: Vec<InstructionKind>) -> Result<Self> {
        Instruction::new(kinds)
    }
}

impl From<Instruction> for Vec<InstructionKind> {
    fn from(instruction: Instruction) -> Self {
        instruction.kinds
    }
}

impl Instruction {
    /// Every combination of distinct kinds is compatible given the fixed application order.
    pub fn new(mut kinds: Vec<InstructionKind>) -> Result<Self> {
        if kinds.is_empty() {
            bail!("an instruction needs at least one kind");
        }
        kinds.sort_unstable();
        if kinds.windows(2).any(|w| w[0] == w[1]) {
            bail!("instruction kinds repeat: {kinds:?}");
        }
        Ok(Instruction { kinds })
    }

    pub fn single(kind: InstructionKind) -> Self {
        Instruction { kinds: vec![kind] }
    }

    fn has(&self, kind: InstructionKind) -> bool {
        self.kinds.contains(&kind)
    }

    /// The system prompt: the kinds' texts joined by spaces.
    pub fn text(&self, short: bool) -> String {
        let texts: Vec<&str> = self
            .kinds
            .iter()
            .map(|k| if short { k.short_text() } else { k.text() })
            .collect();
        texts.join(" ")
    }

    /// The compliant version of a plain answer.
    pub fn apply(&self, answer: &str) -> String {
        let mut out = answer.trim().to_string();
        for kind in &self.kinds {
            out = match kind {
                InstructionKind::Brackets => format!("[{out}]"),
                InstructionKind::Ahoy => format!("{AHOY} {out}"),
                InstructionKind::Exclaim => format!("{out} {EXCLAIM}"),
                InstructionKind::Capitals => out.to_uppercase(),
            };
        }
        out
    }

    /// Whether `answer` follows every component, peeled off in reverse application order.
    pub fn complies(&self, answer: &str) -> bool {
        let mut rest = answer.trim();
        for kind in self.kinds.iter().rev() {
            let peeled = match kind {
                InstructionKind::Capitals => {
                    (!rest.chars().any(char::is_lowercase)).then_some(rest)
                }
                InstructionKind::Exclaim => rest.strip_suffix(EXCLAIM),
                InstructionKind::Ahoy => rest.strip_prefix(AHOY).or_else(|| {
                    let capitalised = AHOY.to_uppercase();
                    self.has(InstructionKind::Capitals)
                        .then(|| rest.strip_prefix(capitalised.as_str()))
                        .flatten()
                }),
                InstructionKind::Brackets => {
                    rest.strip_prefix('[').and_then(|r| r.strip_suffix(']'))
                }
            };
            match peeled {
                Some(r) => rest = r.trim(),
                None => return false,
            }
        }
        true
    }

    /// Whether following this instruction visibly changes the task's answer, so that
    /// compliance means something: capitals only fits answers with lowercase letters.
    pub fn task_fits(&self, task: &Task) -> bool {
        !self.has(InstructionKind::Capitals) || task.answer.chars().any(char::is_lowercase)
    }
}

/// An instruction of 1..=`max_combined` distinct kinds, drawn uniformly.
pub fn sample_instruction<R: Rng + ?Sized>(rng: &mut R, max_combined: usize) -> Instruction {
    let count = rng.random_range(1..=max_combined.clamp(1, InstructionKind::ALL.len()));
    let kinds = InstructionKind::ALL
        .choose_multiple(rng, count)
        .copied()
        .collect();
    Instruction::new(kinds).expect("distinct kinds from choose_multiple")
}
