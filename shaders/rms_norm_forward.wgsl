// RMSNorm forward over rows of x [rows, C]: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps).
// Rows are read as vec4 (C is a multiple of 4; kernels::rms_norm uses the reference otherwise).
// TPR invocations share a row, a template value: on GPUs the whole workgroup, reduced in
// workgroup memory; on CPU adapters (lavapipe) one invocation per row and no barrier at all,
// since there a barrier costs more than a row. rstd is saved for the backward pass.

const TPR: u32 = {{ threads_per_row }}u;
const WG: u32 = 64u;

@group(0) @binding(0) var<storage, read_write> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> w: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> rstd: array<f32>;
// rows, C, bitcast(eps)
@group(0) @binding(4) var<storage, read_write> params: array<u32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rows = params[0];
    let c = params[1] / 4u;
    let eps = bitcast<f32>(params[2]);
    let row = (wg.y * nwg.x + wg.x) * (WG / TPR) + lid / TPR;
    let lane = lid % TPR;
    let in_range = row < rows;
    let base = row * c;
    var sum = 0.0;
    if (in_range) {
        for (var i = lane; i < c; i += TPR) {
            let xi = x[base + i];
            sum = sum + dot(xi, xi);
        }
    }
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
    if (!in_range) {
        return;
    }
    let r = inverseSqrt(sum / f32(4u * c) + eps);
    for (var i = lane; i < c; i += TPR) {
        y[base + i] = x[base + i] * r * w[i];
    }
    if (lane == 0u) {
        rstd[row] = r;
    }
}
