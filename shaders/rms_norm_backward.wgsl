// RMSNorm backward, input gradient, for rows of [rows, C]:
//   g = dy * w,  dx = rstd * g - x * rstd^3 * mean(g * x).
// vec4 rows and TPR invocations per row, as in rms_norm_forward.wgsl. The weight gradient is
// rms_norm_backward_weight.wgsl.

const TPR: u32 = {{ threads_per_row }}u;
const WG: u32 = 64u;

@group(0) @binding(0) var<storage, read_write> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> w: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(3) var<storage, read_write> dy: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> dx: array<vec4<f32>>;
// rows, C
@group(0) @binding(5) var<storage, read_write> params: array<u32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rows = params[0];
    let c = params[1] / 4u;
    let row = (wg.y * nwg.x + wg.x) * (WG / TPR) + lid / TPR;
    let lane = lid % TPR;
    let in_range = row < rows;
    let base = row * c;
    var sum = 0.0;
    if (in_range) {
        for (var i = lane; i < c; i += TPR) {
            sum = sum + dot(dy[base + i] * w[i], x[base + i]);
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
    let r = rstd[row];
    let coef = r * r * r * sum / f32(4u * c);
    for (var i = lane; i < c; i += TPR) {
        dx[base + i] = r * dy[base + i] * w[i] - coef * x[base + i];
    }
}
