// Cross-entropy forward, one workgroup per row of logits [rows, V]:
//   loss = logsumexp(logits) - logits[target], or 0 where target < 0 (ignored).
// One pass over the row: each invocation keeps a running (max, sum of exp) over its strided
// elements; the pairs are merged in workgroup memory. The log-sum-exp is saved for the
// backward pass, so the softmax is never stored.

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
    var m = NEG;
    var s = 0.0;
    for (var i = lid; i < vocab; i += WG) {
        let z = logits[base + i];
        if (z > m) {
            s = s * exp(m - z) + 1.0;
            m = z;
        } else {
            s = s + exp(z - m);
        }
    }
    maxes[lid] = m;
    sums[lid] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            let m1 = maxes[lid];
            let m2 = maxes[lid + stride];
            let mm = max(m1, m2);
            sums[lid] = sums[lid] * exp(m1 - mm) + sums[lid + stride] * exp(m2 - mm);
            maxes[lid] = mm;
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let row_lse = maxes[0] + log(sums[0]);
        lse[row] = row_lse;
        let t = targets[row];
        var l = 0.0;
        if (t >= 0) {
            l = row_lse - logits[base + u32(t)];
        }
        loss[row] = l;
    }
}
