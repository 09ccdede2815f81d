// Cross-entropy forward, one workgroup per row of logits [rows, V]:
//   loss = logsumexp(logits) - logits[target], or 0 where target < 0 (ignored).
// Two passes over the row (max, then sum of exp), each reduced in workgroup memory. The
// log-sum-exp is saved for the backward pass, so the softmax is never stored.

const WG: u32 = 64u;
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read_write> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> loss: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
// rows, V
@group(0) @binding(4) var<storage, read_write> params: array<u32>;

var<workgroup> maxes: array<f32, WG>;
// Sizes pass through workgroup memory to become uniform values (they bound barriers).
var<workgroup> shared_params: array<u32, 2>;
var<workgroup> sums: array<f32, WG>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (lid == 0u) {
        for (var t = 0u; t < 2u; t++) {
            shared_params[t] = params[t];
        }
    }
    let p = workgroupUniformLoad(&shared_params);
    let rows = p[0];
    let vocab = p[1];
    let row = wg.y * nwg.x + wg.x;
    if (row >= rows) {
        return;
    }
    let base = row * vocab;
    // Pass 1: the row max (no exp); pass 2: the sum of exp against it. Reading the row twice
    // (from cache) is cheaper than an online max, which takes an exp on both sides of a
    // divergent branch.
    var m = NEG;
    for (var i = lid; i < vocab; i += WG) {
        m = max(m, logits[base + i]);
    }
    maxes[lid] = m;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            maxes[lid] = max(maxes[lid], maxes[lid + stride]);
        }
        workgroupBarrier();
    }
    let row_max = maxes[0];
    var s = 0.0;
    for (var i = lid; i < vocab; i += WG) {
        s = s + exp(logits[base + i] - row_max);
    }
    sums[lid] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            sums[lid] = sums[lid] + sums[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let row_lse = row_max + log(sums[0]);
        lse[row] = row_lse;
        let t = targets[row];
        var l = 0.0;
        if (t >= 0) {
            l = row_lse - logits[base + u32(t)];
        }
        loss[row] = l;
    }
}
