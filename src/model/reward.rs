//! The reward model (and, next, PPO's value model): the chat backbone with a scalar head
//! instead of the next-token head, read at chosen positions. `ScoreBatch` lays sequences out
//! for it; `shared_prefix_scores` runs a group's shared prompt once into a KV cache for all its
//! answers (a preference pair's two, rejection sampling's K).

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::ModelConfig;
use crate::data::chat::Rating;
use crate::kernels::SequenceLayout;
use crate::model::{KvCache, Linear, Llama};

/// The chat backbone and a scalar head.
#[derive(Module, Debug)]
pub struct RewardModel {
    /// The chat model; its next-token head is dropped (`lm_head` is `None`).
    pub backbone: Llama,
    /// `[1, dim]`: the regression head, read at the last token of the response.
    pub score: Linear,
}

impl RewardModel {
    /// A reward model of shape `config`: a fresh backbone and a head drawn from N(0, init_std).
    pub fn new(config: &ModelConfig, seed: u64, device: &Device) -> Self {
        let mut backbone = Llama::new(config, seed, device);
        backbone.lm_head = None;
        Self {
            backbone,
            score: Self::fresh_head(config, seed, device),
        }
    }

    /// A reward model of shape `config` with zero weights, for a checkpoint to fill (no
    /// random draws that would be overwritten).
    pub fn for_import(config: &ModelConfig, device: &Device) -> Self {
        let mut backbone = Llama::for_import(config, device);
        backbone.lm_head = None;
        Self {
            backbone,
            score: Linear {
                weight: Param::from_tensor(Tensor::zeros([1, config.dim], device)),
            },
        }
    }

    /// A scalar head drawn from N(0, init_std).
    pub fn fresh_head(config: &ModelConfig, seed: u64, device: &Device) -> Linear {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5c0e);
        let normal = Normal::new(0.0, config.init_std as f32).expect("valid std");
        let values: Vec<f32> = (0..config.dim).map(|_| normal.sample(&mut rng)).collect();
        Linear {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(values, [1, config.dim]),
                device,
            )),
        }
    }

    /// Scores of the sequences of `batch`, in the batch's order (raw scale).
    pub fn scores(&self, batch: &ScoreBatch) -> Tensor<1> {
        let device = self.backbone.device();
        let [b, t] = [batch.rows, batch.seq_len];
        let tokens =
            Tensor::<2, Int>::from_data(TensorData::new(batch.tokens.clone(), [b, t]), &device);
        let hidden = self
            .backbone
            .hidden_states_with_layout(tokens, &batch.layout, None);
        self.score_at(hidden, &batch.last)
    }

    /// The head applied to `hidden` (`[batch, seq, dim]`) at the flat positions
    /// `row * seq + position` of `last`.
    fn score_at(&self, hidden: Tensor<3>, last: &[usize]) -> Tensor<1> {
        let [b, t, d] = hidden.dims();
        let last = Tensor::<1, Int>::from_data(
            TensorData::new(last.iter().map(|&i| i as i64).collect(), [last.len()]),
            &hidden.device(),
        );
        let n = last.dims()[0];
        let picked = hidden.reshape([b * t, d]).select(0, last);
        self.score.forward(picked).reshape([n])
    }
}

/// How sequences of different lengths share a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrangement {
    /// One sequence per row, padding after it.
    RightPadded,
    /// One sequence per row, padding before it (masked as its own segment).
    LeftPadded,
    /// Sequences concatenated into rows of this many tokens, each attending only within itself.
    Packed(usize),
}

/// Token sequences laid out for one forward pass, with where each sequence's last token is.
pub struct ScoreBatch {
    pub rows: usize,
    pub seq_len: usize,
    pub tokens: Vec<i64>,
    pub layout: SequenceLayout,
    /// Flat index (`row * seq_len + position`) of each sequence's last token.
    pub last: Vec<usize>,
}

impl ScoreBatch {
    pub fn new(sequences: &[Vec<u32>], arrangement: Arrangement, pad_id: u32) -> Self {
        let pad = pad_id as i64;
        match arrangement {
            Arrangement::RightPadded | Arrangement::LeftPadded => {
                let t = sequences.iter().map(Vec::len).max().unwrap_or(1).max(1);
                let left = arrangement == Arrangement::LeftPadded;
                let mut tokens = Vec::with_capacity(sequences.len() * t);
                let mut last = Vec::new();
                for (row, s) in sequences.iter().enumerate() {
                    let fill = std::iter::repeat_n(pad, t - s.len());
                    let ids = s.iter().map(|&x| x as i64);
                    if left {
                        tokens.extend(fill.chain(ids));
                        last.push(row * t + t - 1);
                    } else {
                        tokens.extend(ids.chain(fill));
                        last.push(row * t + s.len() - 1);
                    }
                }
                let layout = if left {
                    let pads: Vec<usize> = sequences.iter().map(|s| t - s.len()).collect();
                    SequenceLayout::cached(&pads, 0, t)
                } else {
                    SequenceLayout::causal(sequences.len(), t)
                };
                Self {
                    rows: sequences.len(),
                    seq_len: t,
                    tokens,
                    layout,
                    last,
                }
            }
            Arrangement::Packed(t) => {
                let mut rows: Vec<(Vec<i64>, Vec<i32>)> = Vec::new();
                let mut last = Vec::new();
                for s in sequences {
                    assert!(s.len() <= t, "a sequence longer than the packed row");
                    if rows.last().is_none_or(|r| r.0.len() + s.len() > t) {
                        rows.push((Vec::new(), Vec::new()));
                    }
                    let row = rows.len() - 1;
                    let (ids, segments) = rows.last_mut().expect("a row");
                    let segment = segments.last().map_or(0, |&g| g + 1);
                    ids.extend(s.iter().map(|&x| x as i64));
                    segments.extend(std::iter::repeat_n(segment, s.len()));
                    last.push(row * t + ids.len() - 1);
                }
                let mut tokens = Vec::with_capacity(rows.len() * t);
                let mut all_segments = Vec::with_capacity(rows.len() * t);
                for (ids, segments) in &rows {
                    let next = segments.last().map_or(0, |&g| g + 1);
                    tokens.extend(
                        ids.iter()
                            .copied()
                            .chain(std::iter::repeat_n(pad, t - ids.len())),
                    );
                    all_segments.extend(
                        segments
                            .iter()
                            .copied()
                            .chain(std::iter::repeat_n(next, t - ids.len())),
                    );
                }
                Self {
                    rows: rows.len(),
                    seq_len: t,
                    tokens,
                    layout: SequenceLayout::packed(rows.len(), t, all_segments),
                    last,
                }
            }
        }
    }
}

