//! PPO's objective against independent references (f64 CPU device for this whole binary):
//! GAE against its closed form and a naive double loop, whitening against a hand-written
//! reference over real tokens only, the clipped losses by hand on both sides of the clip and
//! their gradients by central finite differences, and padding invariance of the log-probs,
//! values and losses of a batch of answers of different lengths. Inputs are fresh random
//! values each run (the seed is printed).

use burn::module::Module;
use kiln::config::ModelConfig;
use kiln::model::Llama;
use kiln::model::actions::{
    ActionBatch, action_logprobs, action_logprobs_and_entropy, action_values,
};
use kiln::model::reward::RewardModel;
use kiln::train::ppo_objective::{
    clipped_policy_loss, clipped_value_loss, gae, whiten, whiten_tokens,
};
use rand::Rng;

mod common;
use common::numeric::{assert_close, check_gradients, device, randn, tensor, values};
use common::rng;

/// Tolerance of f64 results against the references.
const TOL: f64 = 1e-12;

#[test]
fn gae_matches_the_closed_form() {
    // values = rewards = [0, 0, 0, 1], gamma 0.9, lambda 0.95: returns [g^3 l^2, g^2 l, g, 1]
    // (torchtune's test_rewards.py).
    let (g, l) = (0.9f64, 0.95f64);
    let x = [0.0, 0.0, 0.0, 1.0];
    let (advantages, returns) = gae(&x, &x, g, l);
    let expected = [g.powi(3) * l.powi(2), g.powi(2) * l, g, 1.0];
    assert_close(&returns, &expected, TOL, "returns");
    let expected_adv: Vec<f64> = expected.iter().zip(&x).map(|(r, v)| r - v).collect();
    assert_close(&advantages, &expected_adv, TOL, "advantages");
}

#[test]
fn gae_matches_a_naive_double_loop() {
    let mut rng = rng();
    for _ in 0..20 {
        let n = rng.random_range(1..24);
        let rewards = randn(&mut rng, n);
        let values = randn(&mut rng, n);
        let (gamma, lambda) = (rng.random_range(0.5..1.0), rng.random_range(0.0..1.0));
        // A_t = sum_k (gamma lambda)^k delta_{t+k}, each delta from its definition.
        let value = |t: usize| if t < n { values[t] } else { 0.0 };
        let delta = |t: usize| rewards[t] + gamma * value(t + 1) - value(t);
        let naive: Vec<f64> = (0..n)
            .map(|t| {
                (t..n)
                    .map(|k| (gamma * lambda).powi((k - t) as i32) * delta(k))
                    .sum()
            })
            .collect();
        let (advantages, returns) = gae(&rewards, &values, gamma, lambda);
        assert_close(&advantages, &naive, 1e-10, "advantages");
        let naive_returns: Vec<f64> = naive.iter().zip(&values).map(|(a, v)| a + v).collect();
        assert_close(&returns, &naive_returns, 1e-10, "returns");
    }
}

#[test]
fn whitening_uses_real_tokens_only() {
    let mut rng = rng();
    // Ragged answers: the whitening runs over their tokens, never over padding.
    let rows: Vec<Vec<f64>> = (0..7)
        .map(|_| {
            let n = rng.random_range(1..9);
            randn(&mut rng, n).iter().map(|v| 3.0 * v + 2.0).collect()
        })
        .collect();
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    let n = flat.len() as f64;
    let mean = flat.iter().sum::<f64>() / n;
    let var = flat.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    let expected: Vec<f64> = flat
        .iter()
        .map(|v| (v - mean) / (var + 1e-8).sqrt())
        .collect();
    let whitened = whiten_tokens(&rows);
    for (row, w) in rows.iter().zip(&whitened) {
        assert_eq!(row.len(), w.len());
    }
    let got: Vec<f64> = whitened.into_iter().flatten().collect();
    assert_close(&got, &expected, TOL, "whitened");
    // Padding the rows to one length with zeros and whitening the padded matrix is what
    // must not happen: it gives other values.
    let longest = rows.iter().map(Vec::len).max().unwrap();
    let padded: Vec<f64> = rows
        .iter()
        .flat_map(|r| {
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(0.0, longest - r.len()))
        })
        .collect();
    if padded.len() > flat.len() {
        let wrong = whiten(&padded);
        assert!((wrong[0] - got[0]).abs() > 1e-6, "padding changed nothing?");
    }
    // No running statistics: a batch whitens the same whatever came before, and a shifted,
    // scaled batch whitens to the same values (up to the 1e-8 added to the variance).
    let moved: Vec<f64> = flat.iter().map(|v| 10.0 * v - 7.0).collect();
    assert_close(&whiten(&moved), &whiten(&flat), 1e-7, "affine invariance");
    assert_eq!(whiten(&[4.2]), vec![0.0]);
}

