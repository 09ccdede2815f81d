//! Sampling text from a model with the KV cache: temperature, nucleus (top-p) sampling, and
//! batches of prompts of different lengths (left-padded; padding keys are masked).

use std::ops::ControlFlow;

use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::chat::{ChatTemplate, Message};
use crate::data::tokenizer::Tokenizer;
use crate::kernels::cpu::{Real, max_and_log_sum_exp};
use crate::model::{KvCache, Llama};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy decoding).
    pub temperature: f64,
    /// Sample from the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Also drop tokens less than `min_p` times as likely as the most likely one (0: off):
    /// llama.cpp's min-p, which cuts the long tail of unlikely tokens.
    pub min_p: f64,
    pub max_tokens: usize,
}

/// How a generated sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model drew the stop token: the answer is complete.
    Eos,
    /// `max_tokens` new tokens were drawn without the stop token.
    Length,
    /// The context (`model.max_seq_len`) filled up before the stop token.
    Context,
    /// The caller stopped generation (`on_token` returned `Break`).
    Stopped,
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The new tokens; the stop token is not among them.
    pub tokens: Vec<u32>,
    /// Log-probability of each token of `tokens`, then of the stop token when `finish` is
    /// `Eos`, under the model's own distribution (temperature 1, no top-p): what RS and PPO
    /// compare policies with.
    pub logprobs: Vec<f32>,
    /// The same tokens' log-probabilities under the distribution they were drawn from
    /// (temperature and top-p applied; 0 for greedy decoding).
    pub sample_logprobs: Vec<f32>,
    pub finish: FinishReason,
}

/// Room left for new tokens after a prompt of `longest` tokens, or an error naming the
/// prompt's length and the context when there is none.
fn room(longest: usize, max_seq_len: usize) -> anyhow::Result<usize> {
    if longest >= max_seq_len {
        anyhow::bail!(
            "a prompt of {longest} tokens leaves no room to generate in the model's context of {max_seq_len} tokens"
        );
    }
    Ok(max_seq_len - longest)
}

