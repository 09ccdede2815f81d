//! Ghost Attention (Llama 2 sec. 3.3): teaches a chat model to keep a system instruction for
//! the whole dialogue.
//!
//! 1. For each dialogue, draw an instruction: one to `max_combined` entries of the instruction
//!    list, randomly combined, a share of them in their short form.
//! 2. Sample every assistant turn from the current model with the instruction given at every
//!    user turn (as a system message before it), so the answers follow it.
//! 3. Build training samples with the instruction only before the first user turn, and the
//!    loss zeroed on every earlier turn, assistant answers included: one sample per dialogue
//!    prefix, each training its final answer.
//! 4. Fine-tune on those samples (plus any SFT data mixed in) with the SFT recipe.
//!
//! The samples are written to `OUT/gatt_samples.jsonl` before training, so they can be read,
//! and a resumed run trains on the same ones.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use burn::module::Module;

use crate::config::{ModelConfig, OptimConfig, StageConfig, TrainConfig};
use crate::data::chat::{self, Message, Role};
use crate::data::tokenizer::Tokenizer;
use crate::infer::generate::{self, FinishReason, SamplingParams};
use crate::interop::checkpoint;
use crate::model::Llama;
use crate::stages::sft::{self, Sft, SftConfig, SftDataConfig};
use crate::train::stage::{self, Launch, Stage, TrainingConfig};
use crate::train::supervised::RunSummary;

pub const SAMPLES_FILE: &str = "gatt_samples.jsonl";

/// How GAtt samples are made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GattSection {
    /// JSONL dialogues (`{"messages"}`); their user turns are kept, assistant turns are
    /// sampled anew.
    pub dialogues: Vec<PathBuf>,
    /// JSONL instruction list: `{"text": "...", "short": "..."}` per line (`short` optional).
    pub instructions: PathBuf,
    /// Most instructions combined into one.
    pub max_combined: usize,
    /// Share of instructions given in their short form (the paper shortens some).
    pub short_fraction: f64,
    /// Sampling of the assistant turns (temperature 0: greedy).
    pub temperature: f64,
    pub top_p: f64,
    pub max_answer_tokens: usize,
    /// Dialogues generated together.
    pub batch_size: usize,
    pub seed: u64,
    /// An answer cut at `max_answer_tokens` (or the context): `drop` leaves its sample out,
    /// `keep` trains it without the end-of-turn marker. Either way later turns see it as
    /// context only; it is never trained as if complete.
    #[serde(default)]
    pub cut_answers: CutAnswers,
}

/// What GAtt does with a sampled answer that did not end with the stop token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CutAnswers {
    #[default]
    Drop,
    Keep,
}

/// A GAtt run: the SFT recipe's sections, `[data]` naming SFT files to mix in (may be
/// empty), and `[gatt]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GattConfig {
    pub model: ModelConfig,
    pub data: SftDataConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub gatt: GattSection,
}

impl Default for GattConfig {
    fn default() -> Self {
        let sft = SftConfig::default();
        Self {
            model: sft.model,
            data: sft.data,
            optim: sft.optim,
            train: sft.train,
            gatt: GattSection {
                dialogues: Vec::new(),
                instructions: PathBuf::new(),
                max_combined: 2,
                short_fraction: 0.3,
                temperature: 0.0,
                top_p: 1.0,
                max_answer_tokens: 64,
                batch_size: 32,
                seed: 0,
                cut_answers: CutAnswers::Drop,
            },
        }
    }
}

impl StageConfig for GattConfig {
    fn validate(&self) -> Result<()> {
        let g = &self.gatt;
        if g.dialogues.is_empty() {
            bail!("gatt.dialogues must name at least one JSONL file");
        }
        if g.instructions.as_os_str().is_empty() {
            bail!("gatt.instructions must name the instruction list (JSONL)");
        }
        if g.max_combined == 0 {
            bail!("gatt.max_combined must be at least 1");
        }
        if !(0.0..=1.0).contains(&g.short_fraction) {
            bail!("gatt.short_fraction must be in [0, 1]");
        }
        if !(g.temperature >= 0.0) || !(g.top_p > 0.0 && g.top_p <= 1.0) {
            bail!("gatt.temperature must be non-negative and gatt.top_p in (0, 1]");
        }
        if g.batch_size == 0 || g.max_answer_tokens == 0 {
            bail!("gatt.batch_size and gatt.max_answer_tokens must be at least 1");
        }
        self.optim.validate()?;
        self.train.validate()
    }

