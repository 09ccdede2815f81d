//! Forward and backward of each Llama block against independent references: hand-written f64
//! loops for the forward pass, central finite differences for the gradients. This test binary
//! runs burn's CPU device in f64 so that finite differences are meaningful (tolerances below).
//! Inputs are fresh random values on every run; shapes are odd on purpose.
//!
//! RMSNorm, SwiGLU, RoPE, attention and the cross-entropy run twice: the reference Burn ops and
//! the fused CPU kernels (`Kernels::Custom` on the CPU), each against the same loops and
//! differences.

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use kiln::config::ModelConfig;
use kiln::kernels::{self, Kernels, PreparedLayout, SequenceLayout};
use kiln::model::ops::{self, AttentionBias, RopeTables};
use kiln::model::{KvCache, Llama};
use rand::Rng;

/// Relative tolerance of f64 forward passes against the loop references.
const FORWARD_TOL: f64 = 1e-10;

const BOTH: [Kernels; 2] = [Kernels::Reference, Kernels::Custom];

mod common;
use common::numeric::{assert_close, check_gradients, device, randn, tensor, values};
use common::rng;

#[test]
fn rms_norm_matches_reference_and_finite_differences() {
    let mut rng = rng();
    let (rows, dim, eps) = (5, 7, 1e-5);
    let x = randn(&mut rng, rows * dim);
    let w = randn(&mut rng, dim);
    let mut expected = Vec::new();
    for r in 0..rows {
        let row = &x[r * dim..(r + 1) * dim];
        let ms = row.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        expected.extend(row.iter().zip(&w).map(|(v, g)| v * inv * g));
    }
    for k in BOTH {
        let what = format!("rms_norm ({})", k.name());
        let out = values(kernels::rms_norm(
            tensor(&x, [rows, dim]),
            tensor(&w, [dim]),
            eps,
            k,
        ));
        assert_close(&out, &expected, FORWARD_TOL, &what);
        // Input and weight gradients (weight passed as a [1, dim] tensor, reshaped inside).
        check_gradients(
            &[(x.clone(), [rows, dim]), (w.clone(), [1, dim])],
            |t| kernels::rms_norm(t[0].clone(), t[1].clone().reshape([dim]), eps, k),
            &mut rng,
            &what,
        );
    }
}

#[test]
fn swiglu_matches_reference_and_finite_differences() {
    let mut rng = rng();
    let n = 11;
    let a = randn(&mut rng, n);
    let b = randn(&mut rng, n);
    let expected: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
        .collect();
    for k in BOTH {
        let what = format!("swiglu ({})", k.name());
        let out = values(kernels::swiglu(tensor(&a, [n]), tensor(&b, [n]), k));
        assert_close(&out, &expected, FORWARD_TOL, &what);
        check_gradients(
            &[(a.clone(), [n]), (b.clone(), [n])],
            |t| kernels::swiglu(t[0].clone(), t[1].clone(), k),
            &mut rng,
            &what,
        );
    }
}

#[test]
fn rope_preserves_norms_matches_a_hand_computed_case_and_its_gradient() {
    let mut rng = rng();
    let (b, h, t, d) = (2, 3, 5, 6);
    let tables = RopeTables::new(16, d, 10_000.0, &device());
    let x = randn(&mut rng, b * h * t * d);
    let (cos, sin) = tables.window(3, t);
    // Token-major layout, [batch, seq, heads, head_dim].
    let out = values(ops::rope(
        tensor(&x, [b, t, h, d]),
        cos.clone(),
        sin.clone(),
    ));
    // Norm of every head vector is unchanged.
    for (xi, oi) in x.chunks(d).zip(out.chunks(d)) {
        let n1: f64 = xi.iter().map(|v| v * v).sum();
        let n2: f64 = oi.iter().map(|v| v * v).sum();
        assert!((n1 - n2).abs() < 1e-12 * n1.max(1.0), "{n1} vs {n2}");
    }
    // Hand-computed: head_dim 4, position 1, theta 100: pair (0,2) turns by 1 rad, pair (1,3)
    // by 100^(-1/2) = 0.1 rad.
    let tables = RopeTables::new(4, 4, 100.0, &device());
    let (cos, sin) = tables.window(1, 1);
    let out = values(ops::rope(
        tensor(&[1.0, 2.0, 3.0, 4.0], [1, 1, 1, 4]),
        cos,
        sin,
    ));
    let (c1, s1, c2, s2) = (1f64.cos(), 1f64.sin(), 0.1f64.cos(), 0.1f64.sin());
    let expected = [
        1.0 * c1 - 3.0 * s1,
        2.0 * c2 - 4.0 * s2,
        3.0 * c1 + 1.0 * s1,
        4.0 * c2 + 2.0 * s2,
    ];
    assert_close(&out, &expected, FORWARD_TOL, "rope hand case");
    let (cos, sin) = RopeTables::new(16, d, 10_000.0, &device()).window(2, t);
    check_gradients(
        &[(x, [b, t, h, d])],
        |ts| ops::rope(ts[0].clone(), cos.clone(), sin.clone()),
        &mut rng,
        "rope",
    );
}

