//! `kiln chat`: a conversation in the terminal. Each user line is added to the dialogue, the
//! whole dialogue is rendered with the model's chat template, and the answer is streamed as
//! it is sampled. `/reset` starts over, `/exit` (or end of input) quits.

use std::io::{BufRead, Write};

use anyhow::{Result, anyhow};

use crate::chat::{ChatTemplate, Message, Role};
use crate::generate::{self, SamplingParams, TextStream};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;

pub struct ChatSession<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a Tokenizer,
    pub template: ChatTemplate,
    pub system: Option<String>,
    pub params: SamplingParams,
    /// Print `> ` before reading each line (an interactive terminal).
    pub prompt_marker: bool,
}

impl ChatSession<'_> {
    /// Reads user lines from `input` until `/exit` or its end, writing answers to `output`.
    pub fn run(
        &self,
        input: impl BufRead,
        output: &mut dyn Write,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> Result<()> {
        self.template.check(self.tokenizer)?;
        let mut dialogue = self.fresh();
        let mut lines = input.lines();
        loop {
            if self.prompt_marker {
                write!(output, "> ")?;
                output.flush()?;
            }
            let Some(line) = lines.next() else { break };
            let line = line.map_err(|e| anyhow!("cannot read the input: {e}"))?;
            let line = line.trim();
            match line {
                "" => continue,
                "/exit" | "/quit" => break,
                "/reset" => {
                    dialogue = self.fresh();
                    writeln!(output, "(conversation cleared)")?;
                    continue;
                }
                _ => {}
            }
            dialogue.push(Message::user(line));
            let answer = self.answer(&mut dialogue, output, rng)?;
            dialogue.push(Message::assistant(answer));
        }
        Ok(())
    }

    fn fresh(&self) -> Vec<Message> {
        self.system.iter().map(Message::system).collect()
    }

    /// Streams the answer to the dialogue (which ends with a user message) and returns it.
    /// Earlier turns are dropped, oldest first, when the dialogue and the answer would not
    /// fit the model's context.
    fn answer(
        &self,
        dialogue: &mut Vec<Message>,
        output: &mut dyn Write,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> Result<String> {
        let budget = self.model.config.max_seq_len.saturating_sub(
            self.params
                .max_tokens
                .min(self.model.config.max_seq_len / 2),
        );
        let prompt = loop {
            let prompt = self.template.encode_prompt(self.tokenizer, dialogue)?;
            let first_turn = dialogue.iter().position(|m| m.role != Role::System);
            let turns = dialogue.len() - first_turn.unwrap_or(dialogue.len());
            if prompt.len() <= budget || turns <= 1 {
                break prompt;
            }
            // Drop the oldest user turn and its answer.
            let at = first_turn.expect("turns > 1");
            dialogue.drain(at..(at + 2).min(dialogue.len() - 1));
        };
        if prompt.len() >= self.model.config.max_seq_len {
            return Err(anyhow!(
                "the message is {} tokens long, more than the model's context of {}",
                prompt.len(),
                self.model.config.max_seq_len
            ));
        }
        let stop = self.template.stop_token(self.tokenizer)?;
        let pad = self.tokenizer.pad_id.unwrap_or(self.tokenizer.eos_id);
        let mut stream = TextStream::new(self.tokenizer);
        let mut failure = None;
        generate::generate_with(
            self.model,
            &[prompt],
            &self.params,
            stop,
            pad,
            rng,
            &mut |_, token| {
                let written = stream
                    .push(token)
                    .and_then(|piece| Ok(write!(output, "{piece}").and_then(|_| output.flush())?));
                if let Err(e) = written {
                    failure.get_or_insert(e);
                }
            },
        );
        if let Some(e) = failure {
            return Err(e);
        }
        writeln!(output)?;
        Ok(stream.text()?.trim().to_string())
    }
}
