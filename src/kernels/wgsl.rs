//! Launches of the WGSL kernels in `shaders/` on burn's wgpu runtime: the `CubeBackend`
//! implementation of [`KilnKernels`].
//!
//! Every launch makes its inputs contiguous (except decoding's K and V, read where the KV cache
//! holds them), allocates fresh outputs, and passes its sizes in a small `params` buffer of u32
//! (floats bit-cast). Template placeholders (`{{ head_dim }}`, ...)
//! are compile-time constants of the shader; each distinct value is its own pipeline.

use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::wgpu::{
    CubeBackend, CubeDim, CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous,
};
use burn::cubecl::prelude::{CubeCount, ExecutionMode, KernelId};
use burn::cubecl::server::KernelArguments;
use burn::tensor::{DType, Shape};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::extension::KilnKernels;

/// Every shader of kiln, by file name, for launching and for validation with naga.
pub const SHADERS: &[(&str, &str)] = &[
    (
        "flash_attention_forward",
        include_str!("../../shaders/flash_attention_forward.wgsl"),
    ),
    (
        "flash_attention_decode",
        include_str!("../../shaders/flash_attention_decode.wgsl"),
    ),
    (
        "flash_attention_backward_dq",
        include_str!("../../shaders/flash_attention_backward_dq.wgsl"),
    ),
    (
        "flash_attention_backward_dkv",
        include_str!("../../shaders/flash_attention_backward_dkv.wgsl"),
    ),
    (
        "rms_norm_forward",
        include_str!("../../shaders/rms_norm_forward.wgsl"),
    ),
    (
        "rms_norm_backward",
        include_str!("../../shaders/rms_norm_backward.wgsl"),
    ),
    (
        "rms_norm_backward_weight",
        include_str!("../../shaders/rms_norm_backward_weight.wgsl"),
    ),
    ("rope", include_str!("../../shaders/rope.wgsl")),
    (
        "swiglu_forward",
        include_str!("../../shaders/swiglu_forward.wgsl"),
    ),
    (
        "swiglu_backward",
        include_str!("../../shaders/swiglu_backward.wgsl"),
    ),
    (
        "cross_entropy_forward",
        include_str!("../../shaders/cross_entropy_forward.wgsl"),
    ),
    (
        "cross_entropy_backward",
        include_str!("../../shaders/cross_entropy_backward.wgsl"),
    ),
];

/// Head dimensions the shaders are validated for in tests. Any multiple of 8 up to
/// [`MAX_HEAD_DIM`] works (it is a template constant); these are the common ones.
pub const ATTENTION_HEAD_DIMS: &[usize] = &[32, 64, 128];

/// Largest head dimension: a query row, its output accumulator and a tile row of keys and
/// values live in registers and workgroup memory.
pub const MAX_HEAD_DIM: usize = 256;

/// Keys (or queries) per tile staged in workgroup memory: two tiles of `block * head_dim`
/// floats stay within WebGPU's guaranteed 16 KiB of workgroup storage.
pub fn attention_block(head_dim: usize) -> usize {
    // Even: the kernels take two rows per step.
    ((2048 / head_dim).min(64) / 2 * 2).max(2)
}

/// Up to this many queries per row, attention runs `flash_attention_decode` (a workgroup per
/// query, splitting the keys) instead of `flash_attention_forward` (an invocation per query).
pub const DECODE_MAX_QUERIES: usize = 8;

/// Rows summed by one invocation of `rms_norm_backward_weight`.
const RMS_WEIGHT_ROWS: usize = 256;

/// Invocations that share a row in the row kernels (RMSNorm, cross-entropy), each a value
/// the tests validate and run: a whole workgroup on GPUs, one invocation on CPU adapters.
pub const THREADS_PER_ROW: &[usize] = &[64, 1];

/// 0: choose by adapter; otherwise the forced value (tests run both on lavapipe).
static FORCED_THREADS_PER_ROW: AtomicUsize = AtomicUsize::new(0);

/// Tests: run the row kernels with `threads` invocations per row whatever the adapter, so the
/// GPU layout is checked on lavapipe too; `None` restores the choice by adapter.
pub fn force_threads_per_row(threads: Option<usize>) {
    if let Some(t) = threads {
        assert!(
            THREADS_PER_ROW.contains(&t),
            "threads per row must be one of {THREADS_PER_ROW:?}"
        );
    }
    FORCED_THREADS_PER_ROW.store(threads.unwrap_or(0), Ordering::Relaxed);
}

