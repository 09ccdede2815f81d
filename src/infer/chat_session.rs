//! `kiln chat`: a conversation in the terminal. Each user line is added to the dialogue, the
//! whole dialogue is rendered with the model's chat template, and the answer is streamed as
//! it is sampled. The KV cache is kept between turns, so each turn computes only the tokens
//! that follow what it shares with the previous one. `/reset` starts over, `/exit` (or end of
//! input) quits; Ctrl-C stops the answer being generated.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, anyhow};

use crate::data::chat::{ChatTemplate, Message, Role};
use crate::data::tokenizer::Tokenizer;
use crate::infer::generate::{self, SamplingParams, TextStream};
use crate::model::{KvCache, Llama};

/// Set by Ctrl-C while an answer is being generated: the answer stops there.
static STOP_ANSWER: AtomicBool = AtomicBool::new(false);
static ANSWERING: AtomicBool = AtomicBool::new(false);

/// Ctrl-C stops the answer being generated (the conversation goes on); at the prompt it quits.
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if ANSWERING.load(Ordering::SeqCst) {
            STOP_ANSWER.store(true, Ordering::SeqCst);
        } else {
            eprintln!();
            std::process::exit(130);
        }
    })
    .map_err(|e| anyhow!("cannot install the Ctrl-C handler: {e}"))
}

/// The KV cache of the conversation so far and the tokens it holds.
struct Memory {
    cache: KvCache,
    tokens: Vec<u32>,
}

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
        let mut memory = self.empty_memory();
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
            let answer = self.answer(&mut dialogue, &mut memory, output, rng)?;
            dialogue.push(Message::assistant(answer));
        }
        Ok(())
    }

    fn fresh(&self) -> Vec<Message> {
        self.system.iter().map(Message::system).collect()
    }

    fn empty_memory(&self) -> Memory {
        Memory {
            cache: KvCache::new(self.model.config.n_layers, vec![0]),
            tokens: Vec::new(),
        }
    }

    /// Streams the answer to the dialogue (which ends with a user message) and returns it.
    /// Earlier turns are dropped, oldest first, when the dialogue and the answer would not
    /// fit the model's context.
    fn answer(
        &self,
        dialogue: &mut Vec<Message>,
        memory: &mut Memory,
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
        // Earlier turns are in the cache: feed only what follows the longest shared prefix
        // (at least one token, whose logits start the answer).
        let shared = memory
            .tokens
            .iter()
            .zip(&prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        if shared == 0 {
            *memory = self.empty_memory();
        } else {
            memory.cache.truncate(shared);
        }
        let stop = self.template.stop_token(self.tokenizer)?;
        let mut stream = TextStream::new(self.tokenizer);
        STOP_ANSWER.store(false, Ordering::SeqCst);
        ANSWERING.store(true, Ordering::SeqCst);
        let mut failure = None;
        let answer = generate::continue_cached(
            self.model,
            &mut memory.cache,
            &prompt[shared..],
            &self.params,
            stop,
            rng,
            &mut |_, token| {
                let written = stream
                    .push(token)
                    .and_then(|piece| Ok(write!(output, "{piece}").and_then(|_| output.flush())?));
                if let Err(e) = written {
                    failure.get_or_insert(e);
                }
                if STOP_ANSWER.load(Ordering::SeqCst) || failure.is_some() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        );
        ANSWERING.store(false, Ordering::SeqCst);
        let answer = answer?.tokens;
        if STOP_ANSWER.swap(false, Ordering::SeqCst) {
            write!(output, " [stopped]")?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        // What the cache holds: the prompt and the answer tokens fed back (not the last drawn).
        memory.tokens = prompt;
        memory.tokens.extend(answer);
        memory.tokens.truncate(memory.cache.len());
        writeln!(output)?;
        Ok(stream.text()?.trim().to_string())
    }
}
