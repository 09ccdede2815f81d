// Cross-entropy backward: d_logits = d_loss[row] * (softmax(logits) - onehot(target)),
// the softmax recomputed elementwise from the saved log-sum-exp; ignored rows
// (target < 0) get zero.

@group(0) @binding(0) var<storage, read_write> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;
@group(0) @binding(3) var<storage, read_write> d_loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> d_logits: array<f32>;
// rows * V, V
@group(0) @binding(5) var<storage, read_write> params: array<u32>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = (wg.y * nwg.x + wg.x) * 256u + lid;
    if (id >= params[0]) {
        return;
    }
    let vocab = params[1];
    let row = id / vocab;
    let col = id % vocab;
    let t = targets[row];
    var g = 0.0;
    if (t >= 0) {
        g = exp(logits[id] - lse[row]);
        if (u32(t) == col) {
            g = g - 1.0;
        }
        g = g * d_loss[row];
    }
    d_logits[id] = g;
}