/// Causal attention with loops: head `h` reads KV head `h / group`.
fn attention_reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    b: usize,
    h: usize,
    kvh: usize,
    t: usize,
    d: usize,
) -> Vec<f64> {
    let group = h / kvh;
    let mut out = vec![0.0; b * h * t * d];
    for bi in 0..b {
        for hi in 0..h {
            let ki = hi / group;
            for i in 0..t {
                let qrow = &q[((bi * h + hi) * t + i) * d..][..d];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let krow = &k[((bi * kvh + ki) * t + j) * d..][..d];
                        qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for (j, e) in exps.iter().enumerate() {
                    let vrow = &v[((bi * kvh + ki) * t + j) * d..][..d];
                    for c in 0..d {
                        out[((bi * h + hi) * t + i) * d + c] += e / total * vrow[c];
                    }
                }
            }
        }
    }
    out
}

#[test]
fn gqa_attention_matches_reference_equals_mha_with_expanded_heads_and_its_gradient() {
    let mut rng = rng();
    let (b, h, kvh, t, d) = (2, 6, 2, 7, 4);
    let q = randn(&mut rng, b * h * t * d);
    let k = randn(&mut rng, b * kvh * t * d);
    let v = randn(&mut rng, b * kvh * t * d);
    let bias = AttentionBias::causal(h / kvh, t, &device());
    let out = values(ops::attention(
        tensor(&q, [b, h, t, d]),
        tensor(&k, [b, kvh, t, d]),
        tensor(&v, [b, kvh, t, d]),
        &bias,
    ));
    assert_close(
        &out,
        &attention_reference(&q, &k, &v, b, h, kvh, t, d),
        FORWARD_TOL,
        "gqa",
    );

    // MHA with each KV head repeated for its group gives the same result.
    let expand = |x: &[f64]| -> Vec<f64> {
        let mut e = Vec::new();
        for bi in 0..b {
            for hi in 0..h {
                let ki = hi / (h / kvh);
                e.extend_from_slice(&x[(bi * kvh + ki) * t * d..][..t * d]);
            }
        }
        e
    };
    let mha_bias = AttentionBias::causal(1, t, &device());
    let mha = values(ops::attention(
        tensor(&q, [b, h, t, d]),
        tensor(&expand(&k), [b, h, t, d]),
        tensor(&expand(&v), [b, h, t, d]),
        &mha_bias,
    ));
    assert_close(&out, &mha, FORWARD_TOL, "gqa vs mha");

    check_gradients(
        &[(q, [b, h, t, d]), (k, [b, kvh, t, d]), (v, [b, kvh, t, d])],
        |ts| ops::attention(ts[0].clone(), ts[1].clone(), ts[2].clone(), &bias),
        &mut rng,
        "attention",
    );
}

#[test]
fn cross_entropy_matches_reference_and_finite_differences() {
    let mut rng = rng();
    let (n, vocab) = (6, 9);
    let logits = randn(&mut rng, n * vocab)
        .iter()
        .map(|v| v * 4.0)
        .collect::<Vec<_>>();
    let targets: Vec<i64> = (0..n).map(|_| rng.random_range(0..vocab as i64)).collect();
    let weights: Vec<f64> = (0..n).map(|i| (i % 3 != 0) as u8 as f64).collect();
    let targets_t =
        || Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [n]), &device());
    let reference = |mask: &[f64]| -> f64 {
        let mut total = 0.0;
        for i in 0..n {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            total += mask[i] * (lse - row[targets[i] as usize]);
        }
        total / mask.iter().sum::<f64>()
    };
    for k in BOTH {
        let what = format!("cross_entropy ({})", k.name());
        let all: f64 =
            kernels::cross_entropy(tensor(&logits, [n, vocab]), targets_t(), None, k).into_scalar();
        assert!((all - reference(&vec![1.0; n])).abs() < 1e-12, "{what}");
        let masked: f64 = kernels::cross_entropy(
            tensor(&logits, [n, vocab]),
            targets_t(),
            Some(tensor(&weights, [n])),
            k,
        )
        .into_scalar();
        assert!((masked - reference(&weights)).abs() < 1e-12, "{what}");
        check_gradients(
            &[(logits.clone(), [n, vocab])],
            |ts| kernels::cross_entropy(ts[0].clone(), targets_t(), Some(tensor(&weights, [n])), k),
            &mut rng,
            &what,
        );
    }
}

