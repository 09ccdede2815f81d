//! Reward models: the ranking loss against hand-computed values and finite differences, the
//! scalar head reading the last response token under padding and packing, and batched scores
//! equal to scores alone (CPU device).

use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use kiln::data::chat::Rating;
use kiln::model::reward::{Arrangement, RewardModel, ScoreBatch};
use kiln::stages::reward::{MarginTable, ranking_loss};

mod common;

fn cpu() -> Device {
    Device::flex()
}

use common::rng;

fn tensor(values: &[f64]) -> Tensor<1> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, [values.len()]), &cpu())
}

/// -log(sigmoid(x)) in f64.
fn nll(x: f64) -> f64 {
    (1.0 + (-x).exp()).ln()
}

#[test]
fn ranking_loss_equals_the_hand_computed_value_for_each_margin_table() {
    let chosen = [1.5, -0.25, 0.75, 2.0];
    let rejected = [0.5, 0.25, 1.0, -1.0];
    let ratings = [
        Rating::SignificantlyBetter,
        Rating::Better,
        Rating::SlightlyBetter,
        Rating::NegligiblyBetter,
    ];
    for (table, margins) in [
        (MarginTable::None, [0.0, 0.0, 0.0, 0.0]),
        (MarginTable::Small, [1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0]),
        (MarginTable::Large, [3.0, 2.0, 1.0, 0.0]),
    ] {
        let m: Vec<f64> = ratings.iter().map(|&r| table.margin(r)).collect();
        assert_eq!(m, margins);
        let expected: f64 = (0..4)
            .map(|i| nll(chosen[i] - rejected[i] - margins[i]))
            .sum::<f64>()
            / 4.0;
        let got = ranking_loss(tensor(&chosen), tensor(&rejected), tensor(&m)).into_scalar::<f32>()
            as f64;
        assert!(
            (got - expected).abs() < 1e-6,
            "{table:?}: {got} vs {expected}"
        );
    }
}

#[test]
fn ranking_loss_gradient_matches_finite_differences() {
    let mut rng = rng();
    let n = 5;
    let chosen: Vec<f64> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
    let rejected: Vec<f64> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
    let margins: Vec<f64> = (0..n)
        .map(|_| MarginTable::Large.margin(Rating::Better) * rng.random::<f64>())
        .collect();
    let device = cpu().autodiff();
    let c = Tensor::<1>::from_data(
        TensorData::new(chosen.iter().map(|&x| x as f32).collect::<Vec<_>>(), [n]),
        &device,
    )
    .require_grad();
    let r = Tensor::<1>::from_data(
        TensorData::new(rejected.iter().map(|&x| x as f32).collect::<Vec<_>>(), [n]),
        &device,
    );
    let m = Tensor::<1>::from_data(
        TensorData::new(margins.iter().map(|&x| x as f32).collect::<Vec<_>>(), [n]),
        &device,
    );
    let grads = ranking_loss(c.clone(), r, m).backward();
    let analytic: Vec<f32> = c
        .grad(&grads)
        .unwrap()
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    // Central differences of the f64 loss.
    let loss = |c: &[f64]| {
        (0..n)
            .map(|i| nll(c[i] - rejected[i] - margins[i]))
            .sum::<f64>()
            / n as f64
    };
    let h = 1e-5;
    for i in 0..n {
        let mut up = chosen.clone();
        up[i] += h;
        let mut down = chosen.clone();
        down[i] -= h;
        let numeric = (loss(&up) - loss(&down)) / (2.0 * h);
        assert!(
            (analytic[i] as f64 - numeric).abs() < 1e-5,
            "d/dchosen[{i}]: {} vs {numeric}",
            analytic[i]
        );
    }
}

fn tiny_rm(rng: &mut ChaCha8Rng) -> RewardModel {
    RewardModel::new(&common::tiny_rm_config(), rng.random(), &cpu())
}

fn scores(model: &RewardModel, sequences: &[Vec<u32>], arrangement: Arrangement) -> Vec<f32> {
    model
        .scores(&ScoreBatch::new(sequences, arrangement, 0))
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap()
}

#[test]
fn head_reads_the_last_token_under_padding_and_packing_and_batches_change_nothing() {
    let mut rng = rng();
    let model = tiny_rm(&mut rng);
    let sequences: Vec<Vec<u32>> = (0..6)
        .map(|_| {
            let len = rng.random_range(3..20);
            (0..len).map(|_| rng.random_range(1..97)).collect()
        })
        .collect();
    let alone: Vec<f32> = sequences
        .iter()
        .map(|s| scores(&model, std::slice::from_ref(s), Arrangement::RightPadded)[0])
        .collect();
    let close = |a: &[f32], what: &str| {
        for (x, y) in a.iter().zip(&alone) {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "{what}: {a:?} vs {alone:?}"
            );
        }
    };
    close(
        &scores(&model, &sequences, Arrangement::RightPadded),
        "right padding",
    );
    close(
        &scores(&model, &sequences, Arrangement::LeftPadded),
        "left padding",
    );
    close(
        &scores(&model, &sequences, Arrangement::Packed(40)),
        "packing",
    );
    // The score depends on the last token: changing it changes the score, changing a
    // padding token does not.
    let mut changed = sequences[0].clone();
    let last = changed.len() - 1;
    changed[last] = (changed[last] % 96) + 1;
    let other = scores(&model, &[changed], Arrangement::RightPadded)[0];
    assert!((other - alone[0]).abs() > 1e-6, "the last token is read");
    let padded_with_other = ScoreBatch::new(&sequences, Arrangement::RightPadded, 5);
    let s = model
        .scores(&padded_with_other)
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    close(&s, "another pad id");
}

