// SwiGLU: y = silu(gate) * up = gate * sigmoid(gate) * up, elementwise, four elements per
// invocation (vec4 loads: CPU rasterizers such as lavapipe issue one load per invocation and
// scalar element). Sizes are multiples of 4; kernels::swiglu uses the reference otherwise.

@group(0) @binding(0) var<storage, read_write> gate: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> up: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<vec4<f32>>;
// n / 4
@group(0) @binding(3) var<storage, read_write> params: array<u32>;

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
    let a = gate[id];
    y[id] = a / (1.0 + exp(-a)) * up[id];
}
