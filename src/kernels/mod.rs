//! The operations of a Llama block, each in two implementations behind one function:
//!
//! - `custom`: fused kernels (flash attention, RMSNorm, RoPE, SwiGLU, cross-entropy), each a
//!   Burn autodiff operation with its own backward kernels: the WGSL shaders in `shaders/` on
//!   wgpu devices, host code parallel over rows on the CPU ([`cpu`]).
//! - `reference`: the plain Burn compositions of [`crate::model::ops`], which run on every device and
//!   are the oracle the custom kernels are tested against.
//!
//! `model.kernels` in the config chooses (default `custom`); [`Kernels::resolve`] falls back
//! to `reference` on devices neither runs on (cuda).
//!
//! Attention and RoPE tensors are token-major, `[batch, seq, heads, head_dim]`, the layout the
//! projections produce, so no transposes are needed around the custom kernels.

mod autodiff;
pub mod cpu;
pub mod extension;
mod wgsl;

use burn::backend::{Dispatch, DispatchDevice};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::model::ops::{self, AttentionBias, RopeTables};
pub use extension::KilnKernels;
pub use wgsl::{
    ATTENTION_HEAD_DIMS, SHADERS, THREADS_PER_ROW, attention_block, force_threads_per_row,
    poison_outputs, shader_source, supports_head_dim, supports_row_width,
};

/// Which implementation of the block operations runs: the `model.kernels` setting, and, after
/// [`Kernels::resolve`], what a model on a given device actually runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// The WGSL kernels on wgpu devices, the CPU kernels on the CPU, the reference on CUDA.
    #[default]
    Custom,
    /// Plain Burn operations everywhere.
    Reference,
}

impl Kernels {
    /// `custom` where the kernels can run: the CPU, or a wgpu device and a head dimension that
    /// is a multiple of 8 (at most 256); `reference` everywhere else.
    pub fn resolve(self, device: &Device, head_dim: usize) -> Self {
        match self {
            Kernels::Custom if is_cpu(device) => Kernels::Custom,
            Kernels::Custom if is_wgpu(device) && wgsl::supports_head_dim(head_dim) => {
                Kernels::Custom
            }
            Kernels::Custom if is_wgpu(device) => {
                note_fallback(
                    "attention and rope",
                    format!("head dim {head_dim} is not a multiple of 8 up to 256"),
                );
                Kernels::Reference
            }
            _ => Kernels::Reference,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Custom => "custom",
            Kernels::Reference => "reference",
        }
    }
}

/// Whether `device` (or the device an autodiff device wraps) runs on burn's wgpu runtime.
pub fn is_wgpu(device: &Device) -> bool {
    let inner = device.clone().without_autodiff();
    matches!(
        inner.as_dispatch(),
        DispatchDevice::Cube(burn::cubecl::Device::Wgpu(_))
    )
}

/// Whether `device` (or the device an autodiff device wraps) is burn's flex CPU backend.
pub fn is_cpu(device: &Device) -> bool {
    let inner = device.clone().without_autodiff();
    matches!(inner.as_dispatch(), DispatchDevice::Flex(_))
}

/// Says once per process and op that `op` runs the reference instead of its custom kernel,
/// and why: a run on wgpu never falls back silently.
fn note_fallback(op: &'static str, why: String) {
    static NOTED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut noted = NOTED.lock().unwrap_or_else(|e| e.into_inner());
    if !noted.contains(&op) {
        noted.push(op);
        eprintln!("kernels: {op} runs the reference ops ({why})");
    }
}

/// The WGSL row kernels read rows as vec4; other widths run the reference there (noted once).
/// The CPU kernels take any width.
fn custom_rows<const D: usize>(op: &'static str, x: &Tensor<D>) -> bool {
    let width = x.dims()[D - 1];
    let ok = supports_row_width(width) || is_cpu(&x.device());
    if !ok {
        note_fallback(op, format!("width {width} is not a multiple of 4"));
    }
    ok
}