/// The CPU's flash attention and RoPE (token-major, through [`PreparedLayout`]) in f64: the
/// forward pass against the loops, gradients against central differences, with GQA and a
/// sequence longer than one 64-key tile, so tiles are skipped and merged.
#[test]
fn cpu_flash_attention_and_rope_match_loops_and_finite_differences() {
    let mut rng = rng();
    let (b, h, kvh, d) = (2, 4, 2, 3);
    for t in [7, 70] {
        let q = randn(&mut rng, b * h * t * d);
        let k = randn(&mut rng, b * kvh * t * d);
        let v = randn(&mut rng, b * kvh * t * d);
        let rope = RopeTables::new(t + 3, d + 1, 10_000.0, &device());
        let layout = PreparedLayout::new(
            &SequenceLayout::causal(b, t),
            Kernels::Custom,
            &rope,
            h / kvh,
            &device(),
        );
        // Inputs head-major like the loops; the kernels take token-major.
        let attend = |ts: Vec<Tensor<4>>| {
            let tm = |x: &Tensor<4>| x.clone().swap_dims(1, 2);
            layout
                .attention(tm(&ts[0]), tm(&ts[1]), tm(&ts[2]))
                .swap_dims(1, 2)
        };
        let inputs = [(q, [b, h, t, d]), (k, [b, kvh, t, d]), (v, [b, kvh, t, d])];
        let out = values(attend(inputs.iter().map(|(x, s)| tensor(x, *s)).collect()));
        let expected =
            attention_reference(&inputs[0].0, &inputs[1].0, &inputs[2].0, b, h, kvh, t, d);
        // The kernel interface carries the softmax scale as f32 (1/sqrt(3) rounded: relative
        // error 3e-8), so the f64 result is that close to the loops, not 1e-10.
        assert_close(&out, &expected, 1e-7, &format!("cpu attention t{t}"));
        if t < 10 {
            // Each gradient coordinate costs two forward passes: the short sequence only.
            check_gradients(&inputs, attend, &mut rng, "cpu attention");
        }
    }

    // RoPE at positions 3.. against the reference op, and its gradient (the inverse rotation).
    let (t, d) = (5, 6);
    let tables = RopeTables::new(16, d, 10_000.0, &device());
    let x = randn(&mut rng, b * t * h * d);
    let (cos, sin) = tables.window(3, t);
    let expected = values(ops::rope(tensor(&x, [b, t, h, d]), cos, sin));
    let layout = PreparedLayout::new(
        &SequenceLayout::cached(&vec![0; b], 3, t),
        Kernels::Custom,
        &tables,
        1,
        &device(),
    );
    let out = values(layout.rope(tensor(&x, [b, t, h, d])));
    assert_close(&out, &expected, FORWARD_TOL, "cpu rope");
    check_gradients(
        &[(x, [b, t, h, d])],
        |ts| layout.rope(ts[0].clone()),
        &mut rng,
        "cpu rope",
    );
}

/// The linear layer against an f64 loop: without autodiff at few rows (the CPU's few-row
/// kernel) and more (its direct gemm call), and its gradients (the CPU's `linear_backward`)
/// by finite differences.
#[test]
fn linear_matches_a_loop_and_finite_differences() {
    let mut rng = rng();
    let device = device().without_autodiff();
    for (rows, k, n) in [(1, 13, 9), (5, 16, 4), (3, 40, 7), (37, 11, 6), (70, 5, 3)] {
        let x = randn(&mut rng, rows * k);
        let w = randn(&mut rng, n * k);
        let t = |v: &[f64], shape: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), &device)
        };
        let what = format!("linear {rows}x{k}x{n}");
        let out = values(kernels::linear(t(&x, [rows, k]), t(&w, [n, k])));
        let expected: Vec<f64> = (0..rows * n)
            .map(|i| (0..k).map(|c| x[i / n * k + c] * w[i % n * k + c]).sum())
            .collect();
        assert_close(&out, &expected, FORWARD_TOL, &what);
        check_gradients(
            &[(x.clone(), [rows, k]), (w.clone(), [n, k])],
            |t| kernels::linear(t[0].clone(), t[1].clone()),
            &mut rng,
            &what,
        );
    }
}