/// Log-ratios away from the clip boundaries (finite differences must not straddle a kink).
fn log_ratios(rng: &mut impl Rng, n: usize, clip: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            loop {
                let d: f64 = rng.random_range(-0.6..0.6);
                let r = d.exp();
                if (r - (1.0 - clip)).abs() > 1e-3 && (r - (1.0 + clip)).abs() > 1e-3 {
                    break d;
                }
            }
        })
        .collect()
}

#[test]
fn the_clipped_policy_loss_by_hand_and_by_finite_differences() {
    let clip = 0.2;
    // (ratio, advantage, loss): inside the clip; above it with A > 0 (clipped); below it
    // with A > 0 (unclipped: the pessimistic bound); below with A < 0 (clipped); above with
    // A < 0 (unclipped).
    let cases = [
        (1.1, 2.0, -2.2),
        (1.5, 2.0, -2.4),
        (0.5, 2.0, -1.0),
        (0.5, -2.0, 1.6),
        (1.5, -2.0, 3.0),
    ];
    let logp: Vec<f64> = cases.iter().map(|c| f64::ln(c.0)).collect();
    let old = vec![0.0; cases.len()];
    let adv: Vec<f64> = cases.iter().map(|c| c.1).collect();
    let n = cases.len();
    let loss = values(clipped_policy_loss(
        tensor(&logp, [n]),
        tensor(&old, [n]),
        tensor(&adv, [n]),
        clip,
    ));
    let expected: Vec<f64> = cases.iter().map(|c| c.2).collect();
    assert_close(&loss, &expected, TOL, "policy loss");
    // The gradient is -A * ratio where the unclipped term is the max, 0 where the clip holds.
    let logp_t = tensor(&logp, [n]).require_grad();
    let grads = clipped_policy_loss(logp_t.clone(), tensor(&old, [n]), tensor(&adv, [n]), clip)
        .sum()
        .backward();
    let grad = values(logp_t.grad(&grads).unwrap());
    let expected_grad = [-2.2, 0.0, -1.0, 0.0, 3.0];
    assert_close(&grad, &expected_grad, TOL, "d loss / d logprob");

    let mut rng = rng();
    let m = 11;
    let ratios = log_ratios(&mut rng, m, clip);
    let old = randn(&mut rng, m);
    let logp: Vec<f64> = old.iter().zip(&ratios).map(|(o, d)| o + d).collect();
    let adv = randn(&mut rng, m);
    check_gradients(
        &[(logp, [m]), (old, [m]), (adv, [m])],
        |t| clipped_policy_loss(t[0].clone(), t[1].clone(), t[2].clone(), clip),
        &mut rng,
        "clipped policy loss",
    );
}

#[test]
fn the_clipped_value_loss_by_hand_and_by_finite_differences() {
    let clip = 0.2;
    // (value, old value, return, loss): inside the clip; moved past it towards the return
    // (the clipped value is further, so it counts); moved past it away from the return.
    let cases = [
        (0.1, 0.0, 1.0, 0.5 * 0.81),
        (0.9, 0.0, 1.0, 0.5 * 0.64),
        (-0.5, 0.0, 1.0, 0.5 * 2.25),
    ];
    let n = cases.len();
    let col = |k: usize| -> Vec<f64> {
        cases
            .iter()
            .map(|c| [c.0, c.1, c.2][k])
            .collect::<Vec<f64>>()
    };
    let loss = values(clipped_value_loss(
        tensor(&col(0), [n]),
        tensor(&col(1), [n]),
        tensor(&col(2), [n]),
        clip,
    ));
    let expected: Vec<f64> = cases.iter().map(|c| c.3).collect();
    assert_close(&loss, &expected, TOL, "value loss");

    let mut rng = rng();
    let m = 9;
    let old = randn(&mut rng, m);
    // Moves away from +-clip, so no difference straddles the kink.
    let moves: Vec<f64> = (0..m)
        .map(|_| {
            loop {
                let d: f64 = rng.random_range(-0.6..0.6);
                if (d.abs() - clip).abs() > 1e-3 {
                    break d;
                }
            }
        })
        .collect();
    let v: Vec<f64> = old.iter().zip(&moves).map(|(o, d)| o + d).collect();
    let returns = randn(&mut rng, m);
    check_gradients(
        &[(v, [m]), (old, [m]), (returns, [m])],
        |t| clipped_value_loss(t[0].clone(), t[1].clone(), t[2].clone(), clip),
        &mut rng,
        "clipped value loss",
    );
}

