//! Chat data: the JSONL formats of the fine-tuning stages (Hugging Face TRL's conventions) and
//! the chat templates that turn a dialogue into tokens and a loss mask.
//!
//! - SFT: `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "completion"}`.
//! - Preferences: `{"prompt", "chosen", "rejected", "rating", "safety"}`.
//! - Prompts for sampling: `{"prompt", "safety"}`.
//!
//! Prompts and answers may be strings or message lists. Reading streams the file line by line
//! and validates each record; a malformed line is reported as `FILE:LINE: what is wrong`.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::data::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Assistant messages only: 0 leaves the message out of the loss (axolotl's convention;
    /// Ghost Attention uses it for earlier turns). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// Assistant messages only, the last of a dialogue: false for an answer cut before its
    /// end (generation hit a length limit). It is rendered without the end-of-turn marker, so
    /// the model is not taught to stop where the answer was cut. Default true.
    #[serde(default = "complete_by_default", skip_serializing_if = "is_complete")]
    pub complete: bool,
}

fn complete_by_default() -> bool {
    true
}

fn is_complete(complete: &bool) -> bool {
    *complete
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            weight: None,
            complete: true,
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// Whether the loss covers this message (assistant messages whose weight is not 0).
    pub fn trained(&self) -> bool {
        self.role == Role::Assistant && self.weight != Some(0)
    }
}

/// A prompt or an answer: plain text (a user prompt, an assistant answer) or messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Turns {
    Text(String),
    Messages(Vec<Message>),
}

impl Turns {
    /// The text: a plain string as is, messages' contents joined by newlines.
    pub fn into_text(self) -> String {
        match self {
            Turns::Text(text) => text,
            Turns::Messages(messages) => messages
                .into_iter()
                .map(|m| m.content)
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// The messages, a plain string becoming one message of `role`.
    pub fn into_messages(self, role: Role) -> Vec<Message> {
        match self {
            Turns::Text(text) => vec![Message::new(role, text)],
            Turns::Messages(messages) => messages,
        }
    }
}

/// One line of an SFT file.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SftRecord {
    Messages { messages: Vec<Message> },
    PromptCompletion { prompt: Turns, completion: Turns },
}

/// Checks that `messages` is a dialogue a chat template can render: system messages only
/// before a user message, users and assistants alternating, starting with a user message.
/// `ends_with_assistant`: an SFT sample (true) or a prompt awaiting an answer (false).
pub fn validate_dialogue(messages: &[Message], ends_with_assistant: bool) -> Result<()> {
    if messages.is_empty() {
        bail!("no messages");
    }
    let mut expect_user = true;
    for (i, m) in messages.iter().enumerate() {
        if let Some(w) = m.weight {
            if w > 1 {
                bail!("message {i}: weight must be 0 or 1");
            }
            if m.role != Role::Assistant {
                bail!("message {i}: only assistant messages take a weight");
            }
        }
        if !m.complete && (m.role != Role::Assistant || i + 1 != messages.len()) {
            bail!("message {i}: only the last message, an assistant's, may be incomplete");
        }
        match m.role {
            Role::System if expect_user => {}
            Role::System => bail!("message {i}: a system message must come before a user message"),
            Role::User if expect_user => expect_user = false,
            Role::Assistant if !expect_user => expect_user = true,
            role => bail!(
                "message {i}: expected {} but found {role:?}",
                if expect_user {
                    "a user message"
                } else {
                    "an assistant message"
                }
            ),
        }
    }
    match (ends_with_assistant, expect_user) {
        (true, false) => bail!("the last message must be an assistant message"),
        (false, true) => bail!("the last message must be a user message"),
        _ => Ok(()),
    }
}

/// A prompt (user turns) followed by an answer (assistant turns), as one dialogue.
pub fn prompt_and_answer(prompt: &Turns, answer: &Turns) -> Vec<Message> {
    let mut messages = prompt.clone().into_messages(Role::User);
    messages.extend(answer.clone().into_messages(Role::Assistant));
    messages
}

/// Parses one SFT line into a validated dialogue.
pub fn parse_sft(line: &str) -> Result<Vec<Message>> {
    let record: SftRecord = parse_json(
        line,
        "expected {\"messages\": [...]} or {\"prompt\", \"completion\"}",
    )?;
    let messages = match record {
        SftRecord::Messages { messages } => messages,
        SftRecord::PromptCompletion { prompt, completion } => {
            let mut messages = prompt.into_messages(Role::User);
            messages.extend(completion.into_messages(Role::Assistant));
            messages
        }
    };
    validate_dialogue(&messages, true)?;
    if !messages.iter().any(Message::trained) {
        bail!("no assistant message is trained (all have weight 0)");
    }
    Ok(messages)
}

/// How much better the chosen answer of a preference pair is (Llama 2's four-point scale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rating {
    SignificantlyBetter,
    Better,
    SlightlyBetter,
    NegligiblyBetter,
}

