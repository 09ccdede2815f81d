//! The custom operations on burn's CPU backend (flex): the same contracts as the WGSL kernels
//! (see `extension.rs` and `shaders/`), computed on host slices.
//!
//! Why they exist: burn-flex runs every elementwise op on one thread and evaluates `exp` with
//! the scalar libm function, and under autodiff softmax, SiLU and the cross-entropy are chains of
//! such ops, each writing a full tensor. Here each operation is one pass, parallel over rows
//! with rayon, with a polynomial `exp` (AVX2 intrinsics over slices), and the bodies are compiled
//! for AVX2 + FMA where the CPU has them (checked once at run time). The linear layer calls
//! gemm itself, forward and backward, or reads the weight in place for few rows (AVX-512 where
//! the CPU has it).
//!
//! Attention is flash attention: key tiles of [`BLOCK_KEYS`] go through an online softmax, so no
//! `[q_len, k_len]` matrix exists; tiles wholly above the causal diagonal or outside a query's
//! segment are skipped; the query heads sharing a KV head read its tiles once (no repeated K/V).
//!
//! f32 and f64 are supported (f64 is what the finite-difference tests use); f64 takes the libm
//! `exp`.

use std::borrow::Cow;

use burn::backend::Flex;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::{DType, Element, Shape, TensorData};
use num_traits::Float;
use rayon::prelude::*;

use super::extension::KilnKernels;

type Host = FloatTensor<Flex>;

/// Keys per tile in flash attention: one tile's scores of one query are 64 values, eight AVX2
/// registers of f32.
pub const BLOCK_KEYS: usize = 64;
/// Queries per forward task (times the query heads of one KV head).
const BLOCK_QUERIES: usize = 32;
/// Rows per rayon task in the row kernels: enough work to amortise the task, few enough to
/// balance two to a few dozen cores.
const MIN_ROWS_PER_TASK: usize = 16;

/// f32 or f64, with the `exp` each uses.
pub trait Real:
    Float + Element + bytemuck::Pod + Send + Sync + std::ops::AddAssign + std::ops::MulAssign
{
    fn exp_fast(self) -> Self;
    fn from_f64(v: f64) -> Self;

    /// `x[i] = exp(x[i] * scale - shift)` in place; returns their sum (eight lanes, then the
    /// lanes in order, the same order on every path).
    #[inline(always)]
    fn exp_in_place(x: &mut [Self], scale: Self, shift: Self) -> Self {
        exp_in_place(x, scale, shift)
    }

    /// `sum(exp(x[i] - shift))`, summed as [`Real::exp_in_place`] sums.
    #[inline(always)]
    fn sum_exp(x: &[Self], shift: Self) -> Self {
        sum_exp(x, shift)
    }

    /// `out[i] = factor * exp(x[i] - shift)`.
    #[inline(always)]
    fn exp_into(out: &mut [Self], x: &[Self], shift: Self, factor: Self) {
        exp_into(out, x, shift, factor)
    }

    /// `out[i] = 1 / (1 + exp(-x[i]))`.
    #[inline(always)]
    fn sigmoid_into(out: &mut [Self], x: &[Self]) {
        sigmoid_into(out, x)
    }

    /// The eight dot products of four weight rows with two input rows (all of one length),
    /// asking the cache for the start of `ahead` meanwhile (see [`linear_few_rows`]).
    #[inline(always)]
    fn dot_4x2(w: [&[Self]; 4], x: [&[Self]; 2], ahead: &[Self]) -> [[Self; 2]; 4] {
        let _ = ahead;
        dot_4x2(w, x)
    }
}

impl Real for f32 {
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }

    #[inline(always)]
    fn dot_4x2(w: [&[Self]; 4], x: [&[Self]; 2], ahead: &[Self]) -> [[Self; 2]; 4] {
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx512() {
                // SAFETY: the CPU has AVX-512F; every row has x[0].len() elements (asserted).
                return unsafe { avx512::dot_4x2(w, x, ahead) };
            }
            if has_avx2() {
                // SAFETY: the CPU has AVX2 and FMA; every row has x[0].len() elements
                // (asserted).
                return unsafe { avx2::dot_4x2(w, x, ahead) };
            }
        }
        let _ = ahead;
        dot_4x2(w, x)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }

    // The slice forms of exp in AVX2 intrinsics: the compiler kept the polynomial scalar (with
    // branches for the range checks) inside reductions and variable-length loops, where perf
    // found 12% of a bench-5m training step.
    #[inline(always)]
    fn exp_in_place(x: &mut [Self], scale: Self, shift: Self) -> Self {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2::exp_in_place(x, scale, shift) };
        }
        exp_in_place(x, scale, shift)
    }

    #[inline(always)]
    fn sum_exp(x: &[Self], shift: Self) -> Self {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2::sum_exp(x, shift) };
        }
        sum_exp(x, shift)
    }

    #[inline(always)]
    fn exp_into(out: &mut [Self], x: &[Self], shift: Self, factor: Self) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2::exp_into(out, x, shift, factor) };
        }
        exp_into(out, x, shift, factor)
    }

    #[inline(always)]
    fn sigmoid_into(out: &mut [Self], x: &[Self]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2::sigmoid_into(out, x) };
        }
        sigmoid_into(out, x)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// The range of [`exp_f32`] and its eight-lane twin: 0 below, infinity above.
const EXP_LOW: f32 = -87.3;
const EXP_HIGH: f32 = 88.3;

/// `e^x` for f32 without branches, so a loop over it vectorises: Cephes' `expf` (x = n ln2 + r,
/// |r| <= ln2/2, a degree-5 polynomial for e^r, 2^n built in the exponent bits). Relative error
/// about 2e-7 (tested against f64 `exp`); 0 below -87.3 (where 2^n would be subnormal),
/// infinity above 88.3, NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(EXP_LOW, EXP_HIGH);
    let n = (xc * std::f32::consts::LOG2_E).round_ties_even();
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.0e-1;
    let y = p * (r * r) + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let v = y * scale;
    if x < EXP_LOW {
        0.0
    } else if x > EXP_HIGH {
        f32::INFINITY
    } else {
        v
    }
}

/// Runs `f` compiled for AVX2 + FMA when the CPU has them (the closure and everything it
/// inlines are then vectorised with 256-bit registers), else as compiled for the baseline.
/// Callers mark the closure `#[inline(always)]`: a closure left out of line is compiled for
/// the baseline (SSE2, `round` through libm), which perf showed.
#[inline(always)]
fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if has_avx2() {
            // SAFETY: the CPU has both features (checked above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

/// The few-row linear layer's inner product on 16 lanes: on a CPU with full-width AVX-512
/// units (AMD Zen 5) it does twice the arithmetic per instruction of the AVX2 version, which
/// decoding at batch 32 and 64 is bound by.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::avx2::dot_4x2`] on 16 lanes; one prefetched cache line per 16 elements.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_4x2(w: [&[f32]; 4], x: [&[f32]; 2], ahead: &[f32]) -> [[f32; 2]; 4] {
        let k = x[0].len();
        assert!(x[1].len() == k && w.iter().all(|w| w.len() == k));
        let body = k - k % 16;
        let lines = ahead.len() / 16;
        let mut out = [[0f32; 2]; 4];
        // SAFETY: every load reads 16 elements at i < body <= len of each row; each prefetch
        // address lies in `ahead` (line < lines).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; 4];
            let mut i = 0;
            while i < body {
                let line = i / 16;
                if line < lines {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.as_ptr().add(line * 16).cast());
                }
                let x0 = _mm512_loadu_ps(x[0].as_ptr().add(i));
                let x1 = _mm512_loadu_ps(x[1].as_ptr().add(i));
                for a in 0..4 {
                    let wv = _mm512_loadu_ps(w[a].as_ptr().add(i));
                    acc[a][0] = _mm512_fmadd_ps(wv, x0, acc[a][0]);
                    acc[a][1] = _mm512_fmadd_ps(wv, x1, acc[a][1]);
                }
                i += 16;
            }
            for a in 0..4 {
                for b in 0..2 {
                    let tail = (body..k).fold(0.0, |s, i| s + w[a][i] * x[b][i]);
                    out[a][b] = _mm512_reduce_add_ps(acc[a][b]) + tail;
                }
            }
        }
        out
    }
}

