// SwiGLU backward, both input gradients in one pass, four elements per invocation:
//   d_up = dy * silu(gate),  d_gate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))).

@group(0) @binding(0) var<storage, read_write> gate: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> up: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dy: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> d_gate: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> d_up: array<vec4<f32>>;
// n / 4
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
    let a = gate[id];
    let g = dy[id];
    let sig = 1.0 / (1.0 + exp(-a));
    d_up[id] = g * a * sig;
    d_gate[id] = g * up[id] * sig * (1.0 + a * (1.0 - sig));
}