/// One preference pair: a prompt and two answers, the first preferred.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    pub prompt: Turns,
    pub chosen: Turns,
    pub rejected: Turns,
    pub rating: Rating,
    /// A pair of the safety set (Safety RM data), as opposed to helpfulness.
    #[serde(default)]
    pub safety: bool,
}

pub fn parse_preference(line: &str) -> Result<PreferencePair> {
    let pair: PreferencePair = parse_json(
        line,
        "expected {\"prompt\", \"chosen\", \"rejected\", \"rating\", \"safety\"}",
    )?;
    let prompt = pair.prompt.clone().into_messages(Role::User);
    validate_dialogue(&prompt, false).map_err(|e| anyhow!("prompt: {e}"))?;
    for (name, answer) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
        let mut dialogue = prompt.clone();
        dialogue.extend(answer.clone().into_messages(Role::Assistant));
        validate_dialogue(&dialogue, true).map_err(|e| anyhow!("{name}: {e}"))?;
    }
    Ok(pair)
}

/// A prompt to sample answers for (rejection sampling, PPO).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    pub prompt: Turns,
    #[serde(default)]
    pub safety: bool,
}

pub fn parse_prompt(line: &str) -> Result<PromptRecord> {
    let record: PromptRecord = parse_json(line, "expected {\"prompt\", \"safety\"}")?;
    validate_dialogue(&record.prompt.clone().into_messages(Role::User), false)
        .map_err(|e| anyhow!("prompt: {e}"))?;
    Ok(record)
}

fn parse_json<T: DeserializeOwned>(line: &str, expected: &str) -> Result<T> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| anyhow!("not valid JSON: {}", strip_position(&e)))?;
    if !value.is_object() {
        bail!("not a JSON object ({expected})");
    }
    serde_json::from_value(value).map_err(|e| {
        let message = strip_position(&e);
        if message.starts_with("data did not match any variant") {
            anyhow!("{expected}")
        } else {
            anyhow!("{message}")
        }
    })
}

/// serde_json's message without its " at line 1 column N" (the line is ours to name).
fn strip_position(e: &serde_json::Error) -> String {
    let message = e.to_string();
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message,
    }
}

/// What reading a JSONL file produced.
pub struct JsonlRecords<T> {
    pub records: Vec<T>,
    /// The line (1-based) each record was read from.
    pub lines: Vec<usize>,
    /// Malformed lines skipped (only with `skip_bad_lines`), with their first error.
    pub skipped: usize,
    pub first_error: Option<String>,
}

/// Reads a JSONL file line by line, parsing each non-blank line with `parse`. A malformed line
/// is an error `FILE:LINE: what is wrong`, or, with `skip_bad_lines`, counted and skipped.
pub fn read_jsonl<T>(
    path: &Path,
    skip_bad_lines: bool,
    parse: impl Fn(&str) -> Result<T>,
) -> Result<JsonlRecords<T>> {
    let file =
        std::fs::File::open(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let mut out = JsonlRecords {
        records: Vec::new(),
        lines: Vec::new(),
        skipped: 0,
        first_error: None,
    };
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| anyhow!("{}:{}: cannot read: {e}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        match parse(&line) {
            Ok(record) => {
                out.records.push(record);
                out.lines.push(i + 1);
            }
            Err(e) => {
                let message = format!("{}:{}: {e}", path.display(), i + 1);
                if !skip_bad_lines {
                    bail!("{message}");
                }
                out.skipped += 1;
                out.first_error.get_or_insert(message);
            }
        }
    }
    Ok(out)
}

/// Reads several JSONL files of one kind (a stage's `[data]` files, which
/// `data.skip_bad_lines` applies to), printing how many lines were skipped.
pub fn read_all<T>(
    paths: &[PathBuf],
    skip_bad_lines: bool,
    parse: impl Fn(&str) -> Result<T> + Copy,
) -> Result<Vec<T>> {
    let mut records = Vec::new();
    for path in paths {
        // Only the stages that read through here can skip lines, so only they suggest it,
        // and only for a malformed line (not for a file that cannot be opened).
        let read = read_jsonl(path, skip_bad_lines, parse).map_err(|e| {
            if path.is_file() {
                anyhow!("{e:#} (set data.skip_bad_lines = true to skip malformed lines)")
            } else {
                e
            }
        })?;
        if read.skipped > 0 {
            eprintln!(
                "skipped {} malformed line(s) of {} (first: {})",
                read.skipped,
                path.display(),
                read.first_error.unwrap_or_default()
            );
        }
        if read.records.is_empty() {
            bail!("{}: no usable records", path.display());
        }
        records.extend(read.records);
    }
    Ok(records)
}