/// `x · weightᵀ` (`x` `[rows, in]`, `weight` `[out, in]`): a linear layer. Not behind
/// `model.kernels`: the CPU's few-row kernel is exact up to summation order and only replaces
/// the matmul where it is faster.
pub fn linear(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::linear(x.into_dispatch(), weight.into_dispatch()))
}

/// RMSNorm over the last dimension. The custom kernel reads rows as vec4: a last dimension
/// that is not a multiple of 4 runs the reference (as do `swiglu` and `cross_entropy`).
pub fn rms_norm<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    eps: f64,
    kernels: Kernels,
) -> Tensor<D> {
    match kernels {
        Kernels::Custom if custom_rows("rms_norm", &x) => {
            let dims = x.dims();
            let rows = dims[..D - 1].iter().product();
            let x = x.reshape([rows, dims[D - 1]]);
            let (y, _rstd) =
                Dispatch::rms_norm(x.into_dispatch(), weight.into_dispatch(), eps as f32);
            Tensor::<2>::from_dispatch(y).reshape(dims)
        }
        _ => ops::rms_norm(x, weight, eps),
    }
}

/// `silu(gate) * up`.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>, kernels: Kernels) -> Tensor<D> {
    match kernels {
        Kernels::Custom if custom_rows("swiglu", &gate) => {
            Tensor::from_dispatch(Dispatch::swiglu(gate.into_dispatch(), up.into_dispatch()))
        }
        _ => ops::swiglu(gate, up),
    }
}

/// Mean cross-entropy of `logits` (`[n, vocab]`) against `targets` (`[n]`) over the rows where
/// `weights` (`[n]`, 0 or 1) is 1, or over all rows.
pub fn cross_entropy(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    weights: Option<Tensor<1>>,
    kernels: Kernels,
) -> Tensor<1> {
    match kernels {
        Kernels::Custom if custom_rows("cross_entropy", &logits) => {
            let (loss, _lse) =
                Dispatch::cross_entropy(logits.into_dispatch(), targets.into_dispatch());
            ops::masked_mean(Tensor::from_dispatch(loss), weights)
        }
        _ => ops::cross_entropy(logits, targets, weights),
    }
}

/// Where each token of a batch sits: its segment (tokens attend only to earlier tokens of the
/// same segment) and its RoPE position. Host-side, built once per forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceLayout {
    pub batch: usize,
    /// Number of keys: cached plus new tokens.
    pub k_len: usize,
    /// Number of new tokens (queries); they are the last `q_len` keys.
    pub q_len: usize,
    /// `[batch, k_len]`: segment id of every key position; each segment is one contiguous run.
    pub segments: Vec<i32>,
    /// `[batch, q_len]`: RoPE position of every new token.
    pub positions: Vec<i32>,
}

impl SequenceLayout {
    /// Plain causal language modelling: one segment per row, positions `0..len`.
    pub fn causal(batch: usize, len: usize) -> Self {
        Self {
            batch,
            k_len: len,
            q_len: len,
            segments: vec![0; batch * len],
            positions: (0..batch).flat_map(|_| 0..len as i32).collect(),
        }
    }

    /// Packed rows: `segments[b * len + t]` names the sample token `t` of row `b` belongs to
    /// (contiguous runs); positions restart at 0 at each sample.
    pub fn packed(batch: usize, len: usize, segments: Vec<i32>) -> Self {
        assert_eq!(segments.len(), batch * len, "one segment id per token");
        let mut positions = Vec::with_capacity(batch * len);
        for row in segments.chunks(len) {
            let mut pos = 0;
            for (t, &s) in row.iter().enumerate() {
                if t > 0 && s != row[t - 1] {
                    pos = 0;
                }
                positions.push(pos);
                pos += 1;
            }
        }
        Self {
            batch,
            k_len: len,
            q_len: len,
            segments,
            positions,
        }
    }