/// The few-row linear layer's inner product in AVX2 intrinsics: written out because the
/// compiler left the portable version's 64 accumulators in memory (46 GFLOP/s at 32 rows).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::exp_f32`] on eight lanes, with FMA: the same range reduction and polynomial.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        use super::{EXP_HIGH, EXP_LOW};
        let set = _mm256_set1_ps;
        // max/min return their second operand for NaN: a NaN lane computes exp(EXP_LOW), and is
        // put back at the end.
        let xc = _mm256_min_ps(_mm256_max_ps(x, set(EXP_LOW)), set(EXP_HIGH));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, set(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, set(0.693_359_4), xc);
        let r = _mm256_fnmadd_ps(n, set(-2.121_944_4e-4), r);
        let mut p = set(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5.0e-1,
        ] {
            p = _mm256_fmadd_ps(p, r, set(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), set(1.0));
        let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        let v = _mm256_mul_ps(y, two_n);
        let v = _mm256_blendv_ps(
            v,
            _mm256_setzero_ps(),
            _mm256_cmp_ps::<_CMP_LT_OQ>(x, set(EXP_LOW)),
        );
        let v = _mm256_blendv_ps(
            v,
            set(f32::INFINITY),
            _mm256_cmp_ps::<_CMP_GT_OQ>(x, set(EXP_HIGH)),
        );
        _mm256_blendv_ps(v, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
    }

    /// The eight lanes of `acc` added to `tail` in lane order (the portable functions' order).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn fold_lanes(acc: __m256, tail: f32) -> f32 {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes.iter().fold(tail, |s, &v| s + v)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn exp_in_place(x: &mut [f32], scale: f32, shift: f32) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut x8 = x.chunks_exact_mut(8);
        for c in &mut x8 {
            // SAFETY: `c` holds eight f32.
            unsafe {
                let v = exp8(_mm256_fmsub_ps(
                    _mm256_loadu_ps(c.as_ptr()),
                    _mm256_set1_ps(scale),
                    _mm256_set1_ps(shift),
                ));
                _mm256_storeu_ps(c.as_mut_ptr(), v);
                acc = _mm256_add_ps(acc, v);
            }
        }
        let mut tail = 0.0;
        for v in x8.into_remainder() {
            *v = super::exp_f32(*v * scale - shift);
            tail += *v;
        }
        fold_lanes(acc, tail)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn sum_exp(x: &[f32], shift: f32) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let x8 = x.chunks_exact(8);
        let tail = x8
            .remainder()
            .iter()
            .fold(0.0, |s, &v| s + super::exp_f32(v - shift));
        for c in x8 {
            // SAFETY: `c` holds eight f32.
            let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(v, _mm256_set1_ps(shift))));
        }
        fold_lanes(acc, tail)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn exp_into(out: &mut [f32], x: &[f32], shift: f32, factor: f32) {
        assert_eq!(out.len(), x.len());
        let mut o8 = out.chunks_exact_mut(8);
        let x8 = x.chunks_exact(8);
        let x_tail = x8.remainder();
        for (o, c) in (&mut o8).zip(x8) {
            // SAFETY: `o` and `c` hold eight f32 each.
            unsafe {
                let v = exp8(_mm256_sub_ps(
                    _mm256_loadu_ps(c.as_ptr()),
                    _mm256_set1_ps(shift),
                ));
                _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(v, _mm256_set1_ps(factor)));
            }
        }
        for (o, &x) in o8.into_remainder().iter_mut().zip(x_tail) {
            *o = factor * super::exp_f32(x - shift);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn sigmoid_into(out: &mut [f32], x: &[f32]) {
        assert_eq!(out.len(), x.len());
        let one = _mm256_set1_ps(1.0);
        let mut o8 = out.chunks_exact_mut(8);
        let x8 = x.chunks_exact(8);
        let x_tail = x8.remainder();
        for (o, c) in (&mut o8).zip(x8) {
            // SAFETY: `o` and `c` hold eight f32 each.
            unsafe {
                let e = exp8(_mm256_sub_ps(
                    _mm256_setzero_ps(),
                    _mm256_loadu_ps(c.as_ptr()),
                ));
                _mm256_storeu_ps(o.as_mut_ptr(), _mm256_div_ps(one, _mm256_add_ps(one, e)));
            }
        }
        for (o, &x) in o8.into_remainder().iter_mut().zip(x_tail) {
            *o = 1.0 / (1.0 + super::exp_f32(-x));
        }
    }

    /// Eight accumulators of 8 lanes in registers; each weight vector loaded serves two rows,
    /// each input vector four weight rows. Every 8 elements it prefetches one cache line of
    /// `ahead` (up to 2k elements of it).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_4x2(w: [&[f32]; 4], x: [&[f32]; 2], ahead: &[f32]) -> [[f32; 2]; 4] {
        let k = x[0].len();
        assert!(x[1].len() == k && w.iter().all(|w| w.len() == k));
        let body = k - k % 8;
        let lines = ahead.len() / 16;
        let mut out = [[0f32; 2]; 4];
        // SAFETY: every load reads 8 elements at i < body <= len of each row; each prefetch
        // address lies in `ahead` (line < lines), and a prefetch never faults anyway.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let mut i = 0;
            while i < body {
                let line = i / 8;
                if line < lines {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.as_ptr().add(line * 16).cast());
                }
                let x0 = _mm256_loadu_ps(x[0].as_ptr().add(i));
                let x1 = _mm256_loadu_ps(x[1].as_ptr().add(i));
                for a in 0..4 {
                    let wv = _mm256_loadu_ps(w[a].as_ptr().add(i));
                    acc[a][0] = _mm256_fmadd_ps(wv, x0, acc[a][0]);
                    acc[a][1] = _mm256_fmadd_ps(wv, x1, acc[a][1]);
                }
                i += 8;
            }
            // The eight horizontal sums at once: pairwise adds, then the two 128-bit halves.
            let h = |p: __m256, q: __m256| _mm256_hadd_ps(p, q);
            let s0 = h(h(acc[0][0], acc[0][1]), h(acc[1][0], acc[1][1]));
            let s1 = h(h(acc[2][0], acc[2][1]), h(acc[3][0], acc[3][1]));
            let sums = _mm256_add_ps(
                _mm256_permute2f128_ps(s0, s1, 0x20),
                _mm256_permute2f128_ps(s0, s1, 0x31),
            );
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
            for a in 0..4 {
                for b in 0..2 {
                    let tail = (body..k).fold(0.0, |s, i| s + w[a][i] * x[b][i]);
                    out[a][b] = lanes[a * 2 + b] + tail;
                }
            }
        }
        out
    }
}

/// Sum of `a[i] * b[i]` in eight independent lanes, so it vectorises (a single running sum is
/// a dependency chain the compiler may not reorder).
#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().fold(tail, |s, &v| s + v)
}

/// `y += a * x`.
#[inline(always)]
fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[inline(always)]
fn max_of<T: Real>(x: &[T]) -> T {
    let mut lanes = [T::neg_infinity(); 8];
    let x8 = x.chunks_exact(8);
    let tail = x8
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &v| m.max(v));
    for c in x8 {
        for l in 0..8 {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// The largest of `x` and `ln(sum(exp(x)))`, summed in fixed lanes: the cross-entropy's
/// log-normaliser, and generation's over a 49k-token vocabulary (where libm's f64 `exp` per
/// logit was 6% of a batch-64 decoding step).
#[inline(always)]
pub fn max_and_log_sum_exp<T: Real>(x: &[T]) -> (T, T) {
    vectorized(
        #[inline(always)]
        || {
            let max = max_of(x);
            (max, max + T::sum_exp(x, max).ln())
        },
    )
}

// The portable forms of `Real`'s slice functions (f64, and f32 without AVX2).

#[inline(always)]
fn exp_in_place<T: Real>(x: &mut [T], scale: T, shift: T) -> T {
    let mut lanes = [T::zero(); 8];
    let mut x8 = x.chunks_exact_mut(8);
    for c in &mut x8 {
        for l in 0..8 {
            c[l] = (c[l] * scale - shift).exp_fast();
            lanes[l] += c[l];
        }
    }
    let mut tail = T::zero();
    for v in x8.into_remainder() {
        *v = (*v * scale - shift).exp_fast();
        tail += *v;
    }
    lanes.iter().fold(tail, |s, &v| s + v)
}

#[inline(always)]
fn sum_exp<T: Real>(x: &[T], shift: T) -> T {
    let mut lanes = [T::zero(); 8];
    let x8 = x.chunks_exact(8);
    let tail = x8
        .remainder()
        .iter()
        .fold(T::zero(), |s, &v| s + (v - shift).exp_fast());
    for c in x8 {
        for l in 0..8 {
            lanes[l] += (c[l] - shift).exp_fast();
        }
    }
    lanes.iter().fold(tail, |s, &v| s + v)
}

#[inline(always)]
fn exp_into<T: Real>(out: &mut [T], x: &[T], shift: T, factor: T) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = factor * (x - shift).exp_fast();
    }
}