fn small_config() -> ModelConfig {
    ModelConfig {
        dim: 12,
        n_layers: 2,
        n_heads: 3,
        n_kv_heads: 1,
        ffn_dim: 20,
        vocab_size: 17,
        max_seq_len: 16,
        init_std: 0.3,
        ..ModelConfig::default()
    }
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    let mut rng = rng();
    let config = small_config();
    let model = Llama::new(&config, rng.random(), &device());
    let (b, t) = (2, 5);
    let tokens: Vec<i64> = (0..b * t).map(|_| rng.random_range(0..17)).collect();
    let targets: Vec<i64> = (0..b * t).map(|_| rng.random_range(0..17)).collect();
    let ids =
        |v: &Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v.clone(), [b, t]), &device());
    let loss = model.loss(ids(&tokens), ids(&targets));
    let grads = loss.backward();
    // Perturb a few entries of each parameter and compare with the autodiff gradient.
    let names = kiln::interop::params::list(&model);
    let exported = kiln::interop::params::export(&model);
    for (info, original) in names.iter().zip(&exported) {
        let analytic: Vec<f64> = {
            struct Find<'a> {
                id: burn::module::ParamId,
                grads: &'a burn::tensor::Gradients,
                out: Option<Vec<f64>>,
            }
            impl burn::module::ModuleVisitor for Find<'_> {
                fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
                    if p.id == self.id {
                        self.out = p.val().grad(self.grads).map(values);
                    }
                }
            }
            let mut f = Find {
                id: info.id,
                grads: &grads,
                out: None,
            };
            model.visit(&mut f);
            f.out.expect("gradient of every parameter")
        };
        for _ in 0..3 {
            let i = rng.random_range(0..original.values.len());
            let h = 1e-5f32;
            let eval = |delta: f32| -> f64 {
                let mut tensors = exported.clone();
                let k = tensors.iter().position(|t| t.name == info.name).unwrap();
                tensors[k].values[i] += delta;
                let m = kiln::interop::params::import(
                    model.clone(),
                    tensors,
                    std::path::Path::new("test"),
                )
                .unwrap();
                m.loss(ids(&tokens), ids(&targets)).into_scalar()
            };
            // Parameters travel as f32 through export/import: use the perturbation actually
            // applied (f32 rounding) for the difference quotient.
            let applied = (original.values[i] + h) as f64 - original.values[i] as f64;
            let numeric = (eval(h) - eval(-h)) / (2.0 * applied);
            let scale = numeric.abs().max(1e-3);
            assert!(
                (analytic[i] - numeric).abs() < 1e-4 * scale.max(1.0),
                "{}[{i}]: autodiff {} vs finite difference {numeric}",
                info.name,
                analytic[i]
            );
        }
    }
}

