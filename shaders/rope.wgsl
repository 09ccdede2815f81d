// Rotary position embedding in the "rotate half" layout, forward (sign = +1) and backward
// (sign = -1: the transpose of a rotation is the rotation by the opposite angle).
// x, y: [batch, seq, heads, D]; positions: [batch, seq] i32, so packed sequences restart their
// positions at each segment; cos, sin: [max_positions, D] tables computed in f64 on the host.
// One invocation rotates four pairs (i..i+3, i+D/2..i+D/2+3) as two vec4s: D is a multiple of
// 8 (kernels::Kernels::resolve checks it), and one index division serves four pairs.

@group(0) @binding(0) var<storage, read_write> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> positions: array<i32>;
@group(0) @binding(2) var<storage, read_write> cos_table: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> sin_table: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<vec4<f32>>;
// quads (= batch * seq * heads * D / 8), heads, D, bitcast(sign)
@group(0) @binding(5) var<storage, read_write> params: array<u32>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let quads = params[0];
    let heads = params[1];
    let d4 = params[2] / 4u;
    let sign = bitcast<f32>(params[3]);
    let id = (wg.y * nwg.x + wg.x) * 256u + lid;
    if (id >= quads) {
        return;
    }
    let half4 = d4 / 2u;
    let i = id % half4;
    let row = id / half4;
    let token = row / heads;
    let pos = u32(positions[token]);
    let c = cos_table[pos * d4 + i];
    let s = sin_table[pos * d4 + i] * sign;
    let a = x[row * d4 + i];
    let b = x[row * d4 + i + half4];
    y[row * d4 + i] = a * c - b * s;
    y[row * d4 + i + half4] = b * c + a * s;
}
