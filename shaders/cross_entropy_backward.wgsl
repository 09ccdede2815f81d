// Cross-entropy backward: d_logits = d_loss[row] * (softmax(logits) - onehot(target)), the
// softmax recomputed from the saved log-sum-exp; ignored rows (target < 0) get zero.
// One workgroup per row, striding over the vocabulary (no integer division per element).

const WG: u32 = 64u;

@group(0) @binding(0) var<storage, read_write> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;
@group(0) @binding(3) var<storage, read_write> d_loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> d_logits: array<f32>;
// rows, V
@group(0) @binding(5) var<storage, read_write> params: array<u32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rows = params[0];
    let vocab = params[1];
    let row = wg.y * nwg.x + wg.x;
    if (row >= rows) {
        return;
    }
    let base = row * vocab;
    let t = targets[row];
    if (t < 0) {
        for (var i = lid; i < vocab; i += WG) {
            d_logits[base + i] = 0.0;
        }
        return;
    }
    let g = d_loss[row];
    let row_lse = lse[row];
    for (var i = lid; i < vocab; i += WG) {
        d_logits[base + i] = g * exp(logits[base + i] - row_lse);
    }
    // The target's -1: written by the invocation that wrote that element above.
    let ti = u32(t);
    if (ti % WG == lid) {
        d_logits[base + ti] = g * (exp(logits[base + ti] - row_lse) - 1.0);
    }
}
