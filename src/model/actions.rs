//! Prompts and their sampled answers as PPO reads them: every answer token is an action, taken
//! in the state of the position before it. The policy and the reference give each action's
//! log-probability, the value model (a reward model whose head is read at every position) the
//! value of that state.
//!
//! Sequences are right-padded under a causal mask, so padding after a sequence cannot change
//! any position of it; only the action positions are read out (a flat `[actions]` tensor), so
//! padding never reaches a loss either.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use crate::kernels::SequenceLayout;
use crate::model::Llama;
use crate::model::reward::RewardModel;

/// A batch of `prompt ++ answer` sequences, with where each answer token is predicted.
#[derive(Debug, Clone)]
pub struct ActionBatch {
    pub rows: usize,
    pub seq_len: usize,
    /// `[rows * seq_len]` token ids, each row right-padded.
    pub tokens: Vec<i64>,
    /// Flat index (`row * seq_len + position`) of the state before each action, row by row.
    pub states: Vec<i64>,
    /// The actions (answer tokens), in the same order.
    pub actions: Vec<i64>,
    /// Actions per row.
    pub lengths: Vec<usize>,
}

impl ActionBatch {
    /// `sequences[i] = (prompt, answer)`; both non-empty.
    pub fn new(sequences: &[(&[u32], &[u32])], pad_id: u32) -> Self {
        assert!(
            sequences
                .iter()
                .all(|(p, a)| !p.is_empty() && !a.is_empty()),
            "every sequence needs a prompt and at least one answer token"
        );
        let seq_len = sequences
            .iter()
            .map(|(p, a)| p.len() + a.len())
            .max()
            .unwrap_or(1);
        let mut batch = Self {
            rows: sequences.len(),
            seq_len,
            tokens: Vec::with_capacity(sequences.len() * seq_len),
            states: Vec::new(),
            actions: Vec::new(),
            lengths: Vec::with_capacity(sequences.len()),
        };
        for (row, (prompt, answer)) in sequences.iter().enumerate() {
            let len = prompt.len() + answer.len();
            let ids = prompt.iter().chain(answer.iter()).map(|&t| t as i64);
            batch.tokens.extend(ids);
            batch
                .tokens
                .extend(std::iter::repeat_n(pad_id as i64, seq_len - len));
            // The logits at position p predict the token at p + 1.
            let first = row * seq_len + prompt.len() - 1;
            batch
                .states
                .extend((first..first + answer.len()).map(|i| i as i64));
            batch.actions.extend(answer.iter().map(|&t| t as i64));
            batch.lengths.push(answer.len());
        }
        batch
    }

    pub fn num_actions(&self) -> usize {
        self.actions.len()
    }

    /// The hidden states of `model`'s backbone at the action states, `[actions, dim]`.
    fn hidden_at_states(&self, backbone: &Llama) -> Tensor<2> {
        let device = backbone.device();
        let tokens = Tensor::<2, Int>::from_data(
            TensorData::new(self.tokens.clone(), [self.rows, self.seq_len]),
            &device,
        );
        let layout = SequenceLayout::causal(self.rows, self.seq_len);
        let hidden = backbone.hidden_states_with_layout(tokens, &layout, None);
        let dim = hidden.dims()[2];
        let states = Tensor::<1, Int>::from_data(
            TensorData::new(self.states.clone(), [self.states.len()]),
            &device,
        );
        hidden
            .reshape([self.rows * self.seq_len, dim])
            .select(0, states)
    }
}

/// Log-probabilities of the actions under `model` (`[actions]`, differentiable on an
/// autodiff device).
pub fn action_logprobs(model: &Llama, batch: &ActionBatch) -> Tensor<1> {
    let (logp, actions) = log_softmax_at_actions(model, batch);
    let n = batch.num_actions();
    logp.gather(1, actions).reshape([n])
}

/// [`action_logprobs`], and the entropy of the model's distribution at each action's state
/// (detached: a metric).
pub fn action_logprobs_and_entropy(model: &Llama, batch: &ActionBatch) -> (Tensor<1>, Tensor<1>) {
    let (logp, actions) = log_softmax_at_actions(model, batch);
    let n = batch.num_actions();
    let detached = logp.clone().detach();
    let entropy = -(detached.clone().exp() * detached).sum_dim(1).reshape([n]);
    (logp.gather(1, actions).reshape([n]), entropy)
}

/// Log-softmax of the next-token logits at every action state, `[actions, vocab]`, and the
/// actions as gather indices, `[actions, 1]`.
fn log_softmax_at_actions(model: &Llama, batch: &ActionBatch) -> (Tensor<2>, Tensor<2, Int>) {
    let n = batch.num_actions();
    let logits = model.logits(batch.hidden_at_states(model).unsqueeze_dim(0));
    let vocab = logits.dims()[2];
    let logp = log_softmax(logits.reshape([n, vocab]), 1);
    let actions = Tensor::<2, Int>::from_data(
        TensorData::new(batch.actions.clone(), [n, 1]),
        &model.device(),
    );
    (logp, actions)
}

/// The value of each action's state under the value model: its scalar head read at every
/// position (`[actions]`).
pub fn action_values(model: &RewardModel, batch: &ActionBatch) -> Tensor<1> {
    let n = batch.num_actions();
    model
        .score
        .forward(batch.hidden_at_states(&model.backbone))
        .reshape([n])
}

/// Splits a flat per-action vector into one row per sequence.
pub fn split_rows<T: Clone>(flat: &[T], lengths: &[usize]) -> Vec<Vec<T>> {
    let mut rest = flat;
    lengths
        .iter()
        .map(|&n| {
            let (row, tail) = rest.split_at(n);
            rest = tail;
            row.to_vec()
        })
        .collect()
}
