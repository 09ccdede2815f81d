//! PPO's objective, one piece per function (InstructGPT's recipe, which Llama 2 sec. 3.2.3
//! follows): the per-token KL penalty against the reference policy, the scalar reward on the
//! answer's last token, GAE advantages, whitening, and the clipped policy and value losses.
//!
//! Rewards, values and advantages are per answer token and live on the host in f64 (an
//! answer is a few hundred numbers); the two losses are tensors, because they are
//! differentiated. Answers are ragged rows (`Vec<Vec<f64>>`): padding never exists here, so
//! it cannot enter a mean or a variance.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// How the KL between the policy and the reference is estimated from one sampled token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `log pi(a) - log pi_ref(a)`: unbiased, negative for some tokens.
    K1,
    /// `(r - 1) - log r` with `r = pi_ref(a) / pi(a)`: unbiased, never negative (Schulman's
    /// k3).
    K3,
}

impl KlEstimator {
    /// The estimate of one sampled token from its log-ratio `log pi(a) - log pi_ref(a)`.
    pub fn of_log_ratio(self, log_ratio: f64) -> f64 {
        match self {
            KlEstimator::K1 => log_ratio,
            KlEstimator::K3 => (-log_ratio).exp_m1() + log_ratio,
        }
    }
}

/// The scalar each answer's last token gets: `logit(R_c)` whitened over the rollout's
/// finished answers; with `missing_eos = Some(score)`, an answer that did not finish gets
/// `score` instead (and stays out of the whitening statistics), else it is whitened with
/// the rest. With `group` > 1 answers a prompt (consecutive), each scored logit is first
/// taken against its prompt's other scored answers ([`group_baseline`]).
pub fn answer_scores(
    logits: &[f64],
    complete: &[bool],
    missing_eos: Option<f64>,
    group: usize,
) -> Vec<f64> {
    let penalised: Vec<bool> = complete
        .iter()
        .map(|&c| missing_eos.is_some() && !c)
        .collect();
    let grouped;
    let logits = if group > 1 {
        let scored: Vec<bool> = penalised.iter().map(|&p| !p).collect();
        grouped = group_baseline(logits, &scored, group);
        &grouped
    } else {
        logits
    };
    let scored: Vec<f64> = logits
        .iter()
        .zip(&penalised)
        .filter(|(_, p)| !**p)
        .map(|(l, _)| *l)
        .collect();
    let mut whitened = whiten(&scored).into_iter();
    penalised
        .iter()
        .map(|&p| match (p, missing_eos) {
            (true, Some(score)) => score,
            _ => whitened.next().expect("one per scored answer"),
        })
        .collect()
}

/// Several answers to each prompt (`group` consecutive answers a prompt): each scored
/// answer's logit minus the mean logit of the other scored answers to its prompt, RLOO's
/// leave-one-out baseline. It removes what the reward models say of the prompt (a sum
/// scores about 0.84, a sorted list 0.15, right or wrong) and keeps what they say of the
/// answer, which a value model has to learn from one answer a prompt. An answer without a
/// scored sibling gets 0 (nothing to compare it with); unscored answers (`scored` false:
/// the missing-EOS penalty replaces their score) keep their logit and count for nobody.
pub fn group_baseline(logits: &[f64], scored: &[bool], group: usize) -> Vec<f64> {
    assert_eq!(logits.len(), scored.len(), "one flag per logit");
    assert!(
        group > 0 && logits.len().is_multiple_of(group),
        "whole groups of {group}"
    );
    let mut out = logits.to_vec();
    for (values, flags) in out.chunks_mut(group).zip(scored.chunks(group)) {
        let n = flags.iter().filter(|&&f| f).count();
        let sum: f64 = values
            .iter()
            .zip(flags)
            .filter(|(_, f)| **f)
            .map(|(v, _)| v)
            .sum();
        for (v, &f) in values.iter_mut().zip(flags) {
            if f {
                *v = if n > 1 {
                    *v - (sum - *v) / (n - 1) as f64
                } else {
                    0.0
                };
            }
        }
    }
    out
}

/// Per-token rewards of one answer: `-beta * kl_t` at every token, plus `score` at the last
/// one (the end-of-answer token when the answer finished).
pub fn token_rewards(kl: &[f64], beta: f64, score: f64) -> Vec<f64> {
    let mut rewards: Vec<f64> = kl.iter().map(|k| -beta * k).collect();
    if let Some(last) = rewards.last_mut() {
        *last += score;
    }
    rewards
}

