// Cross-entropy backward: d_logits = d_loss[row] * (softmax(logits) - onehot(target)), the
// softmax recomputed from the saved log-sum-exp; ignored rows (target < 0) get zero.
// vec4 rows and TPR invocations per row, as in cross_entropy_forward.wgsl; no barriers.

const TPR: u32 = {{ threads_per_row }}u;
const WG: u32 = 64u;

@group(0) @binding(0) var<storage, read_write> logits: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;
@group(0) @binding(3) var<storage, read_write> d_loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> d_logits: array<vec4<f32>>;
// rows, V
@group(0) @binding(5) var<storage, read_write> params: array<u32>;

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
    if (row >= rows) {
        return;
    }
    let base = row * v4;
    let t = targets[row];
    if (t < 0) {
        for (var i = lane; i < v4; i += TPR) {
            d_logits[base + i] = vec4<f32>(0.0);
        }
        return;
    }
    let g = d_loss[row];
    let row_lse = lse[row];
    let ti = u32(t);
    for (var i = lane; i < v4; i += TPR) {
        var d = g * exp(logits[base + i] - row_lse);
        // The target's -1, by the invocation that owns its vec4 (no race with a second write).
        if (i == ti / 4u) {
            d[ti % 4u] = d[ti % 4u] - g;
        }
        d_logits[base + i] = d;
    }
}