#[inline(always)]
fn sigmoid_into<T: Real>(out: &mut [T], x: &[T]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = T::one() / (T::one() + (-x).exp_fast());
    }
}

/// The tensor's values in row-major order (borrowed when it is already contiguous).
fn host<T: Real>(t: &Host) -> Cow<'_, [T]> {
    match t.as_slice::<T>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(
            t.to_contiguous()
                .as_slice::<T>()
                .expect("contiguous")
                .to_vec(),
        ),
    }
}

/// Keys or values `[batch, len, kv_heads, d]` whose positions are contiguous within each batch
/// row, as a KV cache's views of its buffers are: the storage from the first element and the
/// distance between batch rows, without a copy. Anything else is made contiguous.
fn batch_strided<T: Real>(t: &Host) -> (Cow<'_, [T]>, usize) {
    let layout = t.layout();
    let (shape, strides) = (layout.shape(), layout.strides());
    let row = (shape[2] * shape[3]) as isize;
    let rows_contiguous = strides[3] == 1
        && strides[2] == shape[3] as isize
        && (shape[1] == 1 || strides[1] == row)
        && (shape[0] == 1 || strides[0] >= shape[1] as isize * row);
    if rows_contiguous && t.dtype() == T::dtype() {
        let stride = if shape[0] == 1 {
            shape[1] * row as usize
        } else {
            strides[0] as usize
        };
        return (
            Cow::Borrowed(&t.storage::<T>()[layout.start_offset()..]),
            stride,
        );
    }
    (host(t), shape[1] * row as usize)
}

/// Keys and values read in place when both have one batch stride (a KV cache's buffers), else
/// contiguous copies.
fn keys_and_values<'a, T: Real>(k: &'a Host, v: &'a Host) -> (Cow<'a, [T]>, Cow<'a, [T]>, usize) {
    let ((ks, k_stride), (vs, v_stride)) = (batch_strided::<T>(k), batch_strided::<T>(v));
    if k_stride == v_stride {
        return (ks, vs, k_stride);
    }
    let [len, kv_heads, d] = [dims(k)[1], dims(k)[2], dims(k)[3]];
    (host(k), host(v), len * kv_heads * d)
}

fn host_ints(t: IntTensor<Flex>) -> Vec<i64> {
    t.into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("integer tensor")
}

fn dims(t: &Host) -> &[usize] {
    t.layout().shape()
}

/// A fresh output buffer: NaN when the tests poison outputs (an element a kernel forgets to
/// write then fails the comparison), else zeros.
fn output<T: Real>(n: usize) -> Vec<T> {
    let fill = if super::wgsl::poisoning() {
        T::nan()
    } else {
        T::zero()
    };
    vec![fill; n]
}

fn tensor<T: Real>(values: Vec<T>, shape: &[usize]) -> Host {
    Host::from_data(TensorData::new(values, Shape::from(shape.to_vec())))
}

/// Calls `$body` with `T` bound to the float type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $op:literal, $body:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => $body::<f32>($($arg),*),
            DType::F64 => $body::<f64>($($arg),*),
            other => panic!("{}: kiln's CPU kernels take f32 or f64, not {other:?}", $op),
        }
    };
}

impl KilnKernels for Flex {
    fn linear(x: Host, weight: Host) -> Host {
        let rows = dims(&x)[0];
        if rows <= FEW_ROWS && weight.is_contiguous() {
            by_dtype!(x.dtype(), "linear", linear_few_rows(&x, &weight))
        } else {
            Self::linear_matmul(x, weight)
        }
    }

    fn linear_matmul(x: Host, weight: Host) -> Host {
        let wt = Self::float_transpose(weight);
        by_dtype!(x.dtype(), "linear_matmul", matmul(&x, &wt))
    }

    fn linear_backward(x: Host, weight: Host, dy: Host) -> (Host, Host) {
        let dyt = Self::float_transpose(dy.clone());
        by_dtype!(
            x.dtype(),
            "linear_backward",
            linear_backward(&x, &weight, &dy, &dyt)
        )
    }

    fn flash_attention(
        q: Host,
        k: Host,
        v: Host,
        segments: IntTensor<Self>,
        scale: f32,
    ) -> (Host, Host) {
        let segments = host_ints(segments);
        by_dtype!(
            q.dtype(),
            "flash_attention",
            attention_forward(&q, &k, &v, &segments, scale)
        )
    }

    fn flash_attention_backward(
        q: Host,
        k: Host,
        v: Host,
        out: Host,
        lse: Host,
        d_out: Host,
        segments: IntTensor<Self>,
        scale: f32,
    ) -> (Host, Host, Host) {
        let segments = host_ints(segments);
        by_dtype!(
            q.dtype(),
            "flash_attention_backward",
            attention_backward(&q, &k, &v, &out, &lse, &d_out, &segments, scale)
        )
    }

    fn rms_norm(x: Host, weight: Host, eps: f32) -> (Host, Host) {
        by_dtype!(x.dtype(), "rms_norm", rms_norm_forward(&x, &weight, eps))
    }

    fn rms_norm_backward(x: Host, weight: Host, rstd: Host, dy: Host) -> (Host, Host) {
        by_dtype!(
            x.dtype(),
            "rms_norm_backward",
            rms_norm_backward(&x, &weight, &rstd, &dy)
        )
    }

    fn rope(x: Host, positions: IntTensor<Self>, cos: Host, sin: Host, inverse: bool) -> Host {
        let positions = host_ints(positions);
        by_dtype!(x.dtype(), "rope", rope(&x, &positions, &cos, &sin, inverse))
    }

    fn swiglu(gate: Host, up: Host) -> Host {
        by_dtype!(gate.dtype(), "swiglu", swiglu_forward(&gate, &up))
    }

    fn swiglu_backward(gate: Host, up: Host, dy: Host) -> (Host, Host) {
        by_dtype!(
            gate.dtype(),
            "swiglu_backward",
            swiglu_backward(&gate, &up, &dy)
        )
    }

    fn cross_entropy(logits: Host, targets: IntTensor<Self>) -> (Host, Host) {
        let targets = host_ints(targets);
        by_dtype!(
            logits.dtype(),
            "cross_entropy",
            cross_entropy_forward(&logits, &targets)
        )
    }

    fn cross_entropy_backward(
        logits: Host,
        targets: IntTensor<Self>,
        lse: Host,
        d_loss: Host,
    ) -> Host {
        let targets = host_ints(targets);
        by_dtype!(
            logits.dtype(),
            "cross_entropy_backward",
            cross_entropy_backward(&logits, &targets, &lse, &d_loss)
        )
    }
}

// ---- Linear layers with few rows ---------------------------------------------------------

/// Up to this many rows, [`linear_few_rows`] replaces the matmul. Above it gemm, which packs
/// the weight into panels on every call, amortises the packing over enough rows and blocks the
/// rows for the cache. Decoding SmolLM2-135M per step (docs/benchmarks.md): at batch 1 26
/// against 39 ms, at batch 8 52 against 99; with prefetching and in-place writes, at batch 48
/// 89 against 116 ms, at 64 117 against 131, at 96 169 against 174-184, at 128 234 against
/// 190-198 (there each weight block re-reads 128 input rows from L2).
const FEW_ROWS: usize = 64;