/// Generalised advantage estimation over one answer's tokens: `delta_t = r_t + gamma *
/// V_{t+1} - V_t` (the value after the last token is 0: the episode ends), `A_t = delta_t +
/// gamma * lambda * A_{t+1}`. Returns the advantages and the returns `A_t + V_t` (the value
/// model's targets).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lambda: f64) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(rewards.len(), values.len(), "one value per reward");
    let n = rewards.len();
    let mut advantages = vec![0.0; n];
    let mut next_advantage = 0.0;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        next_advantage = delta + gamma * lambda * next_advantage;
        advantages[t] = next_advantage;
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    (advantages, returns)
}

/// Mean and (unbiased) standard deviation of `values`; the deviation of fewer than two values
/// is 0.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, var.sqrt())
}

/// `(x - mean) / sqrt(var + 1e-8)` over `values`, with the batch's own statistics: no running
/// statistics are kept across batches (Llama 2's WHITEN; TRL and OpenRLHF do the same per
/// batch). A batch of one value whitens to 0.
pub fn whiten(values: &[f64]) -> Vec<f64> {
    let (mean, std) = mean_std(values);
    let scale = 1.0 / (std * std + 1e-8).sqrt();
    values.iter().map(|v| (v - mean) * scale).collect()
}

/// [`whiten`] over every token of every answer together (ragged rows, no padding).
pub fn whiten_tokens(rows: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    let mut whitened = whiten(&flat).into_iter();
    rows.iter()
        .map(|row| whitened.by_ref().take(row.len()).collect())
        .collect()
}

/// The adaptive KL controller of Ziegler et al. (2019): `beta` grows when the measured KL
/// per answer exceeds `target` and shrinks below it, by at most 20% of `answers / horizon`
/// per update. A target of 0 keeps `beta` fixed (the paper's choice).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KlController {
    pub beta: f64,
    pub target: f64,
    pub horizon: f64,
}

impl KlController {
    /// `kl` is the mean KL summed over each answer's tokens, over `answers` answers.
    pub fn update(&mut self, kl: f64, answers: usize) {
        if self.target <= 0.0 || !kl.is_finite() {
            return;
        }
        let error = (kl / self.target - 1.0).clamp(-0.2, 0.2);
        self.beta *= 1.0 + error * answers as f64 / self.horizon;
    }
}

/// PPO's clipped surrogate per token: `max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip))`
/// with `ratio = exp(logprob - old_logprob)`. Minimising it raises the probability of tokens
/// with positive advantage, but not beyond the clip range of the sampling policy.
pub fn clipped_policy_loss(
    logprobs: Tensor<1>,
    old_logprobs: Tensor<1>,
    advantages: Tensor<1>,
    clip: f64,
) -> Tensor<1> {
    let ratio = (logprobs - old_logprobs).exp();
    let unclipped = -advantages.clone() * ratio.clone();
    let clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip);
    unclipped.max_pair(clipped)
}