    fn known_keys() -> toml::Table {
        let mut known = toml::Table::try_from(Self::default()).expect("serialises");
        known.insert("model".into(), SftConfig::known_keys()["model"].clone());
        known
    }
}

impl GattConfig {
    /// The SFT run that trains on `samples` plus the configured SFT files.
    pub fn sft(&self, samples: &Path) -> SftConfig {
        SftConfig::on_samples(self, &self.data, samples)
    }
}

/// One entry of the instruction list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstructionText {
    pub text: String,
    #[serde(default)]
    pub short: Option<String>,
}

pub fn read_instructions(path: &Path) -> Result<Vec<InstructionText>> {
    let read = chat::read_jsonl(path, false, |line| {
        let entry: InstructionText = serde_json::from_str(line)
            .map_err(|e| anyhow!("expected {{\"text\", \"short\"}}: {e}"))?;
        if entry.text.trim().is_empty() {
            bail!("empty instruction text");
        }
        Ok(entry)
    })?;
    if read.records.is_empty() {
        bail!("{}: no instructions", path.display());
    }
    Ok(read.records)
}

/// A random combination of 1..=`max_combined` distinct instructions, each in its short form
/// with probability `short_fraction`.
pub fn draw_instruction(
    list: &[InstructionText],
    max_combined: usize,
    short_fraction: f64,
    rng: &mut impl Rng,
) -> String {
    let n = rng.random_range(1..=max_combined.min(list.len()));
    let mut picked: Vec<&InstructionText> = list.choose_multiple(rng, n).collect();
    picked.shuffle(rng);
    picked
        .iter()
        .map(|i| match &i.short {
            Some(short) if rng.random_bool(short_fraction) => short.clone(),
            _ => i.text.clone(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The user turns of one dialogue line (`{"messages"}`; assistant turns, if any, are
/// ignored since GAtt samples them anew).
pub fn parse_user_turns(line: &str) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Dialogue {
        messages: Vec<Message>,
    }
    let dialogue: Dialogue =
        serde_json::from_str(line).map_err(|e| anyhow!("expected {{\"messages\": [...]}}: {e}"))?;
    let users: Vec<String> = dialogue
        .messages
        .into_iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.content)
        .collect();
    if users.is_empty() {
        bail!("no user message");
    }
    Ok(users)
}

/// The dialogue the model answers at turn `answers.len()`: the instruction as a system
/// message before every user turn (sampling sees it at every turn).
pub fn sampling_prompt(instruction: &str, users: &[String], answers: &[String]) -> Vec<Message> {
    let mut messages = Vec::new();
    for (i, user) in users.iter().enumerate().take(answers.len() + 1) {
        messages.push(Message::system(instruction));
        messages.push(Message::user(user.clone()));
        if let Some(answer) = answers.get(i) {
            messages.push(Message::assistant(answer.clone()));
        }
    }
    messages
}

/// The training samples of one dialogue: for each prefix of `k` turns, the instruction only
/// before the first user turn and the loss only on the `k`-th answer. `complete[i]` says
/// whether answer `i` ended with the stop token; a cut answer's own sample is left out
/// (`drop`) or trains it without its end marker (`keep`). In later samples it is context
/// only (weight 0), so it is never trained as if complete.
pub fn training_samples(
    instruction: &str,
    users: &[String],
    answers: &[String],
    complete: &[bool],
    cut_answers: CutAnswers,
) -> Vec<Vec<Message>> {
    (1..=answers.len())
        .filter(|&k| complete[k - 1] || cut_answers == CutAnswers::Keep)
        .map(|k| {
            let mut messages = vec![Message::system(instruction)];
            for i in 0..k {
                messages.push(Message::user(users[i].clone()));
                let mut answer = Message::assistant(answers[i].clone());
                if i + 1 < k {
                    answer.weight = Some(0);
                } else {
                    answer.complete = complete[i];
                }
                messages.push(answer);
            }
            messages
        })
        .collect()
}

/// GAtt as a stage: the `--init` chat model samples the data, then trains on it. The run
/// stores the GAtt configuration, so `--resume` needs nothing else.
pub struct Gatt;

crate::training_config!(GattConfig);

impl Stage for Gatt {
    type Config = GattConfig;
    type Model = Llama;
    const COMMAND: &'static str = "gatt";
}

/// Samples the GAtt data with the `--init` model (unless a resumed run has it already), then
/// fine-tunes on it with the SFT recipe.
pub fn run(launch: &Launch) -> Result<RunSummary> {
    let started = stage::launch::<Gatt>(launch)?;
    let samples_path = started.run.path.join(SAMPLES_FILE);
    let config = started.config.clone();
    let resumed = started.run.resume_from.is_some();
    if resumed && !samples_path.is_file() {
        bail!("--resume: {} is missing", samples_path.display());
    }
    // Worker 0 samples and writes the data; the others read it once it is there.
    if !resumed && launch.collective.is_writer() {
        // Every input is read and checked before sampling, and the samples go to a new file
        // renamed into place: a failed run leaves an earlier samples file as it was.
        let inputs = GattInputs::read(&config)?;
        let model = started.model.valid();
        let sampled = sample(&config, &inputs, &model, &started.tokenizer)?;
        let lines: Vec<String> = sampled
            .samples
            .iter()
            .map(|messages| serde_json::json!({ "messages": messages }).to_string())
            .collect();
        checkpoint::write_atomic(&samples_path, (lines.join("\n") + "\n").as_bytes())?;
        eprintln!(
            "wrote {} GAtt samples to {} ({} answers cut at gatt.max_answer_tokens or the context: {}; {} dialogues ended early, their next prompt filling the context)",
            sampled.samples.len(),
            samples_path.display(),
            sampled.cut_answers,
            match config.gatt.cut_answers {
                CutAnswers::Drop => "dropped",
                CutAnswers::Keep => "kept without their end marker",
            },
            sampled.ended_by_context
        );
    }
    launch.collective.barrier()?;
    let sft_started = started.with_config::<Sft>(config.sft(&samples_path));
    sft::train(sft_started, launch, config.to_toml())
}

/// The instruction list and the user turns of the dialogues, read and checked.
pub struct GattInputs {
    pub instructions: Vec<InstructionText>,
    pub users: Vec<Vec<String>>,
}

impl GattInputs {
    pub fn read(config: &GattConfig) -> Result<Self> {
        let g = &config.gatt;
        let instructions = read_instructions(&g.instructions)?;
        let users = chat::read_all(&g.dialogues, config.data.skip_bad_lines, parse_user_turns)?;
        // The SFT files to mix in are read again by the SFT recipe; reading them now finds a
        // bad line before the (slow) sampling.
        if !config.data.train.is_empty() {
            sft::read_dialogues(&config.data.train, config.data.skip_bad_lines)?;
        }
        if !config.data.val.is_empty() {
            sft::read_dialogues(&config.data.val, config.data.skip_bad_lines)?;
        }
        Ok(Self {
            instructions,
            users,
        })
    }
}

/// The training samples, how many sampled answers were cut, and how many dialogues ended
/// early because their next prompt filled the model's context.
pub struct Sampled {
    pub samples: Vec<Vec<Message>>,
    pub cut_answers: usize,
    pub ended_by_context: usize,
}

/// Steps 1-3: the training samples, sampled from `model`. An answer that was cut (no stop
/// token) is dropped or kept without its end marker, as `gatt.cut_answers` says.
pub fn sample(
    config: &GattConfig,
    inputs: &GattInputs,
    model: &Llama,
    tokenizer: &Tokenizer,
) -> Result<Sampled> {
    let g = &config.gatt;
    let users = &inputs.users;
    let template = config.data.template;
    template.check(tokenizer)?;
    let mut rng = ChaCha8Rng::seed_from_u64(g.seed);
    let chosen: Vec<String> = users
        .iter()
        .map(|_| {
            draw_instruction(
                &inputs.instructions,
                g.max_combined,
                g.short_fraction,
                &mut rng,
            )
        })
        .collect();
    let params = SamplingParams {
        temperature: g.temperature,
        top_p: g.top_p,
        min_p: 0.0,
        max_tokens: g.max_answer_tokens,
    };
    let turns = users.iter().map(Vec::len).max().unwrap_or(0);
    eprintln!(
        "GAtt: sampling {} dialogues of up to {turns} turns",
        users.len()
    );
    let mut answers: Vec<Vec<String>> = vec![Vec::new(); users.len()];
    let mut complete: Vec<Vec<bool>> = vec![Vec::new(); users.len()];
    // Dialogues whose next prompt fills the model's context end there.
    let mut ended = vec![false; users.len()];
    for turn in 0..turns {
        let mut active = Vec::new();
        let mut prompts: Vec<Vec<Message>> = Vec::new();
        for i in 0..users.len() {
            if users[i].len() <= turn || ended[i] {
                continue;
            }
            let prompt = sampling_prompt(&chosen[i], &users[i], &answers[i]);
            if template.encode_prompt(tokenizer, &prompt)?.len() >= model.config.max_seq_len {
                ended[i] = true;
                continue;
            }
            active.push(i);
            prompts.push(prompt);
        }
        let outs = generate::complete_chat(
            model,
            tokenizer,
            template,
            &prompts,
            &params,
            g.batch_size,
            &mut rng,
        )?;
        for (&i, out) in active.iter().zip(outs) {
            complete[i].push(out.generated.finish == FinishReason::Eos);
            answers[i].push(out.text);
        }
        eprintln!("GAtt: turn {} of {turns} sampled", turn + 1);
    }
    let samples = users
        .iter()
        .zip(&answers)
        .zip(&chosen)
        .zip(&complete)
        .flat_map(|(((u, a), inst), c)| training_samples(inst, u, a, c, g.cut_answers))
        .collect();
    Ok(Sampled {
        samples,
        cut_answers: complete.iter().flatten().filter(|&&c| !c).count(),
        ended_by_context: ended.iter().filter(|&&e| e).count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_put_the_instruction_first_and_train_only_the_last_answer() {
        let users: Vec<String> = ["u1", "u2", "u3"].map(String::from).to_vec();
        let answers: Vec<String> = ["a1", "a2", "a3"].map(String::from).to_vec();
        // Sampling sees the instruction before every user turn.
        let prompt = sampling_prompt("Be brief.", &users, &answers[..2]);
        let systems = prompt.iter().filter(|m| m.role == Role::System).count();
        assert_eq!(systems, 3);
        assert_eq!(prompt.last().unwrap(), &Message::user("u3"));
        // Training: one sample per prefix, instruction once at the start, earlier answers
        // weighted 0.
        let all = [true; 3];
        let samples = training_samples("Be brief.", &users, &answers, &all, CutAnswers::Drop);
        assert_eq!(samples.len(), 3);
        for (k, sample) in samples.iter().enumerate() {
            assert_eq!(sample[0], Message::system("Be brief."));
            assert_eq!(sample.iter().filter(|m| m.role == Role::System).count(), 1);
            let trained: Vec<&str> = sample
                .iter()
                .filter(|m| m.trained())
                .map(|m| m.content.as_str())
                .collect();
            assert_eq!(trained, vec![answers[k].as_str()]);
            assert_eq!(sample.len(), 1 + 2 * (k + 1));
            assert!(sample.iter().all(|m| m.complete));
        }
        // A cut second answer: `drop` leaves its sample out; `keep` marks it in its own sample
        // only, which renders without the end marker. The third sample has it as context
        // (weight 0, complete).
        let cut = [true, false, true];
        let dropped = training_samples("Be brief.", &users, &answers, &cut, CutAnswers::Drop);
        assert_eq!(dropped.len(), 2);
        assert_eq!(dropped[1].last().unwrap().content, "a3");
        let samples = training_samples("Be brief.", &users, &answers, &cut, CutAnswers::Keep);
        assert_eq!(samples.len(), 3);
        assert!(
            samples[1]
                .last()
                .is_some_and(|m| !m.complete && m.trained())
        );
        assert!(samples[2].iter().all(|m| m.complete));
        assert!(!samples[2][4].trained());
        let tok = crate::data::tokenizer::Tokenizer::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/data/shakespeare/tokenizer.json"
        )))
        .unwrap();
        let cut = crate::data::chat::ChatTemplate::Llama2
            .encode(&tok, &samples[1])
            .unwrap();
        let whole = crate::data::chat::ChatTemplate::Llama2
            .encode(
                &tok,
                &training_samples("Be brief.", &users, &answers, &all, CutAnswers::Keep)[1],
            )
            .unwrap();
        assert_eq!(whole.tokens.last(), Some(&tok.eos_id));
        assert_eq!(&whole.tokens[..whole.tokens.len() - 1], &cut.tokens[..]);
        assert_ne!(cut.tokens.last(), Some(&tok.eos_id));
    }

    #[test]
    fn instructions_are_combined_and_sometimes_shortened() {
        let list = vec![
            InstructionText {
                text: "Long A.".into(),
                short: Some("A.".into()),
            },
            InstructionText {
                text: "Long B.".into(),
                short: Some("B.".into()),
            },
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let drawn: Vec<String> = (0..400)
            .map(|_| draw_instruction(&list, 2, 0.5, &mut rng))
            .collect();
        for text in ["Long A.", "A.", "Long A. Long B.", "B. Long A.", "A. B."] {
            assert!(drawn.iter().any(|d| d == text), "{text} never drawn");
        }
        let single: Vec<String> = (0..50)
            .map(|_| draw_instruction(&list, 1, 0.0, &mut rng))
            .collect();
        assert!(single.iter().all(|d| d == "Long A." || d == "Long B."));
    }
}