/// Invocations per row for the row kernels on `client`'s adapter. On a CPU adapter (lavapipe,
/// which reports no physical card) a workgroup's invocations run as loops over SIMD lanes and
/// every barrier is a context switch, so one invocation per row with no barrier is fastest
/// (RMSNorm forward at 2048x256: 1.5 ms against 7.3 ms); on a GPU a workgroup
/// shares the row and reduces it in workgroup memory.
fn threads_per_row(client: &burn::cubecl::client::Client) -> usize {
    match FORCED_THREADS_PER_ROW.load(Ordering::Relaxed) {
        0 if client.properties().identity.physical.is_none() => 1,
        0 => 64,
        forced => forced,
    }
}

/// A row kernel (RMSNorm, cross-entropy) over `rows` rows, compiled for the invocations per
/// row of `client`'s adapter, with the workgroups that cover the rows.
fn row_kernel(
    name: &str,
    rows: usize,
    client: &burn::cubecl::client::Client,
) -> (WgslKernel, CubeCount) {
    let threads = threads_per_row(client);
    (
        wgsl_kernel(name, 0, threads),
        grid(rows.div_ceil(64 / threads)),
    )
}

/// The template values a shader is compiled with.
fn shader_defines(
    name: &str,
    head_dim: usize,
    threads_per_row: usize,
) -> Vec<(&'static str, usize)> {
    match name {
        n if n.starts_with("flash_attention") => vec![
            ("head_dim", head_dim),
            ("block_keys", attention_block(head_dim)),
        ],
        "rms_norm_backward_weight" => vec![("rows_per_chunk", RMS_WEIGHT_ROWS)],
        "rms_norm_forward"
        | "rms_norm_backward"
        | "cross_entropy_forward"
        | "cross_entropy_backward" => vec![("threads_per_row", threads_per_row)],
        _ => Vec::new(),
    }
}

/// The full WGSL text of a shader with its template values filled in (`head_dim` for the
/// attention kernels, `threads_per_row` for the row kernels; others ignore them).
pub fn shader_source(name: &str, head_dim: usize, threads_per_row: usize) -> String {
    wgsl_kernel(name, head_dim, threads_per_row)
        .source()
        .complete()
}

struct WgslKernel {
    name: &'static str,
    source: &'static str,
    defines: Vec<(&'static str, usize)>,
}

fn wgsl_kernel(name: &str, head_dim: usize, threads_per_row: usize) -> WgslKernel {
    let &(name, source) = SHADERS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no shader named {name}"));
    WgslKernel {
        name,
        source,
        defines: shader_defines(name, head_dim, threads_per_row),
    }
}

impl KernelSource for WgslKernel {
    fn source(&self) -> SourceTemplate {
        self.defines
            .iter()
            .fold(SourceTemplate::new(self.source), |t, (k, v)| {
                t.register(*k, v.to_string())
            })
    }