/// `x · weightᵀ` for few rows of `x`, reading `weight` (`[out, in]`, contiguous) where it lies:
/// every output is a dot product of a weight row with an input row, four weight rows by two
/// input rows at a time (eight 8-lane accumulators), so each weight element loaded serves two
/// rows and each input element four outputs. Parallel over blocks of outputs; each task writes
/// its columns of `y` in place (a transposition of a task-major buffer afterwards, on one
/// thread, was 11% of a batch-32 decode step).
fn linear_few_rows<T: Real>(x: &Host, weight: &Host) -> Host {
    let [rows, k] = [dims(x)[0], dims(x)[1]];
    let n = dims(weight)[0];
    let (xs, w) = (host::<T>(x), host::<T>(weight));
    let mut y = output::<T>(rows * n);
    let columns = Disjoint(y.as_mut_ptr(), y.len());
    // At most 64 outputs a task, in whole blocks of four, and a number of tasks that the
    // threads share evenly: 576 outputs as 9 tasks of 64 left one of two threads idle for a
    // ninth of every projection (perf: 11% of a batch-32 decode step in the scheduler).
    let threads = rayon::current_num_threads().max(1);
    let rounds = n.div_ceil(threads * 64).max(1);
    let per_task = n.div_ceil(threads * rounds).next_multiple_of(4).max(4);
    w.par_chunks(per_task * k)
        .enumerate()
        .for_each(|(task, w)| {
            let first = task * per_task;
            // SAFETY: this task alone writes the columns first..first + outputs of y.
            let put = |r: usize, o: usize, v: T| unsafe { columns.write(r * n + first + o, v) };
            vectorized(
                #[inline(always)]
                || {
                    let outputs = w.len() / k;
                    let pairs = rows / 2;
                    let mut o = 0;
                    while o + 4 <= outputs {
                        let wr = [0, 1, 2, 3].map(|a| &w[(o + a) * k..][..k]);
                        // The next four weight rows, a share of them fetched during each row
                        // pair's pass: the block's first pass reads its weights from memory and
                        // the others from L1, so without this the memory sat idle for most of the
                        // block (the hardware prefetcher runs only a few lines ahead of demand).
                        let next = &w[((o + 4) * k).min(w.len())..((o + 8) * k).min(w.len())];
                        let share = next.len().div_ceil(pairs.max(1)).next_multiple_of(16);
                        let mut r = 0;
                        while r + 2 <= rows {
                            let xr = [&xs[r * k..][..k], &xs[(r + 1) * k..][..k]];
                            let start = (r / 2 * share).min(next.len());
                            let ahead = &next[start..(start + share).min(next.len())];
                            let sums = T::dot_4x2(wr, xr, ahead);
                            for (a, pair) in sums.into_iter().enumerate() {
                                put(r, o + a, pair[0]);
                                put(r + 1, o + a, pair[1]);
                            }
                            r += 2;
                        }
                        if r < rows {
                            for (a, wa) in wr.into_iter().enumerate() {
                                put(r, o + a, dot(wa, &xs[r * k..][..k]));
                            }
                        }
                        o += 4;
                    }
                    for o in o..outputs {
                        for r in 0..rows {
                            put(r, o, dot(&w[o * k..][..k], &xs[r * k..][..k]));
                        }
                    }
                },
            )
        });
    tensor(y, &[rows, n])
}

/// A buffer that parallel tasks write at disjoint indices (each task its own columns).
struct Disjoint<T>(*mut T, usize);

// SAFETY: the tasks never write one index twice (the callers' contract), so sharing the
// pointer between threads is sharing disjoint `&mut` elements.
unsafe impl<T: Send> Send for Disjoint<T> {}
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    /// # Safety
    /// No other task writes index `i` while the buffer is shared.
    #[inline(always)]
    unsafe fn write(&self, i: usize, value: T) {
        assert!(i < self.1, "write past the end of a shared output");
        // SAFETY: in bounds (asserted); exclusive by the caller's contract.
        unsafe { self.0.add(i).write(value) }
    }
}

/// `a · b` for 2-D `a` `[m, k]` and `b` `[k, n]` in any strides: gemm writes the whole output
/// into a fresh buffer. flex's matmul zero-fills its output as bytes and then copies it into a
/// realigned buffer, which perf put at 5% of a bench-5m training step.
fn matmul<T: Real>(a: &Host, b: &Host) -> Host {
    let ([m, k], n) = ([dims(a)[0], dims(a)[1]], dims(b)[1]);
    assert_eq!(dims(b)[0], k, "matmul: inner dimensions differ");
    let mut out: Vec<T> = if super::wgsl::poisoning() {
        output(m * n)
    } else {
        Vec::with_capacity(m * n)
    };
    // gemm takes negative strides, but the slices below start at the view's offset.
    let positive = |t: &Host| t.layout().strides().iter().all(|&s| s >= 0);
    let (a, b) = (
        if positive(a) {
            Cow::Borrowed(a)
        } else {
            Cow::Owned(a.to_contiguous())
        },
        if positive(b) {
            Cow::Borrowed(b)
        } else {
            Cow::Owned(b.to_contiguous())
        },
    );
    let (sa, sb) = (a.layout().strides(), b.layout().strides());
    let pa = &a.storage::<T>()[a.layout().start_offset()..];
    let pb = &b.storage::<T>()[b.layout().start_offset()..];
    let parallelism = if m * n * k >= 192 * 192 * 192 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the strides and sizes come from the tensors' layouts, so every element gemm
    // reads lies in `pa` / `pb`; with `read_dst = false` gemm writes each of the m x n
    // outputs once and reads none, so the buffer is initialised before `set_len`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            pa.as_ptr(),
            sa[1],
            sa[0],
            pb.as_ptr(),
            sb[1],
            sb[0],
            T::zero(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
        out.set_len(m * n);
    }
    tensor(out, &[m, n])
}

/// `(dy · weight, dyᵀ · x)`, with `dyt` the transposed view of `dy`.
fn linear_backward<T: Real>(x: &Host, weight: &Host, dy: &Host, dyt: &Host) -> (Host, Host) {
    (matmul::<T>(dy, weight), matmul::<T>(dyt, x))
}

/// The eight dot products of four weight rows with two input rows, portable.
#[inline(always)]
fn dot_4x2<T: Real>(w: [&[T]; 4], x: [&[T]; 2]) -> [[T; 2]; 4] {
    let k = x[0].len();
    let body = k - k % 8;
    let mut acc = [[[T::zero(); 8]; 2]; 4];
    let mut i = 0;
    while i < body {
        let xv = [&x[0][i..i + 8], &x[1][i..i + 8]];
        for a in 0..4 {
            let wv = &w[a][i..i + 8];
            for b in 0..2 {
                for l in 0..8 {
                    acc[a][b][l] += wv[l] * xv[b][l];
                }
            }
        }
        i += 8;
    }
    let mut out = [[T::zero(); 2]; 4];
    for a in 0..4 {
        for b in 0..2 {
            let tail = (body..k).fold(T::zero(), |s, i| s + w[a][i] * x[b][i]);
            out[a][b] = acc[a][b].iter().fold(tail, |s, &v| s + v);
        }
    }
    out
}

// ---- RMSNorm ---------------------------------------------------------------------------

fn rms_norm_forward<T: Real>(x: &Host, weight: &Host, eps: f32) -> (Host, Host) {
    let shape = dims(x).to_vec();
    let dim = shape[1];
    let (xs, w) = (host::<T>(x), host::<T>(weight));
    let mut y = output::<T>(xs.len());
    let mut rstd = output::<T>(shape[0]);
    let eps = T::from_f64(eps as f64);
    y.par_chunks_mut(dim)
        .zip(rstd.par_iter_mut())
        .zip(xs.par_chunks(dim))
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|((y, r), x)| {
            vectorized(
                #[inline(always)]
                || {
                    let inv = (dot(x, x) / T::from_f64(dim as f64) + eps).sqrt().recip();
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w.iter()) {
                        *y = x * inv * w;
                    }
                    *r = inv;
                },
            )
        });
    (tensor(y, &shape), tensor(rstd, &shape[..1]))
}

