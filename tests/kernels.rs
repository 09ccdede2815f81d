//! The custom kernels against the reference Burn ops.
//!
//! Every shader is parsed and validated by naga. Each kernel then runs on the CPU (kiln's host
//! kernels) and on wgpu (the WGSL shaders; in CI: lavapipe, software Vulkan) with fresh random
//! inputs, its outputs poisoned with NaN before every launch, and is compared with the
//! reference ops on the CPU device, forward and every gradient. Tolerance: max |custom -
//! reference| / max |reference| <= 1e-4 (f32 arithmetic in a different order).
//!
//! The wgpu half needs a Vulkan driver; without one it says so and is skipped, except under CI.

use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln::kernels::{self, Kernels, PreparedLayout, SequenceLayout};
use kiln::model::ops::RopeTables;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

mod common;
use common::rng;

const TOL: f32 = 1e-4;

/// Where the custom kernels run: the CPU always, wgpu where there is an adapter.
fn custom_devices() -> Vec<(&'static str, Device)> {
    kernels::poison_outputs(true);
    let mut devices = vec![("cpu", cpu())];
    devices.extend(common::wgpu_device().map(|d| ("wgpu", d.device)));
    devices
}

fn cpu() -> Device {
    Device::flex()
}

fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn tensor<const D: usize>(v: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), device)
}

fn ints<const D: usize>(v: &[i32], shape: [usize; D], device: &Device) -> Tensor<D, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

fn max_rel_err(actual: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(actual.len(), expected.len());
    let scale = expected.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    actual.iter().zip(expected).fold(0.0f32, |m, (a, e)| {
        // NaN (an unwritten, poisoned element) must fail, not vanish in `max`.
        if a.is_nan() {
            f32::INFINITY
        } else {
            m.max((a - e).abs())
        }
    }) / scale
}

/// Runs `run` with the reference ops on the CPU and with the custom kernels on each device,
/// and compares their named outputs.
fn compare_on_devices(
    devices: &[(&str, Device)],
    what: &str,
    run: impl Fn(&Device, Kernels) -> Vec<(&'static str, Vec<f32>)>,
) {
    let reference = run(&cpu(), Kernels::Reference);
    for (name, device) in devices {
        compare(
            &format!("{name} {what}"),
            &run(device, Kernels::Custom),
            &reference,
        );
    }
}

/// Compares named outputs (forward, then gradients) of the custom and reference runs.
fn compare(what: &str, custom: &[(&str, Vec<f32>)], reference: &[(&str, Vec<f32>)]) {
    for ((name, c), (_, r)) in custom.iter().zip(reference) {
        let err = max_rel_err(c, r);
        eprintln!("{what} {name}: max relative error {err:.2e}");
        assert!(
            err <= TOL,
            "{what} {name}: relative error {err:e} > {TOL:e}"
        );
    }
}

#[test]
fn every_shader_parses_and_validates_with_naga() {
    let variants = kernels::ATTENTION_HEAD_DIMS
        .iter()
        .flat_map(|&d| kernels::THREADS_PER_ROW.iter().map(move |&t| (d, t)));
    for (name, _) in kernels::SHADERS {
        for (head_dim, threads_per_row) in variants.clone() {
            let source = kernels::shader_source(name, head_dim, threads_per_row);
            let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| {
                panic!(
                    "{name} (head_dim {head_dim}, {threads_per_row} threads per row): {}",
                    e.emit_to_string(&source)
                )
            });
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::empty(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name} (head_dim {head_dim}): {e:?}"));
            // WebGPU guarantees 16 KiB of workgroup memory; stay within it.
            let workgroup_bytes: u32 = module
                .global_variables
                .iter()
                .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
                .map(|(_, g)| module.types[g.ty].inner.size(module.to_ctx()))
                .sum();
            assert!(
                workgroup_bytes <= 16384,
                "{name} (head_dim {head_dim}) uses {workgroup_bytes} bytes of workgroup memory"
            );
        }
    }
}

struct AttentionCase {
    batch: usize,
    len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Sample lengths packed into each row; empty = one causal sequence.
    packed: &'static [usize],
}

impl AttentionCase {
    fn layout(&self) -> SequenceLayout {
        if self.packed.is_empty() {
            return SequenceLayout::causal(self.batch, self.len);
        }
        let mut segments = Vec::new();
        for b in 0..self.batch {
            let mut row = Vec::new();
            // Rotate the sample lengths per row so rows differ.
            for (s, &n) in self.packed.iter().cycle().skip(b).enumerate() {
                if row.len() >= self.len {
                    break;
                }
                row.extend(std::iter::repeat_n(s as i32, n));
            }
            row.truncate(self.len);
            segments.extend(row);
        }
        SequenceLayout::packed(self.batch, self.len, segments)
    }
}