    fn id(&self) -> KernelId {
        // Unchecked: wgpu compiles the shader without naga's forced loop bounding, a 64-bit
        // counter in every loop iteration. Every loop here is bounded by the sizes, and every
        // index is in bounds by construction (tested with poisoned outputs).
        KernelId::new::<Self>()
            .info((self.name, self.defines.clone()))
            .mode(ExecutionMode::Unchecked)
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// Workgroup counts for `groups` workgroups, split over x and y because each dimension is
/// limited to 65535; the shaders rebuild the linear index from `num_workgroups`.
fn grid(groups: usize) -> CubeCount {
    let x = groups.clamp(1, 65535);
    let y = groups.div_ceil(x);
    CubeCount::Static(x as u32, y as u32, 1)
}

fn float_input(t: CubeTensor, what: &str) -> CubeTensor {
    assert_eq!(
        t.dtype,
        DType::F32,
        "{what}: custom kernels take f32 tensors"
    );
    into_contiguous(t)
}

/// The batch stride of K or V if the decode kernel can read it in place: f32 `[b, len, kv, d]`
/// with rows, positions and heads contiguous, starting at its buffer's start, and a batch
/// stride (a multiple of 4) that may be the longer one of the buffer it is a view of. The
/// KV cache hands its keys and values over so; making them contiguous copied the whole cache
/// on every decoding step.
fn cache_input(t: &CubeTensor) -> Option<usize> {
    let (shape, strides) = (t.meta.shape(), t.meta.strides());
    if shape.num_dims() != 4 || t.meta.is_tiled() {
        return None;
    }
    let [_, len, kv, d] = [shape[0], shape[1], shape[2], shape[3]];
    let in_place = t.dtype == DType::F32
        && t.handle.offset_start.unwrap_or(0) == 0
        && strides[3] == 1
        && strides[2] == d
        && strides[1] == kv * d
        && strides[0] >= len * kv * d
        && strides[0].is_multiple_of(4);
    in_place.then_some(strides[0])
}

fn int_input(t: CubeTensor, what: &str) -> CubeTensor {
    assert_eq!(
        t.dtype,
        DType::I32,
        "{what}: custom kernels take i32 indices"
    );
    into_contiguous(t)
}

static POISON_OUTPUTS: AtomicBool = AtomicBool::new(false);

/// Tests: fill every output buffer with NaN before its kernel runs, so an element a kernel
/// fails to write shows up instead of passing with stale memory.
pub fn poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::Relaxed);
}

/// Whether outputs are poisoned (the CPU kernels read it too).
pub(crate) fn poisoning() -> bool {
    POISON_OUTPUTS.load(Ordering::Relaxed)
}

fn empty_like(reference: &CubeTensor, shape: Shape) -> CubeTensor {
    let n = shape.num_elements();
    let handle = if poisoning() {
        reference
            .client
            .create_from_slice(bytemuck::cast_slice(&vec![f32::NAN; n]))
    } else {
        reference.client.empty(n * 4)
    };
    CubeTensor::new_contiguous(
        reference.client.clone(),
        reference.device.clone(),
        shape,
        handle,
        DType::F32,
    )
}

/// Launches `kernel` over `count` workgroups. `buffers` are bound in order, then the `params`
/// buffer.
fn launch(kernel: WgslKernel, count: CubeCount, buffers: &[&CubeTensor], params: &[u32]) {
    let client = &buffers[0].client;
    let params = client.create_from_slice(bytemuck::cast_slice(params));
    let mut bindings: Vec<_> = buffers.iter().map(|t| t.handle.clone().binding()).collect();
    bindings.push(params.binding());
    // The workgroup size is declared in the shader; CubeDim only keys the compilation cache.
    let kernel = SourceKernel::new(kernel, CubeDim::new_1d(64));
    client.launch(
        Box::new(kernel),
        count,
        KernelArguments::new().with_buffers(bindings),
    );
}

fn dims<const D: usize>(t: &CubeTensor, what: &str) -> [usize; D] {
    use burn::backend::TensorMetadata;
    let shape = t.shape();
    assert_eq!(shape.num_dims(), D, "{what}: expected a rank-{D} tensor");
    std::array::from_fn(|i| shape[i])
}

fn check_head_dim(d: usize) {
    assert!(
        supports_head_dim(d),
        "the attention and RoPE kernels take head dims that are multiples of 8 up to {MAX_HEAD_DIM}, got {d}"
    );
}

/// The row and elementwise kernels read vec4s: `kernels::*` send other widths to the reference.
fn check_vec4_rows(width: usize, what: &str) {
    assert!(
        supports_row_width(width),
        "{what}: the custom kernel needs a multiple of 4, got {width}"
    );
}

/// Whether the RMSNorm, SwiGLU and cross-entropy kernels take rows of this width (the last
/// dimension; for SwiGLU any element count divisible by 4 would do).
pub fn supports_row_width(width: usize) -> bool {
    width.is_multiple_of(4)
}

/// Head dimensions the attention and RoPE kernels handle: rows are read as vec4s, and RoPE
/// rotates a vec4 of each half of the row.
pub fn supports_head_dim(d: usize) -> bool {
    d.is_multiple_of(8) && d <= MAX_HEAD_DIM
}

impl KilnKernels for CubeBackend {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: IntTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let q = float_input(q, "attention q");
        let decode = dims::<4>(&q, "attention q")[1] <= DECODE_MAX_QUERIES;
        // Decoding reads K and V where the KV cache holds them (views of longer buffers, see
        // `cache_input`); the forward kernel takes them contiguous.
        let (k, v) = match (decode, cache_input(&k), cache_input(&v)) {
            (true, Some(sk), Some(sv)) if sk == sv => (k, v),
            _ => (float_input(k, "attention k"), float_input(v, "attention v")),
        };
        let segments = int_input(segments, "attention segments");
        let [b, tq, h, d] = dims::<4>(&q, "attention q");
        let [_, tk, kv, _] = dims::<4>(&k, "attention k");
        check_head_dim(d);
        assert!(tq <= tk && h % kv == 0, "attention: bad shapes");
        let kv_batch_stride = k.meta.strides()[0];
        let out = empty_like(&q, Shape::from([b, tq, h, d]));
        let lse = empty_like(&q, Shape::from([b, h, tq]));
        let (kernel, count) = if decode {
            let count = CubeCount::Static(tq as u32, (b * h) as u32, 1);
            (wgsl_kernel("flash_attention_decode", d, 0), count)
        } else {
            let count = CubeCount::Static(tq.div_ceil(64) as u32, (b * h) as u32, 1);
            (wgsl_kernel("flash_attention_forward", d, 0), count)
        };
        launch(
            kernel,
            count,
            &[&q, &k, &v, &segments, &out, &lse],
            &[
                h as u32,
                kv as u32,
                tq as u32,
                tk as u32,
                scale.to_bits(),
                (kv_batch_stride / 4) as u32,
            ],
        );
        (out, lse)
    }

    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        segments: IntTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (q, k, v, out, lse, d_out) = (
            float_input(q, "attention q"),
            float_input(k, "attention k"),
            float_input(v, "attention v"),
            float_input(out, "attention out"),
            float_input(lse, "attention lse"),
            float_input(d_out, "attention grad"),
        );
        let segments = int_input(segments, "attention segments");
        let [b, tq, h, d] = dims::<4>(&q, "attention q");
        let [_, tk, kv, _] = dims::<4>(&k, "attention k");
        check_head_dim(d);
        assert!(tq <= tk && h % kv == 0, "attention: bad shapes");
        let params = [h as u32, kv as u32, tq as u32, tk as u32, scale.to_bits()];
        let dq = empty_like(&q, Shape::from([b, tq, h, d]));
        let delta = empty_like(&q, Shape::from([b, h, tq]));
        launch(
            wgsl_kernel("flash_attention_backward_dq", d, 0),
            CubeCount::Static(tq.div_ceil(64) as u32, (b * h) as u32, 1),
            &[&q, &k, &v, &out, &d_out, &lse, &segments, &dq, &delta],
            &params,
        );
        let dk = empty_like(&k, Shape::from([b, tk, kv, d]));
        let dv = empty_like(&k, Shape::from([b, tk, kv, d]));
        launch(
            wgsl_kernel("flash_attention_backward_dkv", d, 0),
            CubeCount::Static(tk.div_ceil(64) as u32, (b * kv) as u32, 1),
            &[&q, &k, &v, &d_out, &lse, &delta, &segments, &dk, &dv],
            &params,
        );
        (dq, dk, dv)
    }

    fn rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (x, weight) = (
            float_input(x, "rms_norm x"),
            float_input(weight, "rms_norm weight"),
        );
        let [rows, c] = dims::<2>(&x, "rms_norm x");
        check_vec4_rows(c, "rms_norm");
        let (kernel, count) = row_kernel("rms_norm_forward", rows, &x.client);
        let y = empty_like(&x, Shape::from([rows, c]));
        let rstd = empty_like(&x, Shape::from([rows]));
        launch(
            kernel,
            count,
            &[&x, &weight, &y, &rstd],
            &[rows as u32, c as u32, eps.to_bits()],
        );
        (y, rstd)
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (x, weight, rstd, dy) = (
            float_input(x, "rms_norm x"),
            float_input(weight, "rms_norm weight"),
            float_input(rstd, "rms_norm rstd"),
            float_input(dy, "rms_norm grad"),
        );
        let [rows, c] = dims::<2>(&x, "rms_norm x");
        check_vec4_rows(c, "rms_norm");
        let (kernel, count) = row_kernel("rms_norm_backward", rows, &x.client);
        let params = [rows as u32, c as u32];
        let dx = empty_like(&x, Shape::from([rows, c]));
        launch(kernel, count, &[&x, &weight, &rstd, &dy, &dx], &params);
        let chunks = rows.div_ceil(RMS_WEIGHT_ROWS);
        let partial = empty_like(&x, Shape::from([chunks, c]));
        launch(
            wgsl_kernel("rms_norm_backward_weight", 0, 0),
            CubeCount::Static((c / 4).div_ceil(64) as u32, chunks as u32, 1),
            &[&x, &rstd, &dy, &partial],
            &params,
        );
        let dw = if chunks == 1 {
            partial
        } else {
            Self::float_sum_dim(partial, 0)
        };
        (dx, Self::float_reshape(dw, Shape::from([c])))
    }

    fn rope(
        x: FloatTensor<Self>,
        positions: IntTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        let x = float_input(x, "rope x");
        let positions = int_input(positions, "rope positions");
        let (cos, sin) = (float_input(cos, "rope cos"), float_input(sin, "rope sin"));
        let [b, t, h, d] = dims::<4>(&x, "rope x");
        check_head_dim(d);
        let quads = b * t * h * d / 8;
        let y = empty_like(&x, Shape::from([b, t, h, d]));
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        launch(
            wgsl_kernel("rope", 0, 0),
            grid(quads.div_ceil(256)),
            &[&x, &positions, &cos, &sin, &y],
            &[quads as u32, h as u32, d as u32, sign.to_bits()],
        );
        y
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (gate, up) = (
            float_input(gate, "swiglu gate"),
            float_input(up, "swiglu up"),
        );
        use burn::backend::TensorMetadata;
        let shape = gate.shape();
        let n = shape.num_elements();
        check_vec4_rows(n, "swiglu");
        let y = empty_like(&gate, shape);
        launch(
            wgsl_kernel("swiglu_forward", 0, 0),
            grid((n / 4).div_ceil(256)),
            &[&gate, &up, &y],
            &[(n / 4) as u32],
        );
        y
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (gate, up, dy) = (
            float_input(gate, "swiglu gate"),
            float_input(up, "swiglu up"),
            float_input(dy, "swiglu grad"),
        );
        use burn::backend::TensorMetadata;
        let shape = gate.shape();
        let n = shape.num_elements();
        check_vec4_rows(n, "swiglu");
        let d_gate = empty_like(&gate, shape.clone());
        let d_up = empty_like(&gate, shape);
        launch(
            wgsl_kernel("swiglu_backward", 0, 0),
            grid((n / 4).div_ceil(256)),
            &[&gate, &up, &dy, &d_gate, &d_up],
            &[(n / 4) as u32],
        );
        (d_gate, d_up)
    }

    fn cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let logits = float_input(logits, "cross_entropy logits");
        let targets = int_input(targets, "cross_entropy targets");
        let [rows, vocab] = dims::<2>(&logits, "cross_entropy logits");
        check_vec4_rows(vocab, "cross_entropy");
        let (kernel, count) = row_kernel("cross_entropy_forward", rows, &logits.client);
        let loss = empty_like(&logits, Shape::from([rows]));
        let lse = empty_like(&logits, Shape::from([rows]));
        launch(
            kernel,
            count,
            &[&logits, &targets, &loss, &lse],
            &[rows as u32, vocab as u32],
        );
        (loss, lse)
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        d_loss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let logits = float_input(logits, "cross_entropy logits");
        let targets = int_input(targets, "cross_entropy targets");
        let (lse, d_loss) = (
            float_input(lse, "cross_entropy lse"),
            float_input(d_loss, "cross_entropy grad"),
        );
        let [rows, vocab] = dims::<2>(&logits, "cross_entropy logits");
        check_vec4_rows(vocab, "cross_entropy");
        let (kernel, count) = row_kernel("cross_entropy_backward", rows, &logits.client);
        let d_logits = empty_like(&logits, Shape::from([rows, vocab]));
        launch(
            kernel,
            count,
            &[&logits, &targets, &lse, &d_loss, &d_logits],
            &[rows as u32, vocab as u32],
        );
        d_logits
    }
}