/// With `r` the row's rstd and `g = dy * weight`: `dx = r * g - x * r^3 * mean(x * g)`,
/// `d_weight = sum over rows of dy * x * r`.
fn rms_norm_backward<T: Real>(x: &Host, weight: &Host, rstd: &Host, dy: &Host) -> (Host, Host) {
    let shape = dims(x).to_vec();
    let dim = shape[1];
    let (xs, w, rs, dys) = (
        host::<T>(x),
        host::<T>(weight),
        host::<T>(rstd),
        host::<T>(dy),
    );
    let mut dx = output::<T>(xs.len());
    // The weight gradient: one partial sum per block of rows, added in order at the end. The
    // blocks do not depend on the number of threads, so neither do the bits of the result.
    let rows_per_task = 64;
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(dim * rows_per_task)
        .enumerate()
        .map(|(task, dx)| {
            vectorized(
                #[inline(always)]
                || {
                    let mut dw = vec![T::zero(); dim];
                    for (i, dx) in dx.chunks_mut(dim).enumerate() {
                        let row = task * rows_per_task + i;
                        let (x, dy, r) =
                            (&xs[row * dim..][..dim], &dys[row * dim..][..dim], rs[row]);
                        let mut xg = T::zero();
                        let mut lanes = [T::zero(); 8];
                        for (c, ((&x, &dy), &w)) in x.iter().zip(dy).zip(w.iter()).enumerate() {
                            lanes[c % 8] += x * dy * w;
                        }
                        for l in lanes {
                            xg += l;
                        }
                        let k = r * r * r * xg / T::from_f64(dim as f64);
                        for ((((dx, &x), &dy), &w), dw) in dx
                            .iter_mut()
                            .zip(x)
                            .zip(dy)
                            .zip(w.iter())
                            .zip(dw.iter_mut())
                        {
                            *dx = r * dy * w - x * k;
                            *dw += dy * x * r;
                        }
                    }
                    dw
                },
            )
        })
        .collect();
    let mut dw = vec![T::zero(); dim];
    for p in partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (tensor(dx, &shape), tensor(dw, &[dim]))
}

// ---- SwiGLU ----------------------------------------------------------------------------

/// Elements whose sigmoid is computed at once (a stack buffer), then used by the plain loops.
const SIGMOID_BLOCK: usize = 256;

fn swiglu_forward<T: Real>(gate: &Host, up: &Host) -> Host {
    let shape = dims(gate).to_vec();
    let (g, u) = (host::<T>(gate), host::<T>(up));
    let mut y = output::<T>(g.len());
    let chunk = 4096;
    y.par_chunks_mut(chunk)
        .zip(g.par_chunks(chunk).zip(u.par_chunks(chunk)))
        .for_each(|(y, (g, u))| {
            vectorized(
                #[inline(always)]
                || {
                    let mut s = [T::zero(); SIGMOID_BLOCK];
                    for ((y, g), u) in y
                        .chunks_mut(SIGMOID_BLOCK)
                        .zip(g.chunks(SIGMOID_BLOCK))
                        .zip(u.chunks(SIGMOID_BLOCK))
                    {
                        let s = &mut s[..g.len()];
                        T::sigmoid_into(s, g);
                        for (((y, &g), &u), &s) in y.iter_mut().zip(g).zip(u).zip(&*s) {
                            *y = g * s * u;
                        }
                    }
                },
            )
        });
    tensor(y, &shape)
}

/// With `s = sigmoid(g)`: `d_up = dy * g * s`, `d_gate = dy * u * s * (1 + g * (1 - s))`.
fn swiglu_backward<T: Real>(gate: &Host, up: &Host, dy: &Host) -> (Host, Host) {
    let shape = dims(gate).to_vec();
    let (g, u, dys) = (host::<T>(gate), host::<T>(up), host::<T>(dy));
    let mut d_gate = output::<T>(g.len());
    let mut d_up = output::<T>(g.len());
    let chunk = 4096;
    d_gate
        .par_chunks_mut(chunk)
        .zip(d_up.par_chunks_mut(chunk))
        .zip(
            g.par_chunks(chunk)
                .zip(u.par_chunks(chunk))
                .zip(dys.par_chunks(chunk)),
        )
        .for_each(|((dg, du), ((g, u), dy))| {
            vectorized(
                #[inline(always)]
                || {
                    let mut s = [T::zero(); SIGMOID_BLOCK];
                    for (((dg, du), (g, u)), dy) in dg
                        .chunks_mut(SIGMOID_BLOCK)
                        .zip(du.chunks_mut(SIGMOID_BLOCK))
                        .zip(g.chunks(SIGMOID_BLOCK).zip(u.chunks(SIGMOID_BLOCK)))
                        .zip(dy.chunks(SIGMOID_BLOCK))
                    {
                        let s = &mut s[..g.len()];
                        T::sigmoid_into(s, g);
                        for (((((dg, du), &g), &u), &dy), &s) in dg
                            .iter_mut()
                            .zip(du.iter_mut())
                            .zip(g)
                            .zip(u)
                            .zip(dy)
                            .zip(&*s)
                        {
                            *du = dy * g * s;
                            *dg = dy * u * s * (T::one() + g * (T::one() - s));
                        }
                    }
                },
            )
        });
    (tensor(d_gate, &shape), tensor(d_up, &shape))
}

// ---- RoPE ------------------------------------------------------------------------------

/// `y = x * cos + rotate_half(x) * sin` per token at its position; `inverse` rotates by the
/// opposite angle (the backward pass).
fn rope<T: Real>(x: &Host, positions: &[i64], cos: &Host, sin: &Host, inverse: bool) -> Host {
    let shape = dims(x).to_vec();
    let (heads, d) = (shape[2], shape[3]);
    let half = d / 2;
    let (xs, cos, sin) = (host::<T>(x), host::<T>(cos), host::<T>(sin));
    let mut y = output::<T>(xs.len());
    let sign = if inverse { -T::one() } else { T::one() };
    y.par_chunks_mut(heads * d)
        .zip(xs.par_chunks(heads * d))
        .zip(positions.par_iter())
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|((y, x), &p)| {
            vectorized(
                #[inline(always)]
                || {
                    let (c, s) = (&cos[p as usize * d..][..d], &sin[p as usize * d..][..d]);
                    for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                        for i in 0..half {
                            y[i] = x[i] * c[i] - sign * x[i + half] * s[i];
                            y[i + half] = x[i + half] * c[i + half] + sign * x[i] * s[i + half];
                        }
                    }
                },
            )
        });
    tensor(y, &shape)
}

// ---- Cross-entropy ---------------------------------------------------------------------

fn cross_entropy_forward<T: Real>(logits: &Host, targets: &[i64]) -> (Host, Host) {
    let shape = dims(logits).to_vec();
    let vocab = shape[1];
    let z = host::<T>(logits);
    let mut loss = output::<T>(shape[0]);
    let mut lse = output::<T>(shape[0]);
    loss.par_iter_mut()
        .zip(lse.par_iter_mut())
        .zip(z.par_chunks(vocab).zip(targets.par_iter()))
        .for_each(|((loss, lse), (z, &target))| {
            *lse = max_and_log_sum_exp(z).1;
            *loss = if target < 0 {
                T::zero()
            } else {
                *lse - z[target as usize]
            };
        });
    (tensor(loss, &shape[..1]), tensor(lse, &shape[..1]))
}

/// `d_logits = d_loss * (softmax(logits) - onehot(target))`; 0 on ignored rows.
fn cross_entropy_backward<T: Real>(
    logits: &Host,
    targets: &[i64],
    lse: &Host,
    d_loss: &Host,
) -> Host {
    let shape = dims(logits).to_vec();
    let vocab = shape[1];
    let (z, lse, dl) = (host::<T>(logits), host::<T>(lse), host::<T>(d_loss));
    let mut dz = output::<T>(z.len());
    dz.par_chunks_mut(vocab)
        .zip(z.par_chunks(vocab))
        .enumerate()
        .for_each(|(row, (dz, z))| {
            vectorized(
                #[inline(always)]
                || {
                    let target = targets[row];
                    if target < 0 {
                        dz.fill(T::zero());
                        return;
                    }
                    T::exp_into(dz, z, lse[row], dl[row]);
                    dz[target as usize] = dz[target as usize] - dl[row];
                },
            )
        });
    tensor(dz, &shape)
}