/// A preference pair in tokens: prompt + chosen and prompt + rejected, each ending with the
/// answer's end marker.
#[derive(Debug, Clone)]
pub struct EncodedPair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub rating: Rating,
    pub safety: bool,
}

/// Scores of the chosen and rejected answers of `pairs`: [`shared_prefix_scores`] with
/// groups of two. Gradients flow through the cache into the prompt's pass, with either kernel
/// set.
pub fn pair_scores(
    model: &RewardModel,
    pairs: &[&EncodedPair],
    pad_id: u32,
) -> (Tensor<1>, Tensor<1>) {
    let n = pairs.len();
    let groups: Vec<Vec<&[u32]>> = pairs
        .iter()
        .map(|p| vec![p.chosen.as_slice(), p.rejected.as_slice()])
        .collect();
    let scores = shared_prefix_scores(model, &groups, pad_id);
    (scores.clone().slice([0..n]), scores.slice([n..2 * n]))
}

/// Scores of groups of sequences that share a prefix (a prompt's K answers; a pair's two).
/// Every group has the same number of sequences, K. Each group's common prefix goes through
/// the model once, left-padded, into a KV cache; the cache is repeated K times and the K
/// continuations run as one batch of `K * groups.len()` rows. Returns the scores ordered
/// sequence-major: index `k * groups.len() + g` is sequence `k` of group `g`.
pub fn shared_prefix_scores(model: &RewardModel, groups: &[Vec<&[u32]>], pad_id: u32) -> Tensor<1> {
    let k = groups.first().map_or(0, Vec::len);
    assert!(
        k > 0 && groups.iter().all(|g| g.len() == k),
        "every group needs the same, non-zero number of sequences"
    );
    assert!(
        groups.iter().flatten().all(|s| !s.is_empty()),
        "an empty sequence has no token to score"
    );
    let device = model.backbone.device();
    let ids = |rows: Vec<Vec<i64>>, len: usize| {
        let batch = rows.len();
        let values: Vec<i64> = rows.into_iter().flatten().collect();
        Tensor::<2, Int>::from_data(TensorData::new(values, [batch, len]), &device)
    };
    // The shared prefix, leaving at least one token of each sequence to read the score at.
    let prefix: Vec<usize> = groups
        .iter()
        .map(|g| {
            let first = g[0];
            let common = g[1..].iter().fold(first.len(), |common, s| {
                common.min(first.iter().zip(*s).take_while(|(a, b)| a == b).count())
            });
            let shortest = g.iter().map(|s| s.len()).min().expect("a sequence");
            common.min(shortest - 1).max(1)
        })
        .collect();
    let prompt_len = *prefix.iter().max().expect("at least one group");
    let left_pad: Vec<usize> = prefix.iter().map(|&p| prompt_len - p).collect();
    let pad = pad_id as i64;
    let prompts: Vec<Vec<i64>> = groups
        .iter()
        .zip(&prefix)
        .map(|(g, &len)| {
            std::iter::repeat_n(pad, prompt_len - len)
                .chain(g[0][..len].iter().map(|&t| t as i64))
                .collect()
        })
        .collect();
    let mut cache = KvCache::new(model.backbone.config.n_layers, left_pad);
    model
        .backbone
        .hidden_states(ids(prompts, prompt_len), Some(&mut cache));
    let mut cache = cache.repeat(k);
    let rests: Vec<&[u32]> = (0..k)
        .flat_map(|i| {
            groups
                .iter()
                .zip(&prefix)
                .map(move |(g, &len)| &g[i][len..])
        })
        .collect();
    let rest_len = rests.iter().map(|a| a.len()).max().expect("sequences");
    let rows: Vec<Vec<i64>> = rests
        .iter()
        .map(|a| {
            a.iter()
                .map(|&t| t as i64)
                .chain(std::iter::repeat_n(pad, rest_len - a.len()))
                .collect()
        })
        .collect();
    let hidden = model
        .backbone
        .hidden_states(ids(rows, rest_len), Some(&mut cache));
    let last: Vec<usize> = rests
        .iter()
        .enumerate()
        .map(|(row, a)| row * rest_len + a.len() - 1)
        .collect();
    model.score_at(hidden, &last)
}