/// How a dialogue is laid out in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ChatTemplate {
    /// Llama 2 chat: `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer}</s>`,
    /// one `<s>...</s>` per turn.
    #[default]
    Llama2,
    /// ChatML (`<|im_start|>role\n...<|im_end|>`), as SmolLM2 and Qwen use.
    Chatml,
}

/// A dialogue in tokens, with the tokens the loss covers marked.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedDialogue {
    pub tokens: Vec<u32>,
    /// `trained[i]`: token `i` belongs to a trained assistant answer (or its end marker).
    pub trained: Vec<bool>,
}

impl EncodedDialogue {
    fn push(&mut self, ids: impl IntoIterator<Item = u32>, trained: bool) {
        for id in ids {
            self.tokens.push(id);
            self.trained.push(trained);
        }
    }
}

/// Meta's Llama 2 chat layout, as in Hugging Face's `Llama-2-7b-chat-hf` (system prompt folded
/// into the first user turn).
const LLAMA2_JINJA: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = DEFAULT_SYSTEM %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message | trim + '\\n<</SYS>>\\n\\n' + message['content'] | trim %}{% else %}{% set content = message['content'] | trim %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + content + eos_token }}{% endif %}{% endfor %}";

/// ChatML, as SmolLM2 and Qwen ship it.
const CHATML_JINJA: &str = "{% for message in messages %}DEFAULT_SYSTEM{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The default system prompt a Jinja chat template inserts when a dialogue has none (SmolLM2's
/// "You are a helpful AI assistant named SmolLM, ..."), if it has one in the ChatML layout.
pub fn default_system_prompt(jinja: &str) -> Option<String> {
    // ChatML (SmolLM2's form), or the Llama 2 form kiln's export writes.
    let (start, end) = if let Some(at) = jinja.find("<|im_start|>system\n") {
        let start = at + "<|im_start|>system\n".len();
        (start, start + jinja[start..].find("<|im_end|>")?)
    } else {
        let open = "{% set system_message = '";
        let start = jinja.find(open)? + open.len();
        (start, start + jinja[start..].find("' %}")?)
    };
    let raw = &jinja[start..end];
    // Only a literal: a Jinja expression there (`{{ ... }}`, or a quote that ends the
    // string, as in `'...\n' + messages[0]['content']`) is not a fixed prompt.
    let unescaped_quote = raw
        .char_indices()
        .any(|(i, c)| c == '\'' && !raw[..i].ends_with('\\'));
    if raw.is_empty() || raw.contains("{{") || unescaped_quote {
        return None;
    }
    Some(raw.replace("\\'", "'").replace("\\\\", "\\"))
}

const LLAMA2_SPECIALS: [&str; 4] = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"];
const CHATML_SPECIALS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];

