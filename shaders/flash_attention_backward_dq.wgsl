// Flash attention, backward pass, part 1: dQ, and delta = rowsum(dO * O) for part 2.
//
// Same layouts and visibility rule as flash_attention_forward.wgsl, including a KV cache:
// query i sits at key position p = k_len - q_len + i (gradients then flow into the cached
// keys and values too). Scores are recomputed from Q, K and the saved log-sum-exp:
//   P_ij = exp(scale * q_i.k_j - lse_i),  dS_ij = P_ij * (dO_i.v_j - delta_i),
//   dq_i = scale * sum_j dS_ij k_j.
// One workgroup owns BQ queries of one (batch, head); K/V tiles are staged in workgroup
// memory. Rows are vec4s (see the forward kernel).

const D4: u32 = {{ head_dim }}u / 4u;
const BK: u32 = {{ block_keys }}u;
const BQ: u32 = 64u;

@group(0) @binding(0) var<storage, read_write> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> k: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> d_o: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
@group(0) @binding(6) var<storage, read_write> segments: array<i32>;
@group(0) @binding(7) var<storage, read_write> dq: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> delta: array<f32>;
// heads, kv_heads, q_len, k_len, bitcast(scale)
@group(0) @binding(9) var<storage, read_write> params: array<u32>;

var<workgroup> k_tile: array<vec4<f32>, BK * D4>;
var<workgroup> v_tile: array<vec4<f32>, BK * D4>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Uniform sizes through workgroup memory (see the forward kernel).
    if (lid == 0u) {
        v_tile[0] = vec4<f32>(f32(params[0]), f32(params[1]), f32(params[2]), f32(params[3]));
        v_tile[1] = vec4<f32>(bitcast<f32>(params[4]), 0.0, 0.0, 0.0);
    }
    let sizes = vec4<u32>(workgroupUniformLoad(&v_tile[0]));
    let scale = workgroupUniformLoad(&v_tile[1]).x;
    let heads = sizes.x;
    let kv_heads = sizes.y;
    let q_len = sizes.z;
    let k_len = sizes.w;
    let q_offset = k_len - q_len;

    let b = wg.y / heads;
    let h = wg.y % heads;
    let kvh = h / (heads / kv_heads);
    let q_block = wg.x * BQ;
    let i = q_block + lid;
    let in_range = i < q_len;
    // Lanes past the end shadow the last query so that every load stays in bounds.
    let qi = min(i, q_len - 1u);
    let p = qi + q_offset;
    let seg_base = b * k_len;
    let seg = segments[seg_base + p];
    var first = p;
    while (first > 0u && segments[seg_base + first - 1u] == seg) {
        first = first - 1u;
    }
    k_tile[lid] = vec4<f32>(f32(first));
    workgroupBarrier();
    if (lid == 0u) {
        var lowest = first;
        for (var t = 1u; t < BQ; t++) {
            lowest = min(lowest, u32(k_tile[t].x));
        }
        v_tile[2] = vec4<f32>(f32(lowest));
    }
    let tile_start = (u32(workgroupUniformLoad(&v_tile[2]).x) / BK) * BK;
    let key_end = min(q_block + BQ, q_len) + q_offset;

    let base = ((b * q_len + qi) * heads + h) * D4;
    var qv: array<vec4<f32>, D4>;
    var dov: array<vec4<f32>, D4>;
    var dqv: array<vec4<f32>, D4>;
    var dlt = 0.0;
    for (var d = 0u; d < D4; d++) {
        qv[d] = q[base + d] * scale;
        dov[d] = d_o[base + d];
        dqv[d] = vec4<f32>(0.0);
        dlt = dlt + dot(dov[d], o[base + d]);
    }
    let row = (b * heads + h) * q_len + qi;
    let row_lse = lse[row];

    for (var kt = tile_start; kt < key_end; kt += BK) {
        workgroupBarrier();
        for (var e = lid; e < BK * D4; e += BQ) {
            let j = kt + e / D4;
            var kx = vec4<f32>(0.0);
            var vx = vec4<f32>(0.0);
            if (j < k_len) {
                let src = ((b * k_len + j) * kv_heads + kvh) * D4 + e % D4;
                kx = k[src];
                vx = v[src];
            }
            k_tile[e] = kx;
            v_tile[e] = vx;
        }
        workgroupBarrier();
        for (var jj = 0u; jj < BK; jj++) {
            let j = kt + jj;
            if (j >= first && j <= p) {
                var score = 0.0;
                var dp = 0.0;
                for (var d = 0u; d < D4; d++) {
                    score = score + dot(qv[d], k_tile[jj * D4 + d]);
                    dp = dp + dot(dov[d], v_tile[jj * D4 + d]);
                }
                let ds = exp(score - row_lse) * (dp - dlt);
                for (var d = 0u; d < D4; d++) {
                    dqv[d] = dqv[d] + ds * k_tile[jj * D4 + d];
                }
            }
        }
    }

    if (in_range) {
        for (var d = 0u; d < D4; d++) {
            dq[base + d] = dqv[d] * scale;
        }
        delta[row] = dlt;
    }
}