#[test]
fn kv_cache_gives_the_same_logits_as_a_full_forward_pass() {
    let mut rng = rng();
    let config = small_config();
    let model = Llama::new(&config, rng.random(), &device()).valid();
    let t = 9;
    let tokens: Vec<i64> = (0..2 * t).map(|_| rng.random_range(0..17)).collect();
    let full = values(model.forward(
        Tensor::from_data(TensorData::new(tokens.clone(), [2, t]), &device().inner()),
        None,
    ));
    let mut cache = KvCache::new(config.n_layers, vec![0, 0]);
    let mut stepwise = [Vec::new(), Vec::new()];
    // A prompt of 4 tokens, then one token at a time.
    let mut start = 0;
    for len in [4, 1, 1, 1, 1, 1] {
        let chunk: Vec<i64> = (0..2)
            .flat_map(|r| tokens[r * t + start..r * t + start + len].to_vec())
            .collect();
        let logits = values(model.forward(
            Tensor::from_data(TensorData::new(chunk, [2, len]), &device().inner()),
            Some(&mut cache),
        ));
        for r in 0..2 {
            stepwise[r].extend_from_slice(&logits[r * len * 17..(r + 1) * len * 17]);
        }
        start += len;
    }
    for r in 0..2 {
        assert_close(
            &stepwise[r],
            &full[r * t * 17..(r * t + start) * 17],
            FORWARD_TOL,
            "kv cache",
        );
    }

    // Left padding with masked keys gives the unpadded row's logits.
    let row: Vec<i64> = tokens[..5].to_vec();
    let alone = values(model.forward(
        Tensor::from_data(TensorData::new(row.clone(), [1, 5]), &device().inner()),
        None,
    ));
    let mut padded = vec![0i64, 0, 0];
    padded.extend(&row);
    let mut cache = KvCache::new(config.n_layers, vec![3]);
    let with_pad = values(model.forward(
        Tensor::from_data(TensorData::new(padded, [1, 8]), &device().inner()),
        Some(&mut cache),
    ));
    assert_close(&with_pad[3 * 17..], &alone, 1e-9, "left padding");

    // A cache cut back to a shared prefix continues as if the rest had never been fed (a
    // chat's next turn): prefix + B, truncated to the prefix, then C = prefix + C fresh.
    let (prefix, b, c) = (&tokens[..4], &tokens[4..9], &tokens[9..15]);
    let feed = |cache: &mut KvCache, part: &[i64]| {
        values(model.forward(
            Tensor::from_data(
                TensorData::new(part.to_vec(), [1, part.len()]),
                &device().inner(),
            ),
            Some(cache),
        ))
    };
    let mut cache = KvCache::new(config.n_layers, vec![0]);
    feed(&mut cache, prefix);
    feed(&mut cache, b);
    cache.truncate(prefix.len());
    assert_eq!(cache.len(), prefix.len());
    let continued = feed(&mut cache, c);
    let fresh = values(model.forward(
        Tensor::from_data(
            TensorData::new([prefix, c].concat(), [1, 10]),
            &device().inner(),
        ),
        None,
    ));
    assert_close(&continued, &fresh[4 * 17..], FORWARD_TOL, "truncated cache");
    let stale = feed(
        &mut KvCache::new(config.n_layers, vec![0]),
        &[prefix, b, c].concat(),
    );
    assert!(
        stale[9 * 17..]
            .iter()
            .zip(&continued)
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "keeping B in the cache would change the logits, so the check can fail"
    );
}

#[test]
fn batched_generation_of_unequal_prompts_equals_one_at_a_time() {
    let mut rng = rng();
    let config = small_config();
    let model = Llama::new(&config, rng.random(), &device()).valid();
    let prompts: Vec<Vec<u32>> = [3usize, 7, 1]
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(1..17)).collect())
        .collect();
    let greedy = kiln::infer::generate::SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        min_p: 0.0,
        max_tokens: 6,
    };
    // Stop id 0 is never produced by chance often enough to matter; pad id 0 is masked.
    let batched = kiln::infer::generate::generate(
        &model,
        &prompts,
        &greedy,
        0,
        0,
        &mut kiln::infer::generate::seeded_rng(0),
    )
    .unwrap();
    for (prompt, expected) in prompts.iter().zip(&batched) {
        let alone = kiln::infer::generate::generate(
            &model,
            std::slice::from_ref(prompt),
            &greedy,
            0,
            0,
            &mut kiln::infer::generate::seeded_rng(0),
        )
        .unwrap();
        assert_eq!(&alone[0], expected, "prompt {prompt:?}");
    }
    assert!(batched.iter().any(|o| !o.is_empty()));
}

/// log-softmax of `logits` in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// The distribution temperature and top-p sample from, as log-probabilities (f64; tokens
/// outside the nucleus at -inf): a plain re-statement of the rule, sorted by probability.
fn nucleus_log_probs(logits: &[f32], temperature: f64, top_p: f64) -> Vec<f64> {
    let scaled: Vec<f32> = logits
        .iter()
        .map(|&l| (l as f64 / temperature) as f32)
        .collect();
    let probs: Vec<f64> = log_softmax(&scaled).iter().map(|l| l.exp()).collect();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let (mut kept, mut mass) = (Vec::new(), 0.0);
    for &i in &order {
        kept.push(i);
        mass += probs[i];
        if mass >= top_p {
            break;
        }
    }
    let mut out = vec![f64::NEG_INFINITY; probs.len()];
    for &i in &kept {
        out[i] = (probs[i] / mass).ln();
    }
    out
}

