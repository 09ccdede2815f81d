// Flash attention, forward pass (causal, grouped-query, packed segments).
//
// Layout (token-major, as the projections produce them, so no transposes are needed):
//   q, out: [batch, q_len, heads, D]; k, v: [batch, k_len, kv_heads, D];
//   segments: [batch, k_len] i32; lse: [batch, heads, q_len].
// Query i sits at key position p = k_len - q_len + i (a KV cache puts the new queries last).
// It sees key j when j <= p and segments[j] == segments[p]; segments are contiguous runs, so
// that is `first <= j <= p` with `first` the start of p's segment.
//
// One workgroup owns BQ consecutive queries of one (batch, head), one query per invocation.
// Key/value tiles of BK rows are staged in workgroup memory and shared by all BQ queries;
// each tile's scores go through an online softmax, so no [q_len, k_len] matrix exists.
// Query head h reads KV head h / (heads / kv_heads): K/V are never repeated in memory.
//
// Rows are vec4s (D is a multiple of 4): on lavapipe, private arrays of 64 or more scalars
// came back wrong in long loops, vec4 arrays do not.

const D4: u32 = {{ head_dim }}u / 4u;
const BK: u32 = {{ block_keys }}u;
const BQ: u32 = 64u;
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read_write> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> k: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> segments: array<i32>;
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
// heads, kv_heads, q_len, k_len, bitcast(scale)
@group(0) @binding(6) var<storage, read_write> params: array<u32>;

var<workgroup> k_tile: array<vec4<f32>, BK * D4>;
var<workgroup> v_tile: array<vec4<f32>, BK * D4>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Sizes bound loops with barriers, so they must be uniform values; storage reads are
    // not, so they pass through workgroup memory (v_tile, before it holds values).
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
    // The block starts at the lowest first key of its queries (gathered in k_tile before it
    // holds keys: workgroup memory stays within 16 KiB).
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

    var qv: array<vec4<f32>, D4>;
    var acc: array<vec4<f32>, D4>;
    let q_base = ((b * q_len + qi) * heads + h) * D4;
    for (var d = 0u; d < D4; d++) {
        qv[d] = q[q_base + d] * scale;
        acc[d] = vec4<f32>(0.0);
    }
    var m = NEG;
    var l = 0.0;
    var s: array<f32, BK>;

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

        // Two keys per step: each load of the query row and the accumulator serves both.
        var tile_max = NEG;
        for (var jj = 0u; jj < BK; jj += 2u) {
            var s0 = 0.0;
            var s1 = 0.0;
            for (var d = 0u; d < D4; d++) {
                let qd = qv[d];
                s0 = s0 + dot(qd, k_tile[jj * D4 + d]);
                s1 = s1 + dot(qd, k_tile[(jj + 1u) * D4 + d]);
            }
            let j = kt + jj;
            s0 = select(NEG, s0, j >= first && j <= p);
            s1 = select(NEG, s1, j + 1u >= first && j + 1u <= p);
            s[jj] = s0;
            s[jj + 1u] = s1;
            tile_max = max(tile_max, max(s0, s1));
        }
        if (tile_max > 0.5 * NEG) {
            let m_new = max(m, tile_max);
            let correction = exp(m - m_new);
            l = l * correction;
            for (var jj = 0u; jj < BK; jj += 2u) {
                // Masked keys give exp(NEG - m_new) = 0.
                let w0 = exp(s[jj] - m_new);
                let w1 = exp(s[jj + 1u] - m_new);
                l = l + w0 + w1;
                let first_pair = jj == 0u;
                for (var d = 0u; d < D4; d++) {
                    var a = acc[d];
                    if (first_pair) {
                        a = a * correction;
                    }
                    acc[d] = a + w0 * v_tile[jj * D4 + d] + w1 * v_tile[(jj + 1u) * D4 + d];
                }
            }
            m = m_new;
        }
    }

    if (in_range) {
        let inv_l = 1.0 / l;
        for (var d = 0u; d < D4; d++) {
            out[q_base + d] = acc[d] * inv_l;
        }
        lse[(b * heads + h) * q_len + i] = m + log(l);
    }
}