/// Attention output and the gradients of `sum(out * probe)` with respect to q, k, v.
fn attention_run(
    device: &Device,
    kernels: Kernels,
    case: &AttentionCase,
    data: &[Vec<f32>; 4],
) -> Vec<(&'static str, Vec<f32>)> {
    let device = device.clone().autodiff();
    let (b, t, h, kv, d) = (
        case.batch,
        case.len,
        case.heads,
        case.kv_heads,
        case.head_dim,
    );
    let q = tensor(&data[0], [b, t, h, d], &device).require_grad();
    let k = tensor(&data[1], [b, t, kv, d], &device).require_grad();
    let v = tensor(&data[2], [b, t, kv, d], &device).require_grad();
    let rope = RopeTables::new(t, d, 10_000.0, &device);
    let layout = PreparedLayout::new(&case.layout(), kernels, &rope, h / kv, &device);
    let out = layout.attention(q.clone(), k.clone(), v.clone());
    let grads = (out.clone() * tensor(&data[3], [b, t, h, d], &device))
        .sum()
        .backward();
    vec![
        ("out", values(out)),
        ("dq", values(q.grad(&grads).unwrap())),
        ("dk", values(k.grad(&grads).unwrap())),
        ("dv", values(v.grad(&grads).unwrap())),
    ]
}

#[test]
fn flash_attention_matches_reference_forward_and_backward() {
    let devices = custom_devices();
    let mut rng = rng();
    let cases = [
        // MHA (ratio 1), head dim 32, sequence not a multiple of any tile.
        AttentionCase {
            batch: 2,
            len: 67,
            heads: 2,
            kv_heads: 2,
            head_dim: 32,
            packed: &[],
        },
        // GQA 2, head dim 64, packed samples.
        AttentionCase {
            batch: 3,
            len: 50,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            packed: &[7, 20, 1, 30],
        },
        // GQA 4, head dim 64, ten key tiles per block (dK/dV walk 4 heads x 10 tiles).
        AttentionCase {
            batch: 1,
            len: 300,
            heads: 4,
            kv_heads: 1,
            head_dim: 64,
            packed: &[],
        },
        // GQA 8, head dim 32, packed.
        AttentionCase {
            batch: 2,
            len: 40,
            heads: 8,
            kv_heads: 1,
            head_dim: 32,
            packed: &[16, 3, 40],
        },
        // Head dim 128 over 16 key tiles, packed.
        AttentionCase {
            batch: 1,
            len: 250,
            heads: 2,
            kv_heads: 1,
            head_dim: 128,
            packed: &[100, 150],
        },
        // At most 8 queries: the forward pass runs flash_attention_decode; packed, GQA 2.
        AttentionCase {
            batch: 3,
            len: 7,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            packed: &[2, 4, 1],
        },
        // 17 key tiles of head dim 64 (the shape that exposed the lavapipe bug, see shaders).
        AttentionCase {
            batch: 1,
            len: 513,
            heads: 1,
            kv_heads: 1,
            head_dim: 64,
            packed: &[],
        },
    ];
    for case in &cases {
        let (b, t, h, kv, d) = (
            case.batch,
            case.len,
            case.heads,
            case.kv_heads,
            case.head_dim,
        );
        let data = [
            randn(&mut rng, b * t * h * d, 2.0),
            randn(&mut rng, b * t * kv * d, 2.0),
            randn(&mut rng, b * t * kv * d, 1.0),
            randn(&mut rng, b * t * h * d, 1.0),
        ];
        let what = format!(
            "attention b{b} t{t} h{h} kv{kv} d{d} packed {:?}",
            case.packed
        );
        compare_on_devices(&devices, &what, |device, kernels| {
            attention_run(device, kernels, case, &data)
        });
    }
}

