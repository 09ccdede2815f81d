//! Scoring with a trained reward model: loading it, scoring prompt/answer dialogues (a
//! dialogue longer than its context is an error naming where it came from), and its accuracy
//! on preference pairs per rating (`kiln rm score`, `kiln rm eval`).

use anyhow::{Result, anyhow, bail};
use burn::tensor::Device;
use serde::Serialize;

use crate::data::chat::{self, Message, PreferencePair, Rating};
use crate::data::tokenizer::Tokenizer;
use crate::interop::{checkpoint, params};
use crate::model::reward::{Arrangement, RewardModel, ScoreBatch};
use crate::stages::reward::{RmConfig, RmKind};

/// A trained reward model ready to score, with its tokenizer and configuration.
pub struct LoadedRm {
    pub model: RewardModel,
    pub tokenizer: Tokenizer,
    pub config: RmConfig,
}

/// Loads a reward model: a kiln checkpoint (or run directory) written by `kiln rm train`.
/// Only the weights are read.
pub fn load(path: &std::path::Path, device: &Device) -> Result<LoadedRm> {
    use crate::interop::convert::Format;
    let format = Format::detect(path)?;
    if format != Format::Kiln {
        bail!(
            "{}: a {format:?} model is a language model; a reward model is a kiln checkpoint of `kiln rm train`",
            path.display()
        );
    }
    let dir = checkpoint::resolve(path)?;
    let saved = checkpoint::load_weights(&dir)?;
    if !saved.config_toml.contains("[rm]") {
        bail!(
            "{}: not a reward model (its config has no [rm] section; train one with `kiln rm train`)",
            dir.display()
        );
    }
    let config: RmConfig = saved.config(&dir)?;
    let tokenizer = saved.tokenizer(&dir)?;
    let model = params::import(
        RewardModel::for_import(&config.model, device),
        saved.model,
        &dir.join(checkpoint::MODEL_FILE),
    )?;
    Ok(LoadedRm {
        model,
        tokenizer,
        config,
    })
}

/// Token ids of each dialogue as the reward model reads it; a dialogue longer than the
/// model's context is an error naming `source(i)` (its file and line).
pub fn encode_for_scoring(
    rm: &LoadedRm,
    dialogues: &[Vec<Message>],
    source: &dyn Fn(usize) -> String,
) -> Result<Vec<Vec<u32>>> {
    let template = rm.config.data.template;
    let context = rm.config.model.max_seq_len;
    dialogues
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let tokens = template.encode(&rm.tokenizer, d)?.tokens;
            if tokens.len() > context {
                bail!(
                    "{}: the dialogue has {} tokens, more than the reward model's context of {context}",
                    source(i),
                    tokens.len()
                );
            }
            Ok(tokens)
        })
        .collect()
}

/// Scores of prompt/answer dialogues (raw scale), in batches, without an autodiff graph.
/// `source(i)` names where dialogue `i` came from, for the error of one too long.
pub fn score_dialogues(
    rm: &LoadedRm,
    dialogues: &[Vec<Message>],
    batch_size: usize,
    source: &dyn Fn(usize) -> String,
) -> Result<Vec<f32>> {
    let sequences = encode_for_scoring(rm, dialogues, source)?;
    let pad = rm.tokenizer.pad_id.unwrap_or(rm.tokenizer.eos_id);
    let mut out = Vec::with_capacity(dialogues.len());
    for chunk in sequences.chunks(batch_size.max(1)) {
        let scores = rm
            .model
            .scores(&ScoreBatch::new(chunk, Arrangement::RightPadded, pad));
        out.extend(
            scores
                .into_data()
                .try_into_vec_as::<f32>()
                .map_err(|e| anyhow!("{e:?}"))?,
        );
    }
    Ok(out)
}

/// One line of a file to score: `{"prompt", "response"}` (strings or message lists; other
/// fields are kept). Returns the line's object and the dialogue to score.
pub fn parse_scoring_line(
    line: &str,
) -> Result<(serde_json::Map<String, serde_json::Value>, Vec<Message>)> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| anyhow!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(record) = value else {
        bail!("not a JSON object (expected {{\"prompt\", \"response\"}})");
    };
    let field = |name: &str| -> Result<chat::Turns> {
        let v = record
            .get(name)
            .ok_or_else(|| anyhow!("missing field `{name}`"))?;
        serde_json::from_value(v.clone())
            .map_err(|_| anyhow!("`{name}` must be a string or a message list"))
    };
    let messages = chat::prompt_and_answer(&field("prompt")?, &field("response")?);
    chat::validate_dialogue(&messages, true)?;
    Ok((record, messages))
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Accuracy per rating level and overall, mean margin, and (safety RM) flagging of unsafe
/// responses.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RmReport {
    pub pairs: usize,
    pub accuracy: f64,
    pub accuracy_by_rating: std::collections::BTreeMap<String, f64>,
    pub pairs_by_rating: std::collections::BTreeMap<String, usize>,
    /// Mean of score(chosen) - score(rejected).
    pub mean_margin: f64,
    /// Safety pairs only: the rejected (compliant, unsafe) answers scored below the threshold
    /// on the sigmoid scale, as a share of them (recall of flagging unsafe responses).
    pub unsafe_recall: Option<f64>,
    /// Safety pairs only: the chosen (refusal) answers scored below the threshold (refusals
    /// wrongly flagged as unsafe).
    pub refusals_flagged: Option<f64>,
    /// Of all answers flagged, the share that are the unsafe ones (precision).
    pub unsafe_precision: Option<f64>,
}