/// Continues every prompt in `prompts` (token ids, each non-empty) by up to
/// `params.max_tokens` tokens, stopping a row at `stop_id`. Returns the new tokens of each row
/// (the stop token excluded). The batch is processed together: one forward pass per step.
pub fn generate(
    model: &Llama,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    stop_id: u32,
    pad_id: u32,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<Vec<Vec<u32>>> {
    Ok(
        generate_with(model, prompts, params, stop_id, pad_id, rng, &mut |_, _| {
            ControlFlow::Continue(())
        })?
        .into_iter()
        .map(|g| g.tokens)
        .collect(),
    )
}

/// [`generate`] with each row's log-probabilities and finish reason, calling
/// `on_token(row, token)` for each new token as soon as it is drawn (the stop token
/// excluded): for streaming output. `on_token` returning `Break` ends the generation of every
/// row after this step (a user who stops an answer). A prompt that leaves no room in the
/// context is an error.
pub fn generate_with(
    model: &Llama,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    stop_id: u32,
    pad_id: u32,
    rng: &mut ChaCha8Rng,
    on_token: &mut dyn FnMut(usize, u32) -> ControlFlow<()>,
) -> anyhow::Result<Vec<Generated>> {
    if prompts.iter().any(|p| p.is_empty()) {
        anyhow::bail!("cannot generate from an empty prompt");
    }
    let device = model.device();
    let batch = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let context_room = room(longest, model.config.max_seq_len)?;
    let left_pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut padded = Vec::with_capacity(batch * longest);
    for (prompt, &pad) in prompts.iter().zip(&left_pad) {
        padded.extend(std::iter::repeat_n(pad_id as i64, pad));
        padded.extend(prompt.iter().map(|&t| t as i64));
    }
    let mut cache = KvCache::new(model.config.n_layers, left_pad);
    let input = Tensor::<2, Int>::from_data(TensorData::new(padded, [batch, longest]), &device);
    Ok(decode(
        model,
        &mut cache,
        input,
        context_room,
        params,
        stop_id,
        rng,
        on_token,
    ))
}

/// Continues one sequence whose first `cache.len()` tokens are in `cache`: feeds `new_tokens`
/// (at least one), then samples as [`generate_with`] does. The cache keeps every token fed,
/// so a chat can go on from it next turn.
pub fn continue_cached(
    model: &Llama,
    cache: &mut KvCache,
    new_tokens: &[u32],
    params: &SamplingParams,
    stop_id: u32,
    rng: &mut ChaCha8Rng,
    on_token: &mut dyn FnMut(usize, u32) -> ControlFlow<()>,
) -> anyhow::Result<Generated> {
    if new_tokens.is_empty() {
        anyhow::bail!("nothing to feed");
    }
    let context_room = room(cache.len() + new_tokens.len(), model.config.max_seq_len)?;
    let ids: Vec<i64> = new_tokens.iter().map(|&t| t as i64).collect();
    let input =
        Tensor::<2, Int>::from_data(TensorData::new(ids, [1, new_tokens.len()]), &model.device());
    Ok(decode(
        model,
        cache,
        input,
        context_room,
        params,
        stop_id,
        rng,
        on_token,
    )
    .pop()
    .expect("one row"))
}

/// The sampling loop: forwards `input` (`[batch, t]`) through the cache, draws each row's next
/// token from the last position, and feeds the drawn tokens back, up to `params.max_tokens`
/// times (at most `context_room`) or until every row has drawn `stop_id`.
#[allow(clippy::too_many_arguments)]
fn decode(
    model: &Llama,
    cache: &mut KvCache,
    mut input: Tensor<2, Int>,
    context_room: usize,
    params: &SamplingParams,
    stop_id: u32,
    rng: &mut ChaCha8Rng,
    on_token: &mut dyn FnMut(usize, u32) -> ControlFlow<()>,
) -> Vec<Generated> {
    let device = model.device();
    let batch = input.dims()[0];
    let max_new = params.max_tokens.min(context_room);
    let mut outputs: Vec<Generated> = vec![
        Generated {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            sample_logprobs: Vec::new(),
            // What a row that never draws the stop token ends with.
            finish: if params.max_tokens <= context_room {
                FinishReason::Length
            } else {
                FinishReason::Context
            },
        };
        batch
    ];
    let mut done = vec![false; batch];
    let mut stopped = false;
    for _ in 0..max_new {
        // Only the last position's logits are drawn from: the head (dim x vocab per token,
        // the largest matmul of a small model) runs on it alone, not on every prompt token.
        let hidden = model.hidden_states(input, Some(&mut *cache));
        let [_, t, dim] = hidden.dims();
        let logits = model.logits(hidden.slice([0..batch, t - 1..t, 0..dim]));
        let vocab = logits.dims()[2];
        let last = logits.reshape([batch, vocab]);
        let values: Vec<f32> = last
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 logits");
        // Each drawing row takes its one uniform from `rng` in row order, as a loop of `draw`
        // would; the draws themselves (two passes of exp over the vocabulary) then run in
        // parallel: one row after another they were 10% of a batch-32 decode step.
        let uniforms: Vec<Option<f64>> = done
            .iter()
            .map(|&done| (!done).then(|| uniform(params, rng)))
            .collect();
        let draws: Vec<Option<Draw>> = uniforms
            .par_iter()
            .enumerate()
            .map(|(row, u)| {
                u.map(|u| draw_with(&values[row * vocab..(row + 1) * vocab], params, u))
            })
            .collect();
        let mut next = Vec::with_capacity(batch);
        for (row, out) in outputs.iter_mut().enumerate() {
            let Some(drawn) = draws[row] else {
                next.push(stop_id as i64);
                continue;
            };
            out.logprobs.push(drawn.logprob);
            out.sample_logprobs.push(drawn.sample_logprob);
            if drawn.token == stop_id {
                done[row] = true;
                out.finish = FinishReason::Eos;
            } else {
                out.tokens.push(drawn.token);
                stopped |= on_token(row, drawn.token).is_break();
            }
            next.push(drawn.token as i64);
        }
        if stopped || done.iter().all(|&d| d) {
            break;
        }
        input = Tensor::from_data(TensorData::new(next, [batch, 1]), &device);
    }
    if stopped {
        for (out, &d) in outputs.iter_mut().zip(&done) {
            if !d {
                out.finish = FinishReason::Stopped;
            }
        }
    }
    outputs
}

/// Text in, text out: each prompt is framed with BOS, continued by [`generate_with`]
/// (stopping at EOS, padding with the tokenizer's pad token), and the continuations are
/// decoded, each with how it ended.
pub fn complete(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompts: &[&str],
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<Vec<Completion>> {
    let ids = prompts
        .iter()
        .map(|p| {
            let mut ids = vec![tokenizer.bos_id];
            ids.extend(tokenizer.encode(p)?);
            Ok(ids)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pad = tokenizer.pad_id.unwrap_or(tokenizer.eos_id);
    generate_with(
        model,
        &ids,
        params,
        tokenizer.eos_id,
        pad,
        rng,
        &mut |_, _| ControlFlow::Continue(()),
    )?
    .into_iter()
    .map(|generated| {
        let text = tokenizer.decode(&generated.tokens)?;
        Ok(Completion { text, generated })
    })
    .collect()
}

/// Generated text and how generating it ended, with the tokens and log-probabilities behind
/// it.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub generated: Generated,
}

/// Answers of the model to each dialogue (each ending with a user message), rendered with
/// `template` and generated in batches of `batch_size`: each answer's text (decoded,
/// trimmed), finish reason, tokens and log-probabilities.
pub fn complete_chat(
    model: &Llama,
    tokenizer: &Tokenizer,
    template: ChatTemplate,
    dialogues: &[Vec<Message>],
    params: &SamplingParams,
    batch_size: usize,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<Vec<Completion>> {
    let stop = template.stop_token(tokenizer)?;
    let pad = tokenizer.pad_id.unwrap_or(tokenizer.eos_id);
    let mut answers = Vec::with_capacity(dialogues.len());
    for chunk in dialogues.chunks(batch_size.max(1)) {
        let prompts = chunk
            .iter()
            .map(|d| template.encode_prompt(tokenizer, d))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let outs = generate_with(model, &prompts, params, stop, pad, rng, &mut |_, _| {
            ControlFlow::Continue(())
        })?;
        for generated in outs {
            let text = tokenizer.decode(&generated.tokens)?.trim().to_string();
            answers.push(Completion { text, generated });
        }
    }
    Ok(answers)
}

/// Decodes a growing list of tokens into text pieces as they arrive. A token may end in the
/// middle of a UTF-8 character (byte-level BPE): text is held back until it decodes whole.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            emitted: 0,
        }
    }

    /// The new text `token` completes (possibly empty).
    pub fn push(&mut self, token: u32) -> anyhow::Result<String> {
        self.tokens.push(token);
        let text = self.tokenizer.decode(&self.tokens)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(piece) = text.get(self.emitted..).map(str::to_string) else {
            return Ok(String::new());
        };
        self.emitted = text.len();
        Ok(piece)
    }

    /// Everything decoded so far.
    pub fn text(&self) -> anyhow::Result<String> {
        self.tokenizer.decode(&self.tokens)
    }
}

/// A drawn token and its log-probabilities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    pub token: u32,
    /// Under the model's distribution: log-softmax of the raw logits.
    pub logprob: f32,
    /// Under the distribution it was drawn from (temperature, then the top-p nucleus
    /// renormalised); 0 for greedy decoding.
    pub sample_logprob: f32,
}

