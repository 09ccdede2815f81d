//! The custom operations as a Burn backend extension: one trait method per kernel launch.
//!
//! `#[backend_extension]` generates the routing from `Tensor::into_dispatch()` values to the
//! backend implementations: [`CubeBackend`](super::wgsl) launches the WGSL kernels, the
//! generated `Fusion<B>` implementation defers them inside burn's fusion streams, [`Flex`](super::cpu)
//! runs them on the host, and the
//! [`Autodiff`](super::autodiff) implementation records the backward passes. Tensors use the
//! layouts documented in `shaders/`.

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, backend_extension};
use burn::tensor::Shape;

#[backend_extension(Cube, Flex, Autodiff, Fusion)]
pub trait KilnKernels: Backend {
    /// A linear layer, `x · weightᵀ`: `x` `[rows, in]`, `weight` `[out, in]`. A matmul
    /// everywhere except on the CPU, where few rows (decoding) read the weight in place
    /// instead of packing it for the matmul, and more rows call gemm without flex's zero-fill
    /// and copy of the output (see `cpu.rs`).
    #[fusion(default)]
    fn linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, Self::float_transpose(weight))
    }

    /// [`linear`](Self::linear) by the matmul whatever the number of rows (on the CPU, gemm):
    /// what training runs, so that each row's result does not depend on how many rows share
    /// the call (a data-parallel worker's half batch computes what one process computes).
    #[fusion(default)]
    fn linear_matmul(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, Self::float_transpose(weight))
    }

    /// Gradients of [`linear`](Self::linear) for `dy` `[rows, out]`: `(dx, d_weight)` =
    /// `(dy · weight, dyᵀ · x)`. Two matmuls everywhere except on the CPU, where they write
    /// their outputs without flex's zero-fill and realigning copy (see `cpu.rs`).
    #[fusion(default)]
    fn linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let dx = Self::float_matmul(dy.clone(), weight);
        let d_weight = Self::float_matmul(Self::float_transpose(dy), x);
        (dx, d_weight)
    }

    /// Flash attention. `q`: `[batch, q_len, heads, head_dim]`; `k`, `v`:
    /// `[batch, k_len, kv_heads, head_dim]`; `segments`: `[batch, k_len]`.
    /// Returns the output (shaped like `q`) and the row log-sum-exp `[batch, heads, q_len]`.
    #[fusion(meta = attention_meta)]
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: IntTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients of [`flash_attention`](Self::flash_attention), also over a KV cache
    /// (`q_len < k_len`): `(dq, dk, dv)`, with dk/dv summed over the query heads sharing each
    /// KV head.
    #[fusion(meta = |q, k, v, _o, _lse, _d_o, _segments, _scale| (q.clone(), k.clone(), v.clone()))]
    #[allow(clippy::too_many_arguments)]
    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        segments: IntTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// RMSNorm over the last dimension of `x` (`[rows, dim]`): `(y, rstd)`, `rstd` `[rows]`.
    #[fusion(meta = rms_norm_meta)]
    fn rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients of [`rms_norm`](Self::rms_norm): `(dx, d_weight)`.
    #[fusion(meta = |x, weight, _rstd, _dy| (x.clone(), weight.clone()))]
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Rotary embedding of `x` (`[batch, seq, heads, head_dim]`) at `positions`
    /// (`[batch, seq]`), from `[max_positions, head_dim]` tables. `inverse` rotates back,
    /// which is the backward pass.
    #[fusion(dtype = x, shape = x)]
    fn rope(
        x: FloatTensor<Self>,
        positions: IntTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self>;

    /// `silu(gate) * up`.
    #[fusion(dtype = gate, shape = gate)]
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Gradients of [`swiglu`](Self::swiglu): `(d_gate, d_up)`.
    #[fusion(meta = |gate, up, _dy| (gate.clone(), up.clone()))]
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Per-row cross-entropy of `logits` (`[rows, vocab]`) against `targets` (`[rows]`,
    /// negative = ignored, loss 0): `(loss, lse)`, both `[rows]`.
    #[fusion(meta = cross_entropy_meta)]
    fn cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Gradient of [`cross_entropy`](Self::cross_entropy) with respect to the logits.
    #[fusion(dtype = logits, shape = logits)]
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        d_loss: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

fn attention_meta(
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    _segments: &TensorSpec,
    _scale: &f32,
) -> (TensorSpec, TensorSpec) {
    let [b, t, h] = [q.shape[0], q.shape[1], q.shape[2]];
    (q.clone(), TensorSpec::new(Shape::from([b, h, t]), q.dtype))
}

fn rms_norm_meta(x: &TensorSpec, _weight: &TensorSpec, _eps: &f32) -> (TensorSpec, TensorSpec) {
    (
        x.clone(),
        TensorSpec::new(Shape::from([x.shape[0]]), x.dtype),
    )
}

fn cross_entropy_meta(logits: &TensorSpec, _targets: &TensorSpec) -> (TensorSpec, TensorSpec) {
    let rows = TensorSpec::new(Shape::from([logits.shape[0]]), logits.dtype);
    (rows.clone(), rows)
}