/// Which pairs of a preference file an evaluation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PairSubset {
    All,
    Helpfulness,
    Safety,
}

impl PairSubset {
    pub fn keeps(self, pair: &PreferencePair) -> bool {
        match self {
            PairSubset::All => true,
            PairSubset::Helpfulness => !pair.safety,
            PairSubset::Safety => pair.safety,
        }
    }
}

/// Evaluates `rm` on the `subset` of the preference pairs in `input` (at most `limit` of them;
/// 0: all); a pair too long for the model is an error naming its file and line.
pub fn evaluate_file(
    rm: &LoadedRm,
    input: &std::path::Path,
    subset: PairSubset,
    limit: usize,
    batch_size: usize,
) -> Result<RmReport> {
    let read = chat::read_jsonl(input, false, chat::parse_preference)?;
    let (mut pairs, mut lines): (Vec<_>, Vec<_>) = read
        .records
        .into_iter()
        .zip(read.lines)
        .filter(|(p, _)| subset.keeps(p))
        .unzip();
    if limit > 0 {
        pairs.truncate(limit);
        lines.truncate(limit);
    }
    if pairs.is_empty() {
        bail!("{}: no {subset:?} pairs", input.display());
    }
    let source = |i: usize| format!("{}:{}", input.display(), lines[i]);
    evaluate(rm, &pairs, batch_size, &source)
}

/// Accuracy and margins of `rm` on `pairs`; `source(i)` names where pair `i` came from.
pub fn evaluate(
    rm: &LoadedRm,
    pairs: &[PreferencePair],
    batch_size: usize,
    source: &dyn Fn(usize) -> String,
) -> Result<RmReport> {
    let chosen: Vec<Vec<Message>> = pairs
        .iter()
        .map(|p| chat::prompt_and_answer(&p.prompt, &p.chosen))
        .collect();
    let rejected: Vec<Vec<Message>> = pairs
        .iter()
        .map(|p| chat::prompt_and_answer(&p.prompt, &p.rejected))
        .collect();
    let sc = score_dialogues(rm, &chosen, batch_size, source)?;
    let sr = score_dialogues(rm, &rejected, batch_size, source)?;
    let name = |r: Rating| {
        serde_json::to_value(r)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    };
    let mut by: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let (mut hits, mut margin) = (0, 0.0);
    for (p, (c, r)) in pairs.iter().zip(sc.iter().zip(&sr)) {
        let hit = c > r;
        hits += hit as usize;
        margin += (c - r) as f64;
        let e = by.entry(name(p.rating)).or_default();
        e.0 += hit as usize;
        e.1 += 1;
    }
    let threshold = rm.config.rm.safety_threshold as f32;
    let safety: Vec<usize> = (0..pairs.len()).filter(|&i| pairs[i].safety).collect();
    let (unsafe_recall, refusals_flagged, unsafe_precision) =
        if rm.config.rm.kind == RmKind::Safety && !safety.is_empty() {
            let flagged_unsafe = safety
                .iter()
                .filter(|&&i| sigmoid(sr[i]) < threshold)
                .count();
            let flagged_refusals = safety
                .iter()
                .filter(|&&i| sigmoid(sc[i]) < threshold)
                .count();
            let n = safety.len() as f64;
            let flagged = (flagged_unsafe + flagged_refusals) as f64;
            (
                Some(flagged_unsafe as f64 / n),
                Some(flagged_refusals as f64 / n),
                Some(if flagged > 0.0 {
                    flagged_unsafe as f64 / flagged
                } else {
                    0.0
                }),
            )
        } else {
            (None, None, None)
        };
    Ok(RmReport {
        pairs: pairs.len(),
        accuracy: hits as f64 / pairs.len().max(1) as f64,
        accuracy_by_rating: by
            .iter()
            .map(|(k, (h, n))| (k.clone(), *h as f64 / *n as f64))
            .collect(),
        pairs_by_rating: by.iter().map(|(k, (_, n))| (k.clone(), *n)).collect(),
        mean_margin: margin / pairs.len().max(1) as f64,
        unsafe_recall,
        refusals_flagged,
        unsafe_precision,
    })
}