impl ChatTemplate {
    fn special(self, tokenizer: &Tokenizer, name: &str) -> Result<u32> {
        tokenizer.token_id(name).ok_or_else(|| {
            anyhow!(
                "the {} chat template needs the token {name}, which the tokenizer lacks",
                self.name()
            )
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ChatTemplate::Llama2 => "llama2",
            ChatTemplate::Chatml => "chatml",
        }
    }

    /// The template as a Jinja `chat_template`, for Hugging Face's `tokenizer_config.json`:
    /// it renders exactly the tokens [`ChatTemplate::encode`] trains on (tested with a Jinja
    /// engine), and inserts `default_system` when a dialogue has no system message, as
    /// `kiln chat` does.
    pub fn jinja(self, default_system: Option<&str>) -> String {
        let template = match self {
            ChatTemplate::Llama2 => LLAMA2_JINJA,
            ChatTemplate::Chatml => CHATML_JINJA,
        };
        let quoted = |text: &str| text.replace('\\', "\\\\").replace('\'', "\\'");
        let system = match (self, default_system) {
            (ChatTemplate::Llama2, None) => "false".to_string(),
            (ChatTemplate::Llama2, Some(text)) => format!("'{}'", quoted(text)),
            (ChatTemplate::Chatml, None) => String::new(),
            // As SmolLM2 writes it (real newlines in the literal), which
            // [`default_system_prompt`] reads back.
            (ChatTemplate::Chatml, Some(text)) => format!(
                "{{% if loop.first and messages[0]['role'] != 'system' %}}{{{{ '<|im_start|>system\n{}<|im_end|>\n' }}}}{{% endif %}}",
                quoted(text)
            ),
        };
        template.replace("DEFAULT_SYSTEM", &system)
    }

    /// Recognises the layout of a Jinja `chat_template` (from a GGUF or Hugging Face model)
    /// by its markers.
    pub fn from_jinja(jinja: &str) -> Option<Self> {
        if jinja.contains("<|im_start|>") {
            Some(ChatTemplate::Chatml)
        } else if jinja.contains("[INST]") {
            Some(ChatTemplate::Llama2)
        } else {
            None
        }
    }

    /// The template a checkpoint was fine-tuned with (`data.template` of its config), or
    /// `llama2` for checkpoints of stages without one.
    pub fn of_checkpoint(dir: &Path) -> Result<Self> {
        let manifest = crate::interop::checkpoint::read_manifest(dir)?;
        let config: toml::Table = manifest
            .config
            .parse()
            .map_err(|e| anyhow!("{}: invalid config: {e}", dir.display()))?;
        match config.get("data").and_then(|d| d.get("template")) {
            Some(value) => value
                .clone()
                .try_into()
                .map_err(|e| anyhow!("{}: data.template: {e}", dir.display())),
            None => Ok(ChatTemplate::Llama2),
        }
    }

    /// Fails early, naming the token, when the tokenizer cannot express this template.
    /// When the tokenizer has the other template's markers, the error says to use that one.
    pub fn check(self, tokenizer: &Tokenizer) -> Result<()> {
        let fits = |template: ChatTemplate| {
            template
                .special_names()
                .iter()
                .all(|name| tokenizer.token_id(name).is_some())
        };
        if fits(self) {
            return Ok(());
        }
        let missing = self
            .special_names()
            .iter()
            .find(|name| tokenizer.token_id(name).is_none())
            .expect("some token is missing");
        let other = match self {
            ChatTemplate::Llama2 => ChatTemplate::Chatml,
            ChatTemplate::Chatml => ChatTemplate::Llama2,
        };
        let hint = if fits(other) {
            format!(
                "; the model is made for the {} template (data.template = \"{}\")",
                other.name(),
                other.name()
            )
        } else {
            String::new()
        };
        bail!(
            "the {} chat template needs the token {missing}, which the tokenizer lacks{hint}",
            self.name()
        )
    }

    fn special_names(self) -> &'static [&'static str] {
        match self {
            ChatTemplate::Llama2 => &LLAMA2_SPECIALS,
            ChatTemplate::Chatml => &CHATML_SPECIALS,
        }
    }

    /// The token that ends an assistant answer: generation stops there.
    pub fn stop_token(self, tokenizer: &Tokenizer) -> Result<u32> {
        match self {
            ChatTemplate::Llama2 => Ok(tokenizer.eos_id),
            ChatTemplate::Chatml => self.special(tokenizer, "<|im_end|>"),
        }
    }

    /// Tokens of a whole dialogue (validated, ending with an assistant message), with the
    /// trained assistant answers and their end markers marked.
    pub fn encode(self, tokenizer: &Tokenizer, messages: &[Message]) -> Result<EncodedDialogue> {
        validate_dialogue(messages, true)?;
        self.render(tokenizer, messages)
    }

