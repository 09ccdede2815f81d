// RMSNorm backward, input gradient, one workgroup per row of [rows, C]:
//   g = dy * w,  dx = rstd * g - x * rstd^3 * mean(g * x).
// The weight gradient is rms_norm_backward_weight.wgsl.

const WG: u32 = 64u;

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(3) var<storage, read_write> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;
// rows, C
@group(0) @binding(5) var<storage, read_write> params: array<u32>;

var<workgroup> partial: array<f32, WG>;
// Sizes pass through workgroup memory to become uniform values (they bound barriers).
var<workgroup> shared_params: array<u32, 2>;

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
    let c = p[1];
    let row = wg.y * nwg.x + wg.x;
    if (row >= rows) {
        return;
    }
    let base = row * c;
    var sum = 0.0;
    for (var i = lid; i < c; i += WG) {
        sum = sum + dy[base + i] * w[i] * x[base + i];
    }
    partial[lid] = sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            partial[lid] = partial[lid] + partial[lid + stride];
        }
        workgroupBarrier();
    }
    let r = rstd[row];
    let coef = r * r * r * partial[0] / f32(c);
    for (var i = lid; i < c; i += WG) {
        dx[base + i] = r * dy[base + i] * w[i] - coef * x[base + i];
    }
}