/// New queries over a left-padded KV cache, forward and backward: generation (a few queries)
/// and a prompt shared through a cache (reward-model pairs: many queries, gradients flowing
/// into the cached keys and values too).
#[test]
fn flash_attention_over_a_kv_cache_matches_reference() {
    let devices = custom_devices();
    let mut rng = rng();
    // (batch, cached, new, heads, kv heads, head dim, left padding per row)
    // Up to 8 new queries run flash_attention_decode (a workgroup per query), more run
    // flash_attention_forward.
    let cases: [(usize, usize, usize, usize, usize, usize, &[usize]); 5] = [
        (3, 37, 2, 4, 2, 32, &[0, 5, 36]),
        (2, 45, 70, 4, 1, 64, &[0, 44]),
        (1, 130, 9, 2, 2, 32, &[3]),
        // Decoding: GQA 8, head dim 128, several keys per invocation.
        (2, 300, 8, 8, 1, 128, &[0, 250]),
        // Head dim 40: ten vec4s, not a whole number of merge chunks.
        (2, 20, 1, 2, 2, 40, &[7, 0]),
    ];
    for (b, start, tq, h, kv, d, left_pad) in cases {
        let tk = start + tq;
        // Keys and values are views of longer buffers, as a KV cache holds them (batch rows
        // `room` positions apart): the kernels must read them in place or copy them right.
        let room = tk + 3;
        let q = randn(&mut rng, b * tq * h * d, 2.0);
        let k = randn(&mut rng, b * room * kv * d, 2.0);
        let v = randn(&mut rng, b * room * kv * d, 1.0);
        let probe = randn(&mut rng, b * tq * h * d, 1.0);
        let run = |device: &Device, kernels: Kernels| {
            let device = device.clone().autodiff();
            let rope = RopeTables::new(tk, d, 10_000.0, &device);
            let layout = SequenceLayout::cached(left_pad, start, tq);
            let prepared = PreparedLayout::new(&layout, kernels, &rope, h / kv, &device);
            let qt = tensor(&q, [b, tq, h, d], &device).require_grad();
            let kt = tensor(&k, [b, room, kv, d], &device).require_grad();
            let vt = tensor(&v, [b, room, kv, d], &device).require_grad();
            let filled = [0..b, 0..tk, 0..kv, 0..d];
            let out = prepared.attention(
                qt.clone(),
                kt.clone().slice(filled.clone()),
                vt.clone().slice(filled),
            );
            let grads = (out.clone() * tensor(&probe, [b, tq, h, d], &device))
                .sum()
                .backward();
            vec![
                ("out", values(out)),
                ("dq", values(qt.grad(&grads).unwrap())),
                ("dk", values(kt.grad(&grads).unwrap())),
                ("dv", values(vt.grad(&grads).unwrap())),
            ]
        };
        compare_on_devices(
            &devices,
            &format!("cached attention b{b} cached {start} new {tq} h{h}/{kv} d{d}"),
            run,
        );
    }
}

/// Runs `check` on each custom device; on wgpu once per layout of the row kernels (a
/// workgroup per row, as on GPUs; one invocation per row, as on CPU adapters), whatever the
/// adapter. Serialised, because the layout is a process-wide setting.
fn for_each_device_and_row_layout(
    devices: &[(&str, Device)],
    mut check: impl FnMut(String, &Device),
) {
    static LAYOUT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LAYOUT.lock().unwrap_or_else(|e| e.into_inner());
    for (name, device) in devices {
        if *name != "wgpu" {
            check(name.to_string(), device);
            continue;
        }
        for &threads in kernels::THREADS_PER_ROW {
            kernels::force_threads_per_row(Some(threads));
            check(format!("{name}, {threads} threads per row"), device);
        }
        kernels::force_threads_per_row(None);
    }
}

/// The linear layer (`x · weightᵀ`) against burn's matmul on the CPU, without autodiff (where
/// the few-row kernel runs: up to 32 rows; 33 and 64 take the matmul). Odd widths exercise the
/// tails of the 8-lane loop and of the blocks of four outputs.
#[test]
fn linear_matches_matmul() {
    kernels::poison_outputs(true);
    let mut rng = rng();
    let device = cpu();
    for (rows, k, n) in [
        (1, 576, 192),
        (2, 37, 13),
        (7, 100, 130),
        (32, 1536, 576),
        (33, 64, 9),
        (64, 19, 4),
    ] {
        let x = randn(&mut rng, rows * k, 2.0);
        let w = randn(&mut rng, n * k, 1.0);
        let got = values(kernels::linear(
            tensor(&x, [rows, k], &device),
            tensor(&w, [n, k], &device),
        ));
        let want =
            values(tensor(&x, [rows, k], &device).matmul(tensor(&w, [n, k], &device).transpose()));
        compare(
            &format!("linear {rows}x{k} · ({n}x{k})ᵀ"),
            &[("y", got)],
            &[("y", want)],
        );
    }
}

#[test]
fn rms_norm_matches_reference_forward_and_backward() {
    let devices = custom_devices();
    let mut rng = rng();
    // 30 is not a multiple of 4: the custom path falls back to the reference.
    for (rows, dim) in [(37, 100), (300, 64), (5, 1000), (3, 30)] {
        let x = randn(&mut rng, rows * dim, 3.0);
        let w = randn(&mut rng, dim, 1.5);
        let probe = randn(&mut rng, rows * dim, 1.0);
        let run = |device: &Device, kernels: Kernels| {
            let device = device.clone().autodiff();
            let xt = tensor(&x, [rows, dim], &device).require_grad();
            let wt = tensor(&w, [dim], &device).require_grad();
            let y = kernels::rms_norm(xt.clone(), wt.clone(), 1e-5, kernels);
            let grads = (y.clone() * tensor(&probe, [rows, dim], &device))
                .sum()
                .backward();
            vec![
                ("y", values(y)),
                ("dx", values(xt.grad(&grads).unwrap())),
                ("dw", values(wt.grad(&grads).unwrap())),
            ]
        };
        let reference = run(&cpu(), Kernels::Reference);
        for_each_device_and_row_layout(&devices, |what, device| {
            compare(
                &format!("rms_norm {rows}x{dim} ({what})"),
                &run(device, Kernels::Custom),
                &reference,
            )
        });
    }
}