#[test]
fn generation_reports_log_probs_and_how_each_sequence_ended() {
    use kiln::infer::generate::{FinishReason, SamplingParams, generate_with, seeded_rng};
    let mut rng = rng();
    let config = small_config();
    let model = Llama::new(&config, rng.random(), &device()).valid();
    let go = |prompts: &[Vec<u32>], params: &SamplingParams, stop: u32| {
        generate_with(
            &model,
            prompts,
            params,
            stop,
            0,
            &mut seeded_rng(3),
            &mut |_, _| std::ops::ControlFlow::Continue(()),
        )
    };
    let prompts: Vec<Vec<u32>> = [4usize, 9]
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(1..17)).collect())
        .collect();
    let params = SamplingParams {
        temperature: 0.7,
        top_p: 0.9,
        min_p: 0.0,
        max_tokens: 6,
    };
    // Stop id 0: a row that draws it ends with `eos`, the others after 6 tokens (`length`).
    let out = go(&prompts, &params, 0).unwrap();
    for (prompt, g) in prompts.iter().zip(&out) {
        let eos = g.finish == FinishReason::Eos;
        assert!(eos || g.finish == FinishReason::Length, "{:?}", g.finish);
        assert_eq!(g.logprobs.len(), g.tokens.len() + eos as usize);
        assert_eq!(g.sample_logprobs.len(), g.logprobs.len());
        // One forward pass over prompt + answer gives every drawn token's logits.
        let mut drawn = g.tokens.clone();
        if eos {
            drawn.push(0);
        }
        let full: Vec<i64> = prompt.iter().chain(&drawn).map(|&t| t as i64).collect();
        let n = full.len();
        let logits = model.forward(
            Tensor::<2, Int>::from_data(TensorData::new(full, [1, n]), &device()),
            None,
        );
        let vocab = logits.dims()[2];
        let logits: Vec<f32> = logits.into_data().try_into_vec_as::<f32>().unwrap();
        for (k, &token) in drawn.iter().enumerate() {
            let row = &logits[(prompt.len() - 1 + k) * vocab..(prompt.len() + k) * vocab];
            let raw = log_softmax(row)[token as usize];
            let sampled = nucleus_log_probs(row, 0.7, 0.9)[token as usize];
            // f32 logits through the KV cache against one full pass: absolute 1e-4.
            assert!(
                (g.logprobs[k] as f64 - raw).abs() < 1e-4,
                "token {k}: {} vs {raw}",
                g.logprobs[k]
            );
            assert!(
                (g.sample_logprobs[k] as f64 - sampled).abs() < 1e-4,
                "token {k}: {} vs {sampled}",
                g.sample_logprobs[k]
            );
        }
    }

    // Greedy, stopping at the token the model picks first: `eos` with no tokens and the stop
    // token's log-probability.
    let greedy = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        min_p: 0.0,
        max_tokens: 6,
    };
    let first = go(&prompts[..1], &greedy, 0).unwrap()[0].clone();
    let picked = if first.tokens.is_empty() {
        0
    } else {
        first.tokens[0]
    };
    let stopped = go(&prompts[..1], &greedy, picked).unwrap().remove(0);
    assert_eq!(stopped.finish, FinishReason::Eos);
    assert!(stopped.tokens.is_empty());
    assert_eq!(stopped.logprobs.len(), 1);
    assert_eq!(stopped.sample_logprobs, vec![0.0]);

    // Two places left in the context: `context`, two tokens.
    let context = config.max_seq_len;
    let long: Vec<u32> = (0..context - 2).map(|i| 1 + (i % 16) as u32).collect();
    let never = config.vocab_size as u32 + 1;
    let cut = go(std::slice::from_ref(&long), &greedy, never)
        .unwrap()
        .remove(0);
    assert_eq!((cut.finish, cut.tokens.len()), (FinishReason::Context, 2));
    // No place left: an error naming the prompt's length and the context.
    let full: Vec<u32> = (0..context).map(|i| 1 + (i % 16) as u32).collect();
    let e = go(&[full], &greedy, never).err().unwrap().to_string();
    assert!(
        e.contains(&format!("{context} tokens")) && e.contains("no room"),
        "{e}"
    );
}