// ---- Flash attention -------------------------------------------------------------------

/// Sizes and the per-position visibility of one attention call.
struct AttentionShape {
    batch: usize,
    q_len: usize,
    k_len: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    /// `[batch, k_len]`: the first key of each key position's segment; position `p` sees keys
    /// `first[p] ..= p`.
    first: Vec<usize>,
    /// Elements between batch rows of the key and value inputs.
    kv_stride: usize,
}

impl AttentionShape {
    fn new(q: &Host, k: &Host, segments: &[i64], kv_stride: usize) -> Self {
        let [batch, q_len, heads, d] = [dims(q)[0], dims(q)[1], dims(q)[2], dims(q)[3]];
        let [k_len, kv_heads] = [dims(k)[1], dims(k)[2]];
        let mut first = vec![0; batch * k_len];
        for b in 0..batch {
            let seg = &segments[b * k_len..][..k_len];
            for j in 1..k_len {
                first[b * k_len + j] = if seg[j] == seg[j - 1] {
                    first[b * k_len + j - 1]
                } else {
                    j
                };
            }
        }
        Self {
            batch,
            q_len,
            k_len,
            heads,
            kv_heads,
            d,
            first,
            kv_stride,
        }
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The keys query `i` of row `b` sees: `first ..= p` as a half-open range.
    fn visible(&self, b: usize, i: usize) -> (usize, usize) {
        let p = self.k_len - self.q_len + i;
        (self.first[b * self.k_len + p], p + 1)
    }

    fn q_at(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.q_len + i) * self.heads + h) * self.d
    }

    /// Where key/value row `j` of KV head `g` starts in the inputs (batch rows `kv_stride` apart).
    fn kv_at(&self, b: usize, j: usize, g: usize) -> usize {
        b * self.kv_stride + (j * self.kv_heads + g) * self.d
    }

    /// Where it starts in a contiguous `[batch, k_len, kv_heads, d]` output (dk, dv).
    fn k_at(&self, b: usize, j: usize, g: usize) -> usize {
        ((b * self.k_len + j) * self.kv_heads + g) * self.d
    }
}

/// A key tile transposed, `[d][BLOCK_KEYS]` (zero past the last key), so that one query's
/// scores over the tile are `d` multiply-adds of 64-wide rows.
#[allow(clippy::too_many_arguments)]
fn transpose_tile<T: Real>(
    src: &[T],
    shape: &AttentionShape,
    b: usize,
    g: usize,
    k0: usize,
    n: usize,
    tile: &mut [T],
    values: Option<&[T]>,
) {
    tile.fill(T::zero());
    for j in 0..n {
        let at = shape.kv_at(b, k0 + j, g);
        // The KV cache is read from memory once per decoding step, a key row of 256 bytes
        // every 768 (other heads between): ask for the rows eight keys ahead, and for this
        // key's value row, which the weighted sum reads next.
        if j + 8 < n {
            prefetch_row(&src[shape.kv_at(b, k0 + j + 8, g)..][..shape.d]);
        }
        if let Some(values) = values {
            prefetch_row(&values[at..][..shape.d]);
        }
        let row = &src[at..][..shape.d];
        for (c, &v) in row.iter().enumerate() {
            tile[c * BLOCK_KEYS + j] = v;
        }
    }
}