#[test]
fn rope_matches_reference_forward_and_backward_with_packed_positions() {
    let devices = custom_devices();
    let mut rng = rng();
    for (case, d) in [
        (
            AttentionCase {
                batch: 2,
                len: 19,
                heads: 3,
                kv_heads: 3,
                head_dim: 0,
                packed: &[],
            },
            32,
        ),
        (
            AttentionCase {
                batch: 3,
                len: 41,
                heads: 2,
                kv_heads: 2,
                head_dim: 0,
                packed: &[5, 17, 2],
            },
            64,
        ),
    ] {
        let (b, t, h) = (case.batch, case.len, case.heads);
        let x = randn(&mut rng, b * t * h * d, 2.0);
        let probe = randn(&mut rng, b * t * h * d, 1.0);
        let layout = case.layout();
        let run = |device: &Device, kernels: Kernels| {
            let device = device.clone().autodiff();
            let rope = RopeTables::new(64, d, 10_000.0, &device);
            let prepared = PreparedLayout::new(&layout, kernels, &rope, 1, &device);
            let xt = tensor(&x, [b, t, h, d], &device).require_grad();
            let y = prepared.rope(xt.clone());
            let grads = (y.clone() * tensor(&probe, [b, t, h, d], &device))
                .sum()
                .backward();
            vec![("y", values(y)), ("dx", values(xt.grad(&grads).unwrap()))]
        };
        compare_on_devices(
            &devices,
            &format!("rope b{b} t{t} h{h} d{d} packed {:?}", case.packed),
            run,
        );
    }
}

#[test]
fn swiglu_matches_reference_forward_and_backward() {
    let devices = custom_devices();
    let mut rng = rng();
    // 177 is not a multiple of 4: the custom path falls back to the reference.
    for (rows, dim) in [(33, 176), (5, 177)] {
        let gate = randn(&mut rng, rows * dim, 6.0);
        let up = randn(&mut rng, rows * dim, 2.0);
        let probe = randn(&mut rng, rows * dim, 1.0);
        let run = |device: &Device, kernels: Kernels| {
            let device = device.clone().autodiff();
            let g = tensor(&gate, [rows, dim], &device).require_grad();
            let u = tensor(&up, [rows, dim], &device).require_grad();
            let y = kernels::swiglu(g.clone(), u.clone(), kernels);
            let grads = (y.clone() * tensor(&probe, [rows, dim], &device))
                .sum()
                .backward();
            vec![
                ("y", values(y)),
                ("d_gate", values(g.grad(&grads).unwrap())),
                ("d_up", values(u.grad(&grads).unwrap())),
            ]
        };
        compare_on_devices(&devices, &format!("swiglu {rows}x{dim}"), run);
    }
}

#[test]
fn cross_entropy_matches_reference_forward_and_backward_with_ignored_rows() {
    let devices = custom_devices();
    let mut rng = rng();
    // 997 is not a multiple of 4: the custom path falls back to the reference.
    for (rows, vocab, masked) in [
        (29, 1000, true),
        (7, 50_000, false),
        (67, 4096, true),
        (3, 997, true),
    ] {
        let logits = randn(&mut rng, rows * vocab, 8.0);
        let targets: Vec<i32> = (0..rows)
            .map(|_| rng.random_range(0..vocab as i32))
            .collect();
        let weights: Vec<f32> = (0..rows)
            .map(|i| (!masked || i % 3 != 0) as u8 as f32)
            .collect();
        let run = |device: &Device, kernels: Kernels| {
            let device = device.clone().autodiff();
            let z = tensor(&logits, [rows, vocab], &device).require_grad();
            let loss = kernels::cross_entropy(
                z.clone(),
                ints(&targets, [rows], &device),
                masked.then(|| tensor(&weights, [rows], &device)),
                kernels,
            );
            let grads = loss.clone().backward();
            vec![
                ("loss", values(loss)),
                ("d_logits", values(z.grad(&grads).unwrap())),
            ]
        };
        let reference = run(&cpu(), Kernels::Reference);
        for_each_device_and_row_layout(&devices, |what, device| {
            compare(
                &format!("cross_entropy {rows}x{vocab} masked {masked} ({what})"),
                &run(device, Kernels::Custom),
                &reference,
            )
        });
    }
}