#[test]
fn pairs_sharing_their_prompt_score_as_the_full_sequences_do_and_train_the_prompt() {
    use kiln::model::reward::{EncodedPair, pair_scores};
    let mut rng = rng();
    let model = tiny_rm(&mut rng);
    let pairs = common::pairs_sharing_prompts(&mut rng);
    let refs: Vec<&EncodedPair> = pairs.iter().collect();
    let (c, r) = pair_scores(&model, &refs, 0);
    let c: Vec<f32> = c.into_data().try_into_vec_as::<f32>().unwrap();
    let r: Vec<f32> = r.into_data().try_into_vec_as::<f32>().unwrap();
    for (i, p) in pairs.iter().enumerate() {
        let full = scores(
            &model,
            &[p.chosen.clone(), p.rejected.clone()],
            Arrangement::RightPadded,
        );
        for (shared, alone) in [(c[i], full[0]), (r[i], full[1])] {
            assert!(
                (shared - alone).abs() <= 1e-5 * alone.abs().max(1.0),
                "pair {i}: {shared} vs {alone}"
            );
        }
    }
    // Under autodiff the gradient reaches the weights through the cached prompt too: it
    // equals the gradient of the same loss on full sequences.
    let device = cpu().autodiff();
    let config = model.backbone.config.clone();
    let seed = rng.random();
    let grad_of = |shared: bool| -> Vec<f32> {
        let m = RewardModel::new(&config, seed, &device);
        let (c, r) = if shared {
            pair_scores(&m, &refs, 0)
        } else {
            let seqs: Vec<Vec<u32>> = pairs
                .iter()
                .map(|p| p.chosen.clone())
                .chain(pairs.iter().map(|p| p.rejected.clone()))
                .collect();
            let s = m.scores(&ScoreBatch::new(&seqs, Arrangement::RightPadded, 0));
            (s.clone().slice([0..4]), s.slice([4..8]))
        };
        let zeros = Tensor::<1>::zeros([4], &device);
        let grads = ranking_loss(c, r, zeros).backward();
        let w = &m.backbone.model.layers[0].self_attn.q_proj.weight;
        w.val()
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    };
    let (a, b) = (grad_of(true), grad_of(false));
    let scale = b.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale;
    assert!(diff < 1e-4, "first-layer gradient differs by {diff}");
}

#[test]
fn k_answers_sharing_their_prompt_score_as_each_alone() {
    use kiln::model::reward::shared_prefix_scores;
    let mut rng = rng();
    let model = tiny_rm(&mut rng);
    // Groups of K answers (K odd, answers of different lengths, one answer a prefix of
    // another's, one group whose answers share a first token), several prompts of different
    // lengths.
    let k = rng.random_range(2..6);
    let groups: Vec<Vec<Vec<u32>>> = (0..3)
        .map(|g| {
            let prompt: Vec<u32> = (0..3 + 7 * g).map(|_| rng.random_range(1..97)).collect();
            let first: u32 = rng.random_range(1..97);
            (0..k)
                .map(|j| {
                    let mut s = prompt.clone();
                    if g == 2 {
                        s.push(first);
                    }
                    s.extend((0..1 + (j * 3 + g) % 5).map(|_| rng.random_range(1..97)));
                    s
                })
                .collect()
        })
        .collect();
    let refs: Vec<Vec<&[u32]>> = groups
        .iter()
        .map(|g| g.iter().map(Vec::as_slice).collect())
        .collect();
    let shared: Vec<f32> = shared_prefix_scores(&model, &refs, 0)
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    assert_eq!(shared.len(), k * groups.len());
    for (g, group) in groups.iter().enumerate() {
        for (j, sequence) in group.iter().enumerate() {
            // The reference: the sequence alone, no cache, no padding.
            let alone = scores(
                &model,
                std::slice::from_ref(sequence),
                Arrangement::RightPadded,
            )[0];
            let got = shared[j * groups.len() + g];
            assert!(
                (got - alone).abs() <= 1e-5 * alone.abs().max(1.0),
                "group {g}, answer {j} of {k}: {got} vs {alone} (tolerance 1e-5 relative)"
            );
        }
    }
}

/// `rm.warmup_fraction` sets the warm-up only when `optim.warmup_steps` is left at 0; a
/// warm-up given in steps is kept (and stored with the run).
#[test]
fn warmup_given_in_steps_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let init = common::pretrained(dir.path());
    let pairs = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = (0..16)
        .map(|i| {
            format!(
                r#"{{"prompt": "What is {i} + 1?", "chosen": "It is {}.", "rejected": "No.", "rating": "better", "safety": false}}"#,
                i + 1
            )
        })
        .collect();
    std::fs::write(&pairs, lines.join("\n")).unwrap();
    let stored_warmup = |name: &str, extra: &[&str]| -> i64 {
        let out = dir.path().join(name);
        let p = pairs.display();
        let mut sets = vec![
            format!("data.train=[\"{p}\"]"),
            format!("data.val=[\"{p}\"]"),
            "train.batch_size=4".into(),
            "train.max_steps=40".into(),
            "train.eval_interval=0".into(),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        kiln::stages::reward::train(&kiln::train::stage::Launch {
            init: Some(init.clone()),
            ..kiln::train::stage::Launch::new(&out, &sets)
        })
        .unwrap();
        let config: toml::Table = std::fs::read_to_string(out.join("config.toml"))
            .unwrap()
            .parse()
            .unwrap();
        config["optim"]["warmup_steps"].as_integer().unwrap()
    };
    // 3% of 40 steps is 1.2; at least 5.
    assert_eq!(stored_warmup("derived", &[]), 5);
    assert_eq!(stored_warmup("given", &["optim.warmup_steps=3"]), 3);
}
