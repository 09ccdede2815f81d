//! The operations of a Llama block, written once in plain Burn tensor ops. They run on every
//! device and differentiate through Burn's autodiff; they are also the oracle that fused GPU
//! kernels are tested against.

use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Int, Tensor, TensorData};

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let inv_rms = x
        .clone()
        .square()
        .mean_dim(D - 1)
        .add_scalar(eps)
        .sqrt()
        .recip();
    let mut w_shape = [1; D];
    w_shape[D - 1] = weight.dims()[0];
    x * inv_rms * weight.reshape(w_shape)
}

/// `silu(gate) * up`, the SwiGLU activation.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    silu(gate) * up
}

/// Cosine and sine tables of rotary position embeddings, `[max_seq_len, head_dim]`, in the
/// "rotate half" layout of Hugging Face Llama checkpoints: dimension `i` and `i + head_dim/2`
/// form a rotating pair with frequency `theta^(-2i/head_dim)`.
#[derive(Clone, Debug)]
pub struct RopeTables {
    pub cos: Tensor<2>,
    pub sin: Tensor<2>,
}

impl RopeTables {
    pub fn new(
        max_seq_len: usize,
        head_dim: usize,
        theta: f64,
        device: &burn::tensor::Device,
    ) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_seq_len * head_dim);
        let mut sin = Vec::with_capacity(max_seq_len * head_dim);
        for pos in 0..max_seq_len {
            for i in 0..head_dim {
                let freq = theta.powf(-2.0 * (i % half) as f64 / head_dim as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        // f64 values, stored in the device's float type (f32 in training, f64 in tests).
        let table =
            |v: Vec<f64>| Tensor::from_data(TensorData::new(v, [max_seq_len, head_dim]), device);
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// Rows `start .. start + len`, shaped `[1, len, 1, head_dim]` to broadcast over the batch
    /// and heads of token-major `[batch, seq, heads, head_dim]` tensors.
    pub fn window(&self, start: usize, len: usize) -> (Tensor<4>, Tensor<4>) {
        let head_dim = self.cos.dims()[1];
        let pick = |t: &Tensor<2>| {
            t.clone()
                .slice([start..start + len, 0..head_dim])
                .reshape([1, len, 1, head_dim])
        };
        (pick(&self.cos), pick(&self.sin))
    }

    /// The rows at `positions` (`[batch, len]`), shaped `[batch, len, 1, head_dim]`: for packed
    /// sequences, whose positions restart at each sample.
    pub fn gather(&self, positions: &[i32], batch: usize, len: usize) -> (Tensor<4>, Tensor<4>) {
        let head_dim = self.cos.dims()[1];
        let device = self.cos.device();
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(positions.to_vec(), [batch * len]),
            &device,
        );
        let pick = |t: &Tensor<2>| {
            t.clone()
                .select(0, index.clone())
                .reshape([batch, len, 1, head_dim])
        };
        (pick(&self.cos), pick(&self.sin))
    }
}

/// Rotates `x` (`[batch, heads, seq, head_dim]`) by the angles in `cos`/`sin`
/// (broadcastable to it): `x * cos + rotate_half(x) * sin`.
pub fn rope(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let half = d / 2;
    let first = x.clone().slice([0..b, 0..h, 0..t, 0..half]);
    let second = x.clone().slice([0..b, 0..h, 0..t, half..d]);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    x * cos + rotated * sin
}

/// An additive attention bias: 0 where a query may attend to a key, a large negative value
/// where it may not. Rows are laid out for [`attention`]'s grouped queries.
#[derive(Clone, Debug)]
pub struct AttentionBias {
    /// `[batch or 1, 1, group * q_len, k_len]`.
    pub bias: Tensor<4>,
}

/// Large enough that `exp` underflows to exactly 0, finite so that a row with no visible key
/// (a padding query) gives a harmless uniform average instead of NaN.
pub const MASKED: f32 = -1.0e30;

impl AttentionBias {
    /// Plain causal bias over `len` tokens of one segment, for `group` query heads per KV
    /// head. Batches with packing, padding or a cache use [`AttentionBias::from_segments`].
    pub fn causal(group: usize, len: usize, device: &burn::tensor::Device) -> Self {
        Self::from_segments(group, len, len, &vec![0; len], device)
    }

    /// Bias for `q_len` queries that are the last of `k_len` keys, `segments` (`[batch, k_len]`)
    /// naming each key's segment: query `i` (key position `p = k_len - q_len + i`) sees key `j`
    /// when `j <= p` and both are in one segment. Rows that are all alike share one bias row.
    pub fn from_segments(
        group: usize,
        q_len: usize,
        k_len: usize,
        segments: &[i32],
        device: &burn::tensor::Device,
    ) -> Self {
        let q_offset = k_len - q_len;
        let mut batch_rows: Vec<&[i32]> = segments.chunks(k_len).collect();
        if batch_rows.windows(2).all(|w| w[0] == w[1]) {
            batch_rows.truncate(1);
        }
        let rows = group * q_len;
        let mut values = vec![0f32; batch_rows.len() * rows * k_len];
        for (b, seg) in batch_rows.iter().enumerate() {
            for r in 0..rows {
                let p = q_offset + r % q_len;
                let row = &mut values[(b * rows + r) * k_len..][..k_len];
                for (j, v) in row.iter_mut().enumerate() {
                    if j > p || seg[j] != seg[p] {
                        *v = MASKED;
                    }
                }
            }
        }
        Self {
            bias: Tensor::from_data(
                TensorData::new(values, [batch_rows.len(), 1, rows, k_len]),
                device,
            ),
        }
    }
}

/// Grouped-query attention without repeating K/V in memory: the `group = heads / kv_heads`
/// query heads that share a KV head are stacked along the query axis, so one batched matmul
/// per KV head serves them all.
///
/// `q`: `[batch, heads, q_len, head_dim]`; `k`, `v`: `[batch, kv_heads, k_len, head_dim]`.
/// Query head `h` reads KV head `h / group`. Returns `[batch, heads, q_len, head_dim]`.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: &AttentionBias) -> Tensor<4> {
    let [b, h, t, d] = q.dims();
    let kv_heads = k.dims()[1];
    let group = h / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let q = q.reshape([b, kv_heads, group * t, d]);
    let scores = q.matmul(k.transpose()).mul_scalar(scale) + bias.bias.clone();
    let probs = softmax(scores, 3);
    probs.matmul(v).reshape([b, h, t, d])
}

/// Mean cross-entropy of `logits` (`[n, vocab]`) against `targets` (`[n]`), over the rows
/// where `weights` (`[n]`, 0 or 1) is 1, or over all rows.
pub fn cross_entropy(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    weights: Option<Tensor<1>>,
) -> Tensor<1> {
    let [n, _] = logits.dims();
    // logsumexp with the row max taken out; the max needs no gradient (it cancels).
    let max = logits.clone().max_dim(1).detach();
    let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let picked = logits.gather(1, targets.reshape([n, 1]));
    masked_mean((lse - picked).reshape([n]), weights)
}

/// The mean of `values` (`[n]`) over the rows where `weights` (0 or 1) is 1, or over all rows.
pub fn masked_mean(values: Tensor<1>, weights: Option<Tensor<1>>) -> Tensor<1> {
    match weights {
        Some(w) => {
            let count = w.clone().sum().clamp_min(1.0);
            (values * w).sum() / count
        }
        None => values.mean(),
    }
}