/// Draws one token id from `logits` with temperature and nucleus sampling.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut impl Rng) -> u32 {
    draw(logits, params, rng).token
}

/// [`sample`] with the drawn token's log-probabilities.
pub fn draw(logits: &[f32], params: &SamplingParams, rng: &mut impl Rng) -> Draw {
    draw_with(logits, params, uniform(params, rng))
}

/// The one uniform in [0, 1) a draw takes from the generator: none when greedy.
fn uniform(params: &SamplingParams, rng: &mut impl Rng) -> f64 {
    if params.temperature <= 0.0 {
        0.0
    } else {
        rng.random::<f64>()
    }
}

/// [`draw`] with its uniform given.
fn draw_with(logits: &[f32], params: &SamplingParams, u: f64) -> Draw {
    let (max, log_z) = max_and_log_sum_exp(logits);
    let max = max as f64;
    let raw = |token: usize| logits[token] - log_z;
    if params.temperature <= 0.0 {
        let token = argmax(logits);
        return Draw {
            token: token as u32,
            logprob: raw(token),
            sample_logprob: 0.0,
        };
    }
    let (token, sample_logprob) = nucleus_draw(logits, max, params, u);
    Draw {
        token: token as u32,
        logprob: raw(token),
        sample_logprob,
    }
}