    /// Generation with a KV cache: `q_len` new tokens after `start` cached ones, row `b` having
    /// `left_pad[b]` padding tokens at its start (segment 0; the real tokens are segment 1).
    /// Positions are absolute; RoPE only sees their differences.
    pub fn cached(left_pad: &[usize], start: usize, q_len: usize) -> Self {
        let k_len = start + q_len;
        let segments = left_pad
            .iter()
            .flat_map(|&pad| (0..k_len).map(move |j| (j >= pad) as i32))
            .collect();
        let positions = left_pad
            .iter()
            .flat_map(|_| (start..k_len).map(|p| p as i32))
            .collect();
        Self {
            batch: left_pad.len(),
            k_len,
            q_len,
            segments,
            positions,
        }
    }

    /// Whether every row has the positions `k_len - q_len ..` (no packing restarts).
    fn positions_are_a_window(&self) -> Option<usize> {
        let start = self.k_len - self.q_len;
        self.positions
            .chunks(self.q_len)
            .all(|row| {
                row.iter()
                    .enumerate()
                    .all(|(t, &p)| p as usize == start + t)
            })
            .then_some(start)
    }
}

/// A [`SequenceLayout`] on the device, in the form the chosen kernels consume.
#[derive(Clone, Debug)]
pub enum PreparedLayout {
    Reference {
        bias: AttentionBias,
        /// `[1 or batch, q_len, 1, head_dim]`.
        cos: Tensor<4>,
        sin: Tensor<4>,
    },
    Custom {
        /// `[batch, k_len]`.
        segments: Tensor<2, Int>,
        /// `[batch, q_len]`.
        positions: Tensor<2, Int>,
        /// `[max_seq_len, head_dim]`.
        cos: Tensor<2>,
        sin: Tensor<2>,
    },
}

impl PreparedLayout {
    pub fn new(
        layout: &SequenceLayout,
        kernels: Kernels,
        rope: &RopeTables,
        group: usize,
        device: &Device,
    ) -> Self {
        let (b, tq, tk) = (layout.batch, layout.q_len, layout.k_len);
        match kernels {
            Kernels::Reference => {
                let bias = AttentionBias::from_segments(group, tq, tk, &layout.segments, device);
                let (cos, sin) = match layout.positions_are_a_window() {
                    Some(start) => rope.window(start, tq),
                    None => rope.gather(&layout.positions, b, tq),
                };
                Self::Reference { bias, cos, sin }
            }
            Kernels::Custom => {
                let ints = |v: &[i32], shape: [usize; 2]| {
                    Tensor::<2, Int>::from_data(TensorData::new(v.to_vec(), shape), device)
                };
                Self::Custom {
                    segments: ints(&layout.segments, [b, tk]),
                    positions: ints(&layout.positions, [b, tq]),
                    cos: rope.cos.clone(),
                    sin: rope.sin.clone(),
                }
            }
        }
    }

    /// Rotary embedding of `x`, `[batch, seq, heads, head_dim]`.
    pub fn rope(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Self::Reference { cos, sin, .. } => ops::rope(x, cos.clone(), sin.clone()),
            Self::Custom {
                positions,
                cos,
                sin,
                ..
            } => Tensor::from_dispatch(Dispatch::rope(
                x.into_dispatch(),
                positions.clone().into_dispatch(),
                cos.clone().into_dispatch(),
                sin.clone().into_dispatch(),
                false,
            )),
        }
    }

    /// Causal, segment-masked, grouped-query attention. `q`: `[batch, q_len, heads, head_dim]`;
    /// `k`, `v`: `[batch, k_len, kv_heads, head_dim]`. Returns `q`'s shape.
    pub fn attention(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        match self {
            Self::Reference { bias, .. } => ops::attention(
                q.swap_dims(1, 2),
                k.swap_dims(1, 2),
                v.swap_dims(1, 2),
                bias,
            )
            .swap_dims(1, 2),
            Self::Custom { segments, .. } => {
                let scale = 1.0 / (q.dims()[3] as f32).sqrt();
                let (out, _lse) = Dispatch::flash_attention(
                    q.into_dispatch(),
                    k.into_dispatch(),
                    v.into_dispatch(),
                    segments.clone().into_dispatch(),
                    scale,
                );
                Tensor::from_dispatch(out)
            }
        }
    }
}
