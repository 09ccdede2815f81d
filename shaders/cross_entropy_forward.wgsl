// Cross-entropy forward over rows of logits [rows, V]:
//   loss = logsumexp(logits) - logits[target], or 0 where target < 0 (ignored).
// Two passes over the row (max, then sum of exp); the log-sum-exp is saved for the backward
// pass, so the softmax is never stored. Rows are read as vec4 (V is a multiple of 4;
// kernels::cross_entropy uses the reference otherwise). TPR invocations share a row, as in
// rms_norm_forward.wgsl: the whole workgroup on GPUs, one invocation on CPU adapters.

const TPR: u32 = {{ threads_per_row }}u;
const WG: u32 = 64u;
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read_write> logits: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> loss: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
// rows, V
@group(0) @binding(4) var<storage, read_write> params: array<u32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rows = params[0];
    let v4 = params[1] / 4u;
    let row = (wg.y * nwg.x + wg.x) * (WG / TPR) + lid / TPR;
    let lane = lid % TPR;
    let in_range = row < rows;
    let base = row * v4;
    // Pass 1: the row max (no exp); pass 2: the sum of exp against it. Reading the row twice
    // (from cache) is cheaper than an online max, which takes an exp on both sides of a
    // divergent branch.
    var m = vec4<f32>(NEG);
    if (in_range) {
        for (var i = lane; i < v4; i += TPR) {
            m = max(m, logits[base + i]);
        }
    }
    var row_max = max(max(m.x, m.y), max(m.z, m.w));
    if (TPR > 1u) {
        partial[lid] = row_max;
        workgroupBarrier();
        for (var stride = TPR / 2u; stride > 0u; stride = stride / 2u) {
            if (lane < stride) {
                partial[lid] = max(partial[lid], partial[lid + stride]);
            }
            workgroupBarrier();
        }
        row_max = partial[lid - lane];
        // Everyone has read the max before the sums overwrite it.
        workgroupBarrier();
    }
    var s = vec4<f32>(0.0);
    if (in_range) {
        for (var i = lane; i < v4; i += TPR) {
            s = s + exp(logits[base + i] - row_max);
        }
    }
    var sum = s.x + s.y + s.z + s.w;
    if (TPR > 1u) {
        partial[lid] = sum;
        workgroupBarrier();
        for (var stride = TPR / 2u; stride > 0u; stride = stride / 2u) {
            if (lane < stride) {
                partial[lid] = partial[lid] + partial[lid + stride];
            }
            workgroupBarrier();
        }
        sum = partial[lid - lane];
    }
    if (!in_range || lane != 0u) {
        return;
    }
    let row_lse = row_max + log(sum);
    lse[row] = row_lse;
    let t = targets[row];
    var l = 0.0;
    if (t >= 0) {
        let ti = u32(t);
        l = row_lse - logits[base + ti / 4u][ti % 4u];
    }
    loss[row] = l;
}