/// Temperature and top-p: the drawn index and its log-probability in the nucleus.
fn nucleus_draw(logits: &[f32], max: f64, params: &SamplingParams, u: f64) -> (usize, f32) {
    // exp((l - max) / T) in f32 lanes (libm's f64 exp per logit was as costly as a layer's
    // attention at batch 64); the weights are summed and drawn from in f64.
    let inverse_t = (1.0 / params.temperature) as f32;
    let mut weights = logits.to_vec();
    f32::exp_in_place(&mut weights, inverse_t, max as f32 * inverse_t);
    let mut probs: Vec<(usize, f64)> = weights
        .into_iter()
        .enumerate()
        .map(|(i, w)| (i, w as f64))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    if params.top_p >= 1.0 && params.min_p <= 0.0 {
        // Nothing is cut: draw from the whole distribution without sorting the vocabulary
        // (a sort per row and step showed as 4% of a PPO iteration).
        return categorical_draw(&probs, total, u);
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut cut = probs.len();
    let floor = params.min_p * probs[0].1;
    for (i, p) in probs.iter().enumerate() {
        if i > 0 && p.1 < floor {
            cut = i;
            break;
        }
        kept += p.1 / total;
        if kept >= params.top_p {
            cut = i + 1;
            break;
        }
    }
    let nucleus = &probs[..cut];
    let mass: f64 = nucleus.iter().map(|p| p.1).sum();
    categorical_draw(nucleus, mass, u)
}

/// Draws one of `weighted` (index, unnormalised probability) whose weights sum to `mass`, by
/// the uniform `u` in [0, 1): the index and its log-probability among them.
fn categorical_draw(weighted: &[(usize, f64)], mass: f64, u: f64) -> (usize, f32) {
    let mut u = u * mass;
    let logprob = |p: f64| (p / mass).ln() as f32;
    for &(i, p) in weighted {
        if u < p {
            return (i, logprob(p));
        }
        u -= p;
    }
    let (i, p) = weighted[weighted.len() - 1];
    (i, logprob(p))
}

fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

/// A generator seeded for reproducible sampling.
pub fn seeded_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nucleus_sampling_only_draws_from_the_nucleus() {
        // Probabilities ~ [0.64, 0.23, 0.09, 0.03, ...]: top_p 0.8 keeps the first two.
        let logits = [3.0f32, 2.0, 1.0, 0.0, -1.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.8,
            min_p: 0.0,
            max_tokens: 1,
        };
        let mut rng = seeded_rng(1);
        let mut counts = [0usize; 5];
        for _ in 0..4000 {
            counts[sample(&logits, &params, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[2] + counts[3] + counts[4], 0, "{counts:?}");
        let ratio = counts[0] as f64 / counts[1] as f64;
        assert!((ratio - std::f64::consts::E).abs() < 0.3, "{counts:?}");
        let greedy = SamplingParams {
            temperature: 0.0,
            ..params
        };
        assert_eq!(sample(&[0.1, 0.7, 0.2], &greedy, &mut rng), 1);
    }

    /// With nothing cut (top-p 1, min-p 0), draws follow the softmax of the logits and each
    /// draw's log-probability is its log-softmax (4,000 draws, 4 standard errors).
    #[test]
    fn untruncated_sampling_follows_the_softmax() {
        let logits = [1.0f32, -0.5, 2.0, 0.0, 0.7];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            min_p: 0.0,
            max_tokens: 1,
        };
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let seed: u64 = rand::random();
        let mut rng = seeded_rng(seed);
        let n = 4000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            let d = draw(&logits, &params, &mut rng);
            counts[d.token as usize] += 1;
            let expected = logits[d.token as usize] as f64 - z.ln();
            assert!((d.sample_logprob as f64 - expected).abs() < 1e-5, "{d:?}");
            assert!((d.logprob as f64 - expected).abs() < 1e-5, "{d:?}");
        }
        for (i, &c) in counts.iter().enumerate() {
            let p = (logits[i] as f64).exp() / z;
            let se = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (c as f64 / n as f64 - p).abs() < 4.0 * se,
                "token {i}: {c} of {n}, p {p} (seed {seed})"
            );
        }
    }

    #[test]
    fn min_p_drops_tokens_far_less_likely_than_the_best() {
        // Relative probabilities 1, e^-1 = 0.37, e^-2 = 0.14, e^-3 = 0.05, e^-4 = 0.02:
        // min_p 0.1 keeps the first three, and a draw's log-probability is renormalised
        // over them (checked against the closed form).
        let logits = [3.0f32, 2.0, 1.0, 0.0, -1.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            min_p: 0.1,
            max_tokens: 1,
        };
        let kept: f64 = (0..3).map(|i| (-(i as f64)).exp()).sum();
        let mut rng = seeded_rng(2);
        let mut counts = [0usize; 5];
        for _ in 0..4000 {
            let d = draw(&logits, &params, &mut rng);
            counts[d.token as usize] += 1;
            let expected = -(d.token as f64) - kept.ln();
            assert!((d.sample_logprob as f64 - expected).abs() < 1e-5, "{d:?}");
        }
        assert_eq!(counts[3] + counts[4], 0, "{counts:?}");
        assert!(counts[2] > 0, "{counts:?}");
        // Off, every token can be drawn.
        let off = SamplingParams {
            min_p: 0.0,
            ..params
        };
        let drawn: std::collections::BTreeSet<u32> =
            (0..4000).map(|_| sample(&logits, &off, &mut rng)).collect();
        assert_eq!(drawn.len(), 5, "{drawn:?}");
    }
}