fn tiny_config() -> ModelConfig {
    ModelConfig {
        dim: 16,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        ffn_dim: 24,
        vocab_size: 37,
        max_seq_len: 40,
        init_std: 0.3,
        ..ModelConfig::default()
    }
}

#[test]
fn padding_leaves_log_probs_values_and_losses_unchanged() {
    let mut rng = rng();
    let config = tiny_config();
    let seed = rng.random();
    let policy = Llama::new(&config, seed, &device());
    let value = RewardModel::new(&config, seed ^ 1, &device());
    // Prompts and answers of different lengths: the batch pads all but the longest.
    let sequences: Vec<(Vec<u32>, Vec<u32>)> = (0..5)
        .map(|i| {
            let mut draw =
                |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(1..37)).collect() };
            (draw(2 + 3 * i % 7), draw(1 + (5 * i) % 6))
        })
        .collect();
    let refs: Vec<(&[u32], &[u32])> = sequences
        .iter()
        .map(|(p, a)| (p.as_slice(), a.as_slice()))
        .collect();
    let batch = ActionBatch::new(&refs, 0);
    assert!(
        batch.num_actions() < batch.rows * batch.seq_len,
        "no padding in the batch"
    );
    let (logp, entropy) = action_logprobs_and_entropy(&policy, &batch);
    assert_close(
        &values(action_logprobs(&policy, &batch)),
        &values(logp.clone()),
        0.0,
        "log-probs alone",
    );
    let (logp, entropy) = (values(logp), values(entropy));
    let vals = values(action_values(&value, &batch));
    let adv = randn(&mut rng, logp.len());
    let old: Vec<f64> = logp
        .iter()
        .map(|l| l + rng.random_range(-0.3..0.3))
        .collect();
    let n = logp.len();
    let batch_loss: f64 = clipped_policy_loss(
        tensor(&logp, [n]),
        tensor(&old, [n]),
        tensor(&adv, [n]),
        0.2,
    )
    .sum()
    .into_scalar();
    // Each sequence alone, no padding at all.
    let mut offset = 0;
    let mut alone_loss = 0.0;
    for seq in &refs {
        let single = ActionBatch::new(std::slice::from_ref(seq), 0);
        assert_eq!(single.rows * single.seq_len, seq.0.len() + seq.1.len());
        let k = single.num_actions();
        let (lp, ent) = action_logprobs_and_entropy(&policy, &single);
        let range = offset..offset + k;
        assert_close(
            &values(lp.clone()),
            &logp[range.clone()],
            1e-10,
            "log-probs",
        );
        assert_close(&values(ent), &entropy[range.clone()], 1e-10, "entropy");
        let v = values(action_values(&value, &single));
        assert_close(&v, &vals[range.clone()], 1e-10, "values");
        alone_loss += clipped_policy_loss(
            lp,
            tensor(&old[range.clone()], [k]),
            tensor(&adv[range.clone()], [k]),
            0.2,
        )
        .sum()
        .into_scalar::<f64>();
        offset += k;
    }
    assert!(
        (batch_loss - alone_loss).abs() < 1e-10 * batch_loss.abs().max(1.0),
        "{batch_loss} vs {alone_loss}"
    );
    // The log-probs are those of the full forward pass at each answer token.
    let (prompt, answer) = &sequences[2];
    let tokens: Vec<i64> = prompt.iter().chain(answer).map(|&t| t as i64).collect();
    let t = tokens.len();
    let logits = policy.valid().forward(
        burn::tensor::Tensor::from_data(
            burn::tensor::TensorData::new(tokens.clone(), [1, t]),
            &device().inner(),
        ),
        None,
    );
    let logits = values(logits);
    let vocab = config.vocab_size;
    let start: usize = refs[..2].iter().map(|s| s.1.len()).sum();
    for (j, &a) in answer.iter().enumerate() {
        let pos = prompt.len() - 1 + j;
        let row = &logits[pos * vocab..(pos + 1) * vocab];
        let max = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        let expected = row[a as usize] - lse;
        assert!(
            (logp[start + j] - expected).abs() < 1e-10,
            "answer token {j}: {} vs {expected}",
            logp[start + j]
        );
        let h: f64 = -row.iter().map(|l| (l - lse).exp() * (l - lse)).sum::<f64>();
        assert!(
            (entropy[start + j] - h).abs() < 1e-10,
            "entropy {j}: {} vs {h}",
            entropy[start + j]
        );
    }
}