/// The clipped value loss per token: `0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c)
/// - R)^2)`: the value model may not move further than `clip` from its rollout-time value.
pub fn clipped_value_loss(
    values: Tensor<1>,
    old_values: Tensor<1>,
    returns: Tensor<1>,
    clip: f64,
) -> Tensor<1> {
    let clipped = old_values.clone() + (values.clone() - old_values).clamp(-clip, clip);
    let unclipped = (values - returns.clone()).square();
    let clipped = (clipped - returns).square();
    unclipped.max_pair(clipped).mul_scalar(0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_estimators_by_hand() {
        // log pi = -1, log pi_ref = -2: k1 = 1; k3 = (e^-1 - 1) + 1 = e^-1.
        assert!((KlEstimator::K1.of_log_ratio(-1.0 - (-2.0)) - 1.0).abs() < 1e-15);
        let k3 = KlEstimator::K3.of_log_ratio(-1.0 - (-2.0));
        assert!((k3 - (-1f64).exp()).abs() < 1e-15, "{k3}");
        // The other way round k1 is negative, k3 is not: (e^1 - 1) - 1.
        assert!((KlEstimator::K1.of_log_ratio(-2.0 - (-1.0)) + 1.0).abs() < 1e-15);
        let k3 = KlEstimator::K3.of_log_ratio(-2.0 - (-1.0));
        assert!((k3 - (1f64.exp() - 2.0)).abs() < 1e-15, "{k3}");
        // Equal policies: 0 for both.
        assert_eq!(KlEstimator::K3.of_log_ratio(-0.3 - (-0.3)), 0.0);
    }

    #[test]
    fn group_baseline_against_a_naive_loop_and_by_hand() {
        // By hand: group [1, 2, 6]: 1 - 4, 2 - 3.5, 6 - 1.5; group [3, x, 5] with x
        // unscored: 3 - 5, x kept, 5 - 3; group [7, x, x]: alone, 0.
        let logits = [1.0, 2.0, 6.0, 3.0, 9.0, 5.0, 7.0, 8.0, 8.0];
        let scored = [true, true, true, true, false, true, true, false, false];
        let b = group_baseline(&logits, &scored, 3);
        assert_eq!(b, vec![-3.0, -1.5, 4.5, -2.0, 9.0, 2.0, 0.0, 8.0, 8.0]);
        // Random groups against the definition, with a seed printed on failure.
        let seed: u64 = rand::random();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        use rand::Rng;
        for group in [1usize, 2, 5] {
            let n = group * 7;
            let logits: Vec<f64> = (0..n).map(|_| rng.random_range(-6.0..6.0)).collect();
            let scored: Vec<bool> = (0..n).map(|_| rng.random_bool(0.8)).collect();
            let b = group_baseline(&logits, &scored, group);
            for i in 0..n {
                let g = i / group * group;
                let others: Vec<f64> = (g..g + group)
                    .filter(|&j| j != i && scored[j])
                    .map(|j| logits[j])
                    .collect();
                let expected = match (scored[i], others.len()) {
                    (false, _) => logits[i],
                    (true, 0) => 0.0,
                    (true, k) => logits[i] - others.iter().sum::<f64>() / k as f64,
                };
                assert!(
                    (b[i] - expected).abs() < 1e-12,
                    "seed {seed}, group {group}, answer {i}"
                );
            }
        }
    }

    #[test]
    fn unfinished_answers_get_the_penalty_and_stay_out_of_the_statistics() {
        let logits = [1.0, 5.0, 3.0, -40.0];
        let complete = [true, false, true, false];
        let s = answer_scores(&logits, &complete, Some(-2.0), 1);
        // The finished answers 1.0 and 3.0 whiten to -/+ 1/sqrt(2) (unbiased variance 2).
        let w = 1.0 / (2.0f64 + 1e-8).sqrt();
        assert!(
            (s[0] + w).abs() < 1e-12 && (s[2] - w).abs() < 1e-12,
            "{s:?}"
        );
        assert_eq!((s[1], s[3]), (-2.0, -2.0));
        // Without the penalty every answer is whitened together.
        let s = answer_scores(&logits, &complete, None, 1);
        assert!((s.iter().sum::<f64>()).abs() < 1e-9);
        assert!(s[3] < s[0] && s[0] < s[2] && s[2] < s[1]);
    }

    #[test]
    fn the_score_lands_on_the_last_token() {
        let r = token_rewards(&[0.5, -1.0, 2.0], 0.1, 3.0);
        assert_eq!(r, vec![-0.05, 0.1, -0.2 + 3.0]);
        assert!(token_rewards(&[], 0.1, 3.0).is_empty());
    }

    #[test]
    fn the_controller_moves_beta_towards_the_target() {
        let mut c = KlController {
            beta: 0.1,
            target: 6.0,
            horizon: 10_000.0,
        };
        // KL twice the target: the error is clipped to +0.2.
        c.update(12.0, 512);
        assert!((c.beta - 0.1 * (1.0 + 0.2 * 512.0 / 10_000.0)).abs() < 1e-15);
        let before = c.beta;
        c.update(3.0, 512);
        // Half the target: clipped to -0.2.
        assert!((c.beta - before * (1.0 - 0.2 * 512.0 / 10_000.0)).abs() < 1e-15);
        // A target of 0 is a fixed beta.
        let mut fixed = KlController { target: 0.0, ..c };
        fixed.update(100.0, 512);
        assert_eq!(fixed.beta, c.beta);
    }
}