/// Asks the cache for every line of `row` (a hint; never faults).
#[inline(always)]
fn prefetch_row<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let bytes = std::mem::size_of_val(row);
        let start = row.as_ptr().cast::<i8>();
        for offset in (0..bytes).step_by(64) {
            // SAFETY: the address lies within `row`; prefetching has no other effect.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// `out += sum over t of weights[t] * base[first + t * stride ..][..out.len()]`: a weighted sum
/// of evenly spaced rows, accumulated 32 columns at a time in registers (four AVX2 vectors of
/// f32) instead of loading and storing `out` once per row.
#[inline(always)]
fn add_rows<T: Real>(out: &mut [T], base: &[T], first: usize, stride: usize, weights: &[T]) {
    const CHUNK: usize = 32;
    let d = out.len();
    let mut c0 = 0;
    while c0 + CHUNK <= d {
        let mut acc = [T::zero(); CHUNK];
        acc.copy_from_slice(&out[c0..c0 + CHUNK]);
        for (t, &w) in weights.iter().enumerate() {
            let src = &base[first + t * stride + c0..][..CHUNK];
            for l in 0..CHUNK {
                acc[l] += w * src[l];
            }
        }
        out[c0..c0 + CHUNK].copy_from_slice(&acc);
        c0 += CHUNK;
    }
    if c0 < d {
        for (t, &w) in weights.iter().enumerate() {
            let at = first + t * stride;
            axpy(&mut out[c0..], w, &base[at + c0..at + d]);
        }
    }
}

/// `scores[j] = sum_c q[c] * tile[c][j]` for the 64 keys of a transposed tile.
#[inline(always)]
fn tile_scores<T: Real>(q: &[T], tile: &[T], scores: &mut [T; BLOCK_KEYS]) {
    *scores = [T::zero(); BLOCK_KEYS];
    for (c, &qc) in q.iter().enumerate() {
        let col = &tile[c * BLOCK_KEYS..][..BLOCK_KEYS];
        for j in 0..BLOCK_KEYS {
            scores[j] += qc * col[j];
        }
    }
}

/// Output and row log-sum-exp (of the scaled scores) of one task's queries.
struct ForwardBlock<T> {
    b: usize,
    g: usize,
    i0: usize,
    rows: usize,
    out: Vec<T>,
    lse: Vec<T>,
}

fn attention_forward<T: Real>(
    q: &Host,
    k: &Host,
    v: &Host,
    segments: &[i64],
    scale: f32,
) -> (Host, Host) {
    let (ks, vs, kv_stride) = keys_and_values::<T>(k, v);
    let shape = AttentionShape::new(q, k, segments, kv_stride);
    let qs = host::<T>(q);
    let (group, d) = (shape.group(), shape.d);
    let scale = T::from_f64(scale as f64);
    let blocks = shape.q_len.div_ceil(BLOCK_QUERIES);
    let tasks: Vec<(usize, usize, usize)> = (0..shape.batch)
        .flat_map(|b| (0..shape.kv_heads).flat_map(move |g| (0..blocks).map(move |qb| (b, g, qb))))
        .collect();
    let results: Vec<ForwardBlock<T>> = tasks
        .into_par_iter()
        .map(|(b, g, qb)| {
            vectorized(
                #[inline(always)]
                || {
                    let i0 = qb * BLOCK_QUERIES;
                    let rows = BLOCK_QUERIES.min(shape.q_len - i0);
                    let n_rows = group * rows;
                    // Row r * rows + i: query head g * group + r, query i0 + i, pre-scaled.
                    let mut qbuf = vec![T::zero(); n_rows * d];
                    for r in 0..group {
                        for i in 0..rows {
                            let src = &qs[shape.q_at(b, i0 + i, g * group + r)..][..d];
                            for (dst, &s) in qbuf[(r * rows + i) * d..][..d].iter_mut().zip(src) {
                                *dst = s * scale;
                            }
                        }
                    }
                    let mut out = vec![T::zero(); n_rows * d];
                    let mut max = vec![T::neg_infinity(); n_rows];
                    let mut sum = vec![T::zero(); n_rows];
                    let lo = (0..rows)
                        .map(|i| shape.visible(b, i0 + i).0)
                        .min()
                        .unwrap_or(0);
                    let hi = shape.visible(b, i0 + rows - 1).1;
                    let mut tile = vec![T::zero(); d * BLOCK_KEYS];
                    let mut scores = [T::zero(); BLOCK_KEYS];
                    let kv_row = shape.kv_heads * d;
                    for k0 in (lo..hi).step_by(BLOCK_KEYS) {
                        let n = BLOCK_KEYS.min(hi - k0);
                        transpose_tile(&ks, &shape, b, g, k0, n, &mut tile, Some(&vs));
                        for i in 0..rows {
                            let (first, end) = shape.visible(b, i0 + i);
                            let (j_lo, j_hi) =
                                (first.max(k0) - k0, end.min(k0 + n).saturating_sub(k0));
                            if j_lo >= j_hi {
                                continue;
                            }
                            for r in 0..group {
                                let row = r * rows + i;
                                tile_scores(&qbuf[row * d..][..d], &tile, &mut scores);
                                let m = scores[j_lo..j_hi].iter().fold(max[row], |m, &s| m.max(s));
                                let correction = (max[row] - m).exp_fast();
                                let o = &mut out[row * d..][..d];
                                if correction != T::one() {
                                    o.iter_mut().for_each(|o| *o *= correction);
                                }
                                let s = sum[row] * correction
                                    + T::exp_in_place(&mut scores[j_lo..j_hi], T::one(), m);
                                let first = shape.kv_at(b, k0 + j_lo, g);
                                add_rows(o, &vs, first, kv_row, &scores[j_lo..j_hi]);
                                sum[row] = s;
                                max[row] = m;
                            }
                        }
                    }
                    let mut lse = vec![T::zero(); n_rows];
                    for row in 0..n_rows {
                        let inv = sum[row].recip();
                        out[row * d..][..d].iter_mut().for_each(|o| *o *= inv);
                        lse[row] = max[row] + sum[row].ln();
                    }
                    ForwardBlock {
                        b,
                        g,
                        i0,
                        rows,
                        out,
                        lse,
                    }
                },
            )
        })
        .collect();
    let mut out = output::<T>(qs.len());
    let mut lse = output::<T>(shape.batch * shape.heads * shape.q_len);
    for blk in results {
        for r in 0..group {
            let h = blk.g * group + r;
            for i in 0..blk.rows {
                let row = r * blk.rows + i;
                out[shape.q_at(blk.b, blk.i0 + i, h)..][..d]
                    .copy_from_slice(&blk.out[row * d..][..d]);
                lse[(blk.b * shape.heads + h) * shape.q_len + blk.i0 + i] = blk.lse[row];
            }
        }
    }
    let lse_shape = [shape.batch, shape.heads, shape.q_len];
    (tensor(out, dims(q)), tensor(lse, &lse_shape))
}

/// Gradients of one (batch row, KV head): dq of its query heads, dk and dv of its keys.
struct BackwardBlock<T> {
    b: usize,
    g: usize,
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

/// One task per (batch row, KV head), which owns every gradient it writes: the dq rows of its
/// query heads and the dk/dv rows of its KV head. Per key tile and query, scores and
/// probabilities are recomputed from the saved log-sum-exp (FlashAttention-2's backward):
/// `p = exp(scale q.k - lse)`, `dv += p do`, `dp = do.v`, `ds = p (dp - sum(do * out))`,
/// `dq += scale ds k`, `dk += scale ds q`.
#[allow(clippy::too_many_arguments)]
fn attention_backward<T: Real>(
    q: &Host,
    k: &Host,
    v: &Host,
    out: &Host,
    lse: &Host,
    d_out: &Host,
    segments: &[i64],
    scale: f32,
) -> (Host, Host, Host) {
    let (ks, vs, kv_stride) = keys_and_values::<T>(k, v);
    let shape = AttentionShape::new(q, k, segments, kv_stride);
    let qs = host::<T>(q);
    let (os, lses, dos) = (host::<T>(out), host::<T>(lse), host::<T>(d_out));
    let (group, d, tq, tk) = (shape.group(), shape.d, shape.q_len, shape.k_len);
    let scale = T::from_f64(scale as f64);
    let tasks: Vec<(usize, usize)> = (0..shape.batch)
        .flat_map(|b| (0..shape.kv_heads).map(move |g| (b, g)))
        .collect();
    let results: Vec<BackwardBlock<T>> = tasks
        .into_par_iter()
        .map(|(b, g)| {
            vectorized(
                #[inline(always)]
                || {
                    let mut dq = vec![T::zero(); group * tq * d];
                    let mut dk = vec![T::zero(); tk * d];
                    let mut dv = vec![T::zero(); tk * d];
                    // sum(do * out) per query row of each head.
                    let delta: Vec<T> = (0..group)
                        .flat_map(|r| (0..tq).map(move |i| (r, i)))
                        .map(|(r, i)| {
                            let at = shape.q_at(b, i, g * group + r);
                            dot(&dos[at..][..d], &os[at..][..d])
                        })
                        .collect();
                    let mut k_tile = vec![T::zero(); d * BLOCK_KEYS];
                    let mut v_tile = vec![T::zero(); d * BLOCK_KEYS];
                    let mut scores = [T::zero(); BLOCK_KEYS];
                    let mut dp = [T::zero(); BLOCK_KEYS];
                    // One block of queries' probabilities and score gradients for the tile,
                    // [BLOCK_QUERIES][BLOCK_KEYS], so that dk and dv rows accumulate over the
                    // block's queries in registers.
                    let mut p_blk = [T::zero(); BLOCK_QUERIES * BLOCK_KEYS];
                    let mut ds_blk = [T::zero(); BLOCK_QUERIES * BLOCK_KEYS];
                    let (kv_row, q_row) = (shape.kv_heads * d, shape.heads * d);
                    let mut column = [T::zero(); BLOCK_QUERIES];
                    let offset = tk - tq;
                    for k0 in (0..tk).step_by(BLOCK_KEYS) {
                        let n = BLOCK_KEYS.min(tk - k0);
                        // Queries at positions before the tile see none of it.
                        let i_start = k0.saturating_sub(offset);
                        if i_start >= tq {
                            break;
                        }
                        transpose_tile(&ks, &shape, b, g, k0, n, &mut k_tile, None);
                        transpose_tile(&vs, &shape, b, g, k0, n, &mut v_tile, None);
                        for r in 0..group {
                            let h = g * group + r;
                            for i0 in (i_start..tq).step_by(BLOCK_QUERIES) {
                                let block = BLOCK_QUERIES.min(tq - i0);
                                for ii in 0..block {
                                    let i = i0 + ii;
                                    let p_row = &mut p_blk[ii * BLOCK_KEYS..][..BLOCK_KEYS];
                                    let ds_row = &mut ds_blk[ii * BLOCK_KEYS..][..BLOCK_KEYS];
                                    p_row.fill(T::zero());
                                    ds_row.fill(T::zero());
                                    let (first, end) = shape.visible(b, i);
                                    let (j_lo, j_hi) =
                                        (first.max(k0) - k0, end.min(k0 + n).saturating_sub(k0));
                                    if j_lo >= j_hi {
                                        continue;
                                    }
                                    let at = shape.q_at(b, i, h);
                                    tile_scores(&qs[at..][..d], &k_tile, &mut scores);
                                    tile_scores(&dos[at..][..d], &v_tile, &mut dp);
                                    let lse_row = lses[(b * shape.heads + h) * tq + i];
                                    let delta_row = delta[r * tq + i];
                                    let p = &mut p_row[j_lo..j_hi];
                                    p.copy_from_slice(&scores[j_lo..j_hi]);
                                    T::exp_in_place(p, scale, lse_row);
                                    for ((ds, &p), &dp) in
                                        ds_row[j_lo..j_hi].iter_mut().zip(&*p).zip(&dp[j_lo..j_hi])
                                    {
                                        *ds = p * (dp - delta_row) * scale;
                                    }
                                    add_rows(
                                        &mut dq[(r * tq + i) * d..][..d],
                                        &ks,
                                        shape.kv_at(b, k0 + j_lo, g),
                                        kv_row,
                                        &ds_row[j_lo..j_hi],
                                    );
                                }
                                let first = shape.q_at(b, i0, h);
                                for j in 0..n {
                                    let key = (k0 + j) * d;
                                    let column = &mut column[..block];
                                    for (ii, c) in column.iter_mut().enumerate() {
                                        *c = p_blk[ii * BLOCK_KEYS + j];
                                    }
                                    add_rows(&mut dv[key..][..d], &dos, first, q_row, column);
                                    for (ii, c) in column.iter_mut().enumerate() {
                                        *c = ds_blk[ii * BLOCK_KEYS + j];
                                    }
                                    add_rows(&mut dk[key..][..d], &qs, first, q_row, column);
                                }
                            }
                        }
                    }
                    BackwardBlock { b, g, dq, dk, dv }
                },
            )
        })
        .collect();
    let mut dq = output::<T>(qs.len());
    let mut dk = output::<T>(shape.batch * tk * shape.kv_heads * d);
    let mut dv = output::<T>(shape.batch * tk * shape.kv_heads * d);
    for blk in results {
        for r in 0..group {
            for i in 0..tq {
                dq[shape.q_at(blk.b, i, blk.g * group + r)..][..d]
                    .copy_from_slice(&blk.dq[(r * tq + i) * d..][..d]);
            }
        }
        for j in 0..tk {
            let at = shape.k_at(blk.b, j, blk.g);
            dk[at..][..d].copy_from_slice(&blk.dk[j * d..][..d]);
            dv[at..][..d].copy_from_slice(&blk.dv[j * d..][..d]);
        }
    }
    (
        tensor(dq, dims(q)),
        tensor(dk, dims(k)),
        tensor(dv, dims(v)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The polynomial exp against f64's, over the range softmax and SiLU feed it.
    /// Tolerance: 4e-7 relative (f32's epsilon is 1.2e-7).
    #[test]
    fn exp_f32_matches_f64_exp() {
        let seed: u64 = rand::rng().random();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for _ in 0..200_000 {
            let x: f32 = rng.random_range(-87.0..88.0);
            let want = (x as f64).exp();
            let got = vectorized(
                #[inline(always)]
                || exp_f32(x),
            ) as f64;
            assert!(
                ((got - want) / want).abs() < 4e-7,
                "seed {seed}: exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(100.0).is_infinite());
        assert!(exp_f32(f32::NAN).is_nan());
    }

    /// The slice forms of exp (AVX2 intrinsics where the CPU has them) against f64 loops, on
    /// fresh random inputs of odd lengths (the 8-lane body and the scalar tail) and on the
    /// range's edges. Tolerance, relative: 4e-7 (the polynomial) plus 2.5e-7 * |argument| (the
    /// argument `x * scale - shift` rounded to f32 up to twice, which exp turns into a relative
    /// error of |argument| times the rounding); sums add 1e-6.
    #[test]
    fn slice_exps_match_f64() {
        let seed: u64 = rand::rng().random();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let close = |got: f32, want: f64, arg: f64, what: &str| {
            let ok = if want.is_nan() {
                got.is_nan()
            } else if want == 0.0 {
                got == 0.0
            } else if want.abs() > f32::MAX as f64 {
                got as f64 == want.signum() * f64::INFINITY
            } else {
                let tol = (4e-7 + 2.5e-7 * arg.abs()) * want.abs() + 1e-37;
                (got as f64 - want).abs() <= tol
            };
            assert!(ok, "seed {seed}: {what}: got {got}, want {want}");
        };
        for len in [0usize, 1, 7, 8, 9, 31, 64, 333] {
            let mut x: Vec<f32> = (0..len).map(|_| rng.random_range(-30.0..30.0)).collect();
            if len >= 9 {
                x[..6].copy_from_slice(&[-100.0, 100.0, f32::NEG_INFINITY, 0.0, -87.0, 88.0]);
            }
            let (scale, shift) = (rng.random_range(0.1f32..2.0), rng.random_range(-5f32..5.0));
            let args: Vec<f64> = x
                .iter()
                .map(|&v| v as f64 * scale as f64 - shift as f64)
                .collect();
            let mut got = x.clone();
            let sum = vectorized(
                #[inline(always)]
                || f32::exp_in_place(&mut got, scale, shift),
            );
            // The kernels' contract (`exp_f32`): infinity above EXP_HIGH, although exp stays
            // finite up to 88.72; within 1e-4 of it the argument's f32 rounding decides.
            let contract_exp = |a: f64| match a - EXP_HIGH as f64 {
                d if d.abs() <= 1e-4 => None,
                d if d > 0.0 => Some(f64::INFINITY),
                _ => Some(a.exp()),
            };
            for (&g, &a) in got.iter().zip(&args) {
                if let Some(want) = contract_exp(a) {
                    close(g, want, a, "exp_in_place");
                }
            }
            let largest = args.iter().fold(0f64, |m, a| m.max(a.abs()).min(100.0));
            let want: Option<f64> = args.iter().map(|&a| contract_exp(a)).sum();
            if let Some(want) = want {
                close(sum, want, largest + 4.0, "exp_in_place's sum");
            }

            let finite: Vec<f32> = x.iter().map(|v| v.clamp(-80.0, 80.0)).collect();
            let want: f64 = finite
                .iter()
                .map(|&v| (v as f64 - shift as f64).exp())
                .sum();
            close(f32::sum_exp(&finite, shift), want, 89.0, "sum_exp");

            let factor = rng.random_range(-2f32..2.0);
            let mut out = vec![f32::NAN; len];
            f32::exp_into(&mut out, &finite, shift, factor);
            for (&g, &v) in out.iter().zip(&finite) {
                let a = v as f64 - shift as f64;
                close(g, factor as f64 * a.exp(), a, "exp_into");
            }

            let mut out = vec![f32::NAN; len];
            f32::sigmoid_into(&mut out, &finite);
            for (&g, &v) in out.iter().zip(&finite) {
                close(
                    g,
                    1.0 / (1.0 + (-(v as f64)).exp()),
                    v as f64,
                    "sigmoid_into",
                );
            }
        }
        let mut nan = [f32::NAN; 9];
        f32::exp_in_place(&mut nan, 1.0, 0.0);
        assert!(
            nan.iter().all(|v| v.is_nan()),
            "exp(NaN) stays NaN: {nan:?}"
        );
    }

    /// Every implementation of the few-row linear layer's 4x2 block this CPU can run (the
    /// portable one, AVX2, AVX-512) against f64 sums, on fresh random rows of lengths that
    /// leave 8- and 16-lane tails, with and without a prefetch window. Tolerance: 1e-5 of the
    /// sum of |w x| (f32 sums of up to 600 products in a different order).
    #[test]
    fn dot_4x2_matches_f64_on_every_instruction_set() {
        let seed: u64 = rand::rng().random();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        type Block = fn(&[&[f32]; 4], &[&[f32]; 2], &[f32]) -> [[f32; 2]; 4];
        let mut kernels: Vec<(&str, Block)> = vec![("portable", |w, x, _| dot_4x2(*w, *x))];
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                // SAFETY: AVX2 and FMA are there.
                kernels.push(("avx2", |w, x, a| unsafe { avx2::dot_4x2(*w, *x, a) }));
            }
            if has_avx512() {
                // SAFETY: AVX-512F is there.
                kernels.push(("avx512", |w, x, a| unsafe { avx512::dot_4x2(*w, *x, a) }));
            }
        }
        for k in [1usize, 7, 8, 15, 16, 17, 40, 576, 601] {
            let row = |rng: &mut rand_chacha::ChaCha8Rng| -> Vec<f32> {
                (0..k).map(|_| rng.random_range(-2.0..2.0)).collect()
            };
            let w: Vec<Vec<f32>> = (0..4).map(|_| row(&mut rng)).collect();
            let x: Vec<Vec<f32>> = (0..2).map(|_| row(&mut rng)).collect();
            let ahead = row(&mut rng);
            let (wr, xr) = ([0, 1, 2, 3].map(|a| &w[a][..]), [&x[0][..], &x[1][..]]);
            for (name, kernel) in &kernels {
                for window in [&ahead[..0], &ahead[..]] {
                    let got = kernel(&wr, &xr, window);
                    for a in 0..4 {
                        for b in 0..2 {
                            let products =
                                w[a].iter().zip(&x[b]).map(|(&p, &q)| p as f64 * q as f64);
                            let want: f64 = products.clone().sum();
                            let scale: f64 = products.map(f64::abs).sum();
                            assert!(
                                (got[a][b] as f64 - want).abs() <= 1e-5 * scale + 1e-30,
                                "seed {seed}: {name}, k {k}, w{a}·x{b}: {} against {want}",
                                got[a][b]
                            );
                        }
                    }
                }
            }
        }
    }
}
