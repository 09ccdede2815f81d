//! Tokenizers: any Hugging Face `tokenizer.json`, and training a byte-level BPE that, like
//! Llama 2's, splits numbers into single digits and never meets an unknown character.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, TokenizerBuilder};

/// Beginning and end of a document.
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
/// Padding for batched generation and reward-model batches.
pub const PAD: &str = "<pad>";
/// Llama 2 chat markers, registered now so later stages (SFT, GAtt) find them as single ids.
pub const CHAT_TOKENS: [&str; 4] = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"];

pub fn special_tokens() -> Vec<&'static str> {
    let mut tokens = vec![BOS, EOS, PAD];
    tokens.extend(CHAT_TOKENS);
    tokens
}

/// A loaded tokenizer with the ids kiln needs resolved once.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: Option<u32>,
}

impl Tokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(anyhow!("tokenizer {} not found", path.display()));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: not a valid tokenizer.json: {e}", path.display()))?;
        Self::from_inner(inner).with_context(|| format!("tokenizer {}", path.display()))
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| anyhow!("not a valid tokenizer.json: {e}"))?;
        Self::from_inner(inner)
    }

    fn from_inner(inner: tokenizers::Tokenizer) -> Result<Self> {
        // Llama-family tokenizers name these <s>/</s>; SmolLM2's use <|im_start|>-style names
        // and its end-of-text token, so fall back to those.
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos_id = find(&[BOS, "<|endoftext|>", "<|im_start|>"])
            .ok_or_else(|| anyhow!("has no beginning-of-sequence token {BOS}"))?;
        let eos_id = find(&[EOS, "<|endoftext|>", "<|im_end|>"])
            .ok_or_else(|| anyhow!("has no end-of-sequence token {EOS}"))?;
        let pad_id = find(&[PAD]);
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// The id of a token given by its exact text (special tokens such as `[INST]`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary the model needs for this tokenizer: one past its largest id (ids need
    /// not be dense: a tokenizer of 2,048 tokens may still emit id 99,999).
    pub fn vocab_size(&self) -> usize {
        let largest = self.inner.get_vocab(true).into_values().max();
        largest
            .map_or(0, |id| id as usize + 1)
            .max(self.inner.get_vocab_size(true))
    }

    /// Token ids of `text`, without BOS/EOS (the data pipeline adds document boundaries).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("tokenizer failed to decode: {e}"))
    }

    /// Like [`Tokenizer::decode`], with special tokens (`<s>`, `[INST]`, ...) kept as text.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("tokenizer failed to decode: {e}"))
    }

    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| anyhow!("tokenizer failed to serialise: {e}"))
    }
}

/// Trains a byte-level BPE of `vocab_size` tokens (special tokens included) on `texts`.
pub fn train_bpe<'a>(
    texts: impl Iterator<Item = &'a str> + Send,
    vocab_size: usize,
) -> Result<Tokenizer> {
    let specials: Vec<AddedToken> = special_tokens()
        .into_iter()
        .map(|t| AddedToken::from(t, true))
        .collect();
    let min_vocab = 256 + specials.len();
    let max_vocab = crate::config::MAX_VOCAB_SIZE;
    if vocab_size > max_vocab {
        return Err(anyhow!(
            "--vocab-size {vocab_size} is more than the largest vocabulary kiln supports ({max_vocab})"
        ));
    }
    if vocab_size < min_vocab {
        return Err(anyhow!(
            "--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {min_vocab}"
        ));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = byte_level_bpe(BPE::default(), true)?;
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| anyhow!("tokenizer training failed: {e}"))?;
    let json = tokenizer
        .to_string(false)
        .map_err(|e| anyhow!("tokenizer failed to serialise: {e}"))?;
    Tokenizer::from_json(&json)
}

type ByteLevelBpe = tokenizers::TokenizerImpl<
    BPE,
    NormalizerWrapper,
    PreTokenizerWrapper,
    ByteLevel,
    ByteLevelDecoder,
>;

/// A byte-level BPE pipeline around `model`, GPT-2's regex split, digits split one by one
/// when `split_digits` (Llama 2's and SmolLM2's choice).
fn byte_level_bpe(model: BPE, split_digits: bool) -> Result<ByteLevelBpe> {
    let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    let pre_tokenizer = if split_digits {
        PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level,
        ]))
    } else {
        byte_level
    };
    TokenizerBuilder::new()
        .with_model(model)
        .with_normalizer(None)
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_post_processor(Some(ByteLevel::default()))
        .with_decoder(Some(ByteLevelDecoder::default()))
        .build()
        .map_err(|e| anyhow!("cannot build tokenizer: {e}"))
}

/// The `tokenizer.json` of a byte-level BPE given by its vocabulary (id = position), its
/// merges (`"a b"`, highest priority first) and its special tokens (id, text): how a GGUF
/// file describes a GPT-2-style tokenizer.
pub fn byte_level_bpe_json(
    tokens: &[&str],
    merges: &[&str],
    specials: &[(u32, &str)],
    split_digits: bool,
) -> Result<String> {
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    if vocab.len() != tokens.len() {
        return Err(anyhow!("the vocabulary lists a token twice"));
    }
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("merge {m:?} is not two tokens"))
        })
        .collect::<Result<Vec<_>>>()?;
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("invalid BPE: {e}"))?;
    let mut tokenizer = byte_level_bpe(model, split_digits)?;
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|(_, t)| AddedToken::from(t.to_string(), true))
        .collect();
    tokenizer.add_special_tokens(&added);
    for (id, text) in specials {
        if tokenizer.token_to_id(text) != Some(*id) {
            return Err(anyhow!("special token {text:?} does not keep its id {id}"));
        }
    }
    tokenizer
        .to_string(false)
        .map_err(|e| anyhow!("tokenizer failed to serialise: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_bpe_round_trips_splits_digits_and_knows_chat_tokens() {
        let text =
            "To be, or not to be: that is the question. 12345 apples, 678 pears.\n".repeat(50);
        let tok = train_bpe(std::iter::once(text.as_str()), 300).unwrap();
        assert!(tok.vocab_size() <= 300);
        let sample = "Whether 'tis nobler — 2023 ünïcode 🎭";
        let ids = tok.encode(sample).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), sample);
        let digits = tok.encode("90210").unwrap();
        assert_eq!(digits.len(), 5, "each digit is its own token");
        for t in special_tokens() {
            assert_eq!(tok.encode(t).unwrap().len(), 1, "{t} is one token");
        }
        let again = Tokenizer::from_json(&tok.to_json().unwrap()).unwrap();
        assert_eq!(again.encode(sample).unwrap(), ids);
    }
}