    /// Tokens of a dialogue ending with a user message, followed by the start of the
    /// assistant's answer: what generation continues.
    pub fn encode_prompt(self, tokenizer: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>> {
        validate_dialogue(messages, false)?;
        Ok(self.render(tokenizer, messages)?.tokens)
    }

    fn render(self, tok: &Tokenizer, messages: &[Message]) -> Result<EncodedDialogue> {
        let mut out = EncodedDialogue {
            tokens: Vec::new(),
            trained: Vec::new(),
        };
        match self {
            ChatTemplate::Llama2 => {
                let [inst, inst_end, sys, sys_end] =
                    LLAMA2_SPECIALS.map(|name| self.special(tok, name));
                let (inst, inst_end, sys, sys_end) = (inst?, inst_end?, sys?, sys_end?);
                let mut system: Vec<&str> = Vec::new();
                for m in messages {
                    match m.role {
                        // Meta's reference folds the system prompt into the next user turn.
                        Role::System => system.push(m.content.trim()),
                        Role::User => {
                            out.push([tok.bos_id, inst], false);
                            let user = m.content.trim();
                            if system.is_empty() {
                                out.push(tok.encode(&format!(" {user} "))?, false);
                            } else {
                                out.push(tok.encode(" ")?, false);
                                out.push([sys], false);
                                out.push(tok.encode(&format!("\n{}\n", system.join("\n")))?, false);
                                out.push([sys_end], false);
                                out.push(tok.encode(&format!("\n\n{user} "))?, false);
                                system.clear();
                            }
                            out.push([inst_end], false);
                        }
                        Role::Assistant => {
                            let trained = m.trained();
                            out.push(tok.encode(&format!(" {}", m.content.trim()))?, trained);
                            if m.complete {
                                out.push([tok.eos_id], trained);
                            }
                        }
                    }
                }
            }
            ChatTemplate::Chatml => {
                let start = self.special(tok, "<|im_start|>")?;
                let end = self.special(tok, "<|im_end|>")?;
                for m in messages {
                    let role = match m.role {
                        Role::System => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    };
                    out.push([start], false);
                    // Header and content are one piece of text, as a Hugging Face tokenizer
                    // reads the rendered template ("\n" and a leading space of the content
                    // can merge into one token); the tokens past the header's own are the
                    // content's.
                    let header = tok.encode(&format!("{role}\n"))?;
                    let joint = tok.encode(&format!("{role}\n{}", m.content))?;
                    let shared = header
                        .iter()
                        .zip(&joint)
                        .take_while(|(a, b)| a == b)
                        .count();
                    let trained = m.trained();
                    out.push(joint[..shared].iter().copied(), false);
                    out.push(joint[shared..].iter().copied(), trained);
                    if m.complete {
                        out.push([end], trained);
                        out.push(tok.encode("\n")?, false);
                    }
                }
                if messages.last().is_some_and(|m| m.role == Role::User) {
                    out.push([start], false);
                    out.push(tok.encode("assistant\n")?, false);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_system_prompts_read_back_from_exported_templates() {
        for template in [ChatTemplate::Llama2, ChatTemplate::Chatml] {
            for text in ["You are SmolLM.", "It's a test \\ with a backslash"] {
                let jinja = template.jinja(Some(text));
                assert_eq!(
                    default_system_prompt(&jinja).as_deref(),
                    Some(text),
                    "{jinja}"
                );
            }
            assert_eq!(default_system_prompt(&template.jinja(None)), None);
        }
        // SmolLM2's own template, and one whose "system" text is an expression.
        let smollm2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{% endfor %}";
        assert_eq!(
            default_system_prompt(smollm2).as_deref(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        let expression = "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>' }}";
        assert_eq!(default_system_prompt(expression), None);
    }

    #[test]
    fn records_parse_and_bad_ones_say_what_is_wrong() {
        let m = parse_sft(r#"{"prompt": "2+2?", "completion": "4"}"#).unwrap();
        assert_eq!(m, vec![Message::user("2+2?"), Message::assistant("4")]);
        let m = parse_sft(
            r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "weight": 0}, {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]}"#,
        )
        .unwrap();
        assert_eq!(m.len(), 5);
        let cases = [
            ("{", "not valid JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"messages": []}"#, "no messages"),
            (
                r#"{"messages": [{"role": "user", "content": "u"}]}"#,
                "last message",
            ),
            (
                r#"{"messages": [{"role": "assistant", "content": "a"}]}"#,
                "expected a user message",
            ),
            (
                r#"{"messages": [{"role": "robot", "content": "a"}]}"#,
                "expected",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "weight": 0}]}"#,
                "no assistant message is trained",
            ),
        ];
        for (line, expected) in cases {
            let e = parse_sft(line).unwrap_err().to_string();
            assert!(e.contains(expected), "{line}: {e}");
        }
        let pair = parse_preference(
            r#"{"prompt": "p", "chosen": "c", "rejected": "r", "rating": "better", "safety": true}"#,
        )
        .unwrap();
        assert_eq!((pair.rating, pair.safety), (Rating::Better, true));
        let e = parse_preference(
            r#"{"prompt": "p", "chosen": "c", "rejected": "r", "rating": "great"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rating") || e.contains("variant"), "{e}");
        assert!(parse_prompt(r#"{"prompt": "p"}"#).is_ok());
    }

    #[test]
    fn jsonl_errors_name_file_and_line_and_skipping_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sft.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"prompt\": 3}\n{\"prompt\": \"c\", \"completion\": \"d\"}\n",
        )
        .unwrap();
        let e = read_jsonl(&path, false, parse_sft)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sft.jsonl:3:"), "{e}");
        let read = read_jsonl(&path, true, parse_sft).unwrap();
        assert_eq!((read.records.len(), read.skipped), (2, 1));
        assert!(read.first_error.unwrap().contains("sft.jsonl:3:"));
    }
}
