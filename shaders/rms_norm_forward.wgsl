// RMSNorm forward over rows of x [rows, C]: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps).
// One workgroup per row: one pass reads the row for the sum of squares (tree reduction in
// workgroup memory), one writes y. rstd is saved for the backward pass.

const WG: u32 = 64u;

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> rstd: array<f32>;
// rows, C, bitcast(eps)
@group(0) @binding(4) var<storage, read_write> params: array<u32>;

var<workgroup> partial: array<f32, WG>;
// Sizes pass through workgroup memory to become uniform values (they bound barriers).
var<workgroup> shared_params: array<u32, 3>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (lid == 0u) {
        for (var t = 0u; t < 3u; t++) {
            shared_params[t] = params[t];
        }
    }
    let p = workgroupUniformLoad(&shared_params);
    let rows = p[0];
    let c = p[1];
    let eps = bitcast<f32>(p[2]);
    let row = wg.y * nwg.x + wg.x;
    if (row >= rows) {
        return;
    }
    let base = row * c;
    var sum = 0.0;
    for (var i = lid; i < c; i += WG) {
        let xi = x[base + i];
        sum = sum + xi * xi;
    }
    partial[lid] = sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            partial[lid] = partial[lid] + partial[lid + stride];
        }
        workgroupBarrier();
    }
    let r = inverseSqrt(partial[0] / f32(c) + eps);
    for (var i = lid; i < c; i += WG) {
        y[base + i] = x[base + i] * r * w[i];
    }
    if (lid == 0u) {
        rstd[row] = r;
    }
}
