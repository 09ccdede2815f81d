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

const D: u32 = {{ head_dim }}u;
const BK: u32 = {{ block_keys }}u;
const BQ: u32 = 64u;
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read_write> q: array<f32>;
@group(0) @binding(1) var<storage, read_write> k: array<f32>;
@group(0) @binding(2) var<storage, read_write> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> segments: array<i32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
// heads, kv_heads, q_len, k_len, bitcast(scale)
@group(0) @binding(6) var<storage, read_write> params: array<u32>;

var<workgroup> k_tile: array<f32, BK * D>;
var<workgroup> v_tile: array<f32, BK * D>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Sizes must be uniform values to bound loops with barriers; storage reads are not, so
    // they pass through workgroup memory (v_tile, before it holds values).
    if (lid == 0u) {
        for (var t = 0u; t < 4u; t++) {
            v_tile[t] = f32(params[t]);
        }
        v_tile[4] = bitcast<f32>(params[4]);
    }
    let heads = u32(workgroupUniformLoad(&v_tile[0]));
    let kv_heads = u32(workgroupUniformLoad(&v_tile[1]));
    let q_len = u32(workgroupUniformLoad(&v_tile[2]));
    let k_len = u32(workgroupUniformLoad(&v_tile[3]));
    let scale = workgroupUniformLoad(&v_tile[4]);
    let q_offset = k_len - q_len;

    let b = wg.y / heads;
    let h = wg.y % heads;
    let kvh = h / (heads / kv_heads);
    let q_block = wg.x * BQ;
    let i = q_block + lid;
    let in_range = i < q_len;
    // Inactive lanes shadow the last query so that every load stays in bounds.
    let qi = min(i, q_len - 1u);
    let p = qi + q_offset;
    let seg_base = b * k_len;
    let seg = segments[seg_base + p];
    var first = p;
    while (first > 0u && segments[seg_base + first - 1u] == seg) {
        first = first - 1u;
    }
    // The lowest first key of the block, gathered in k_tile before it holds keys (workgroup
    // memory is kept within 16 KiB).
    k_tile[lid] = f32(first);
    workgroupBarrier();
    if (lid == 0u) {
        var lowest = first;
        for (var t = 1u; t < BQ; t++) {
            lowest = min(lowest, u32(k_tile[t]));
        }
        v_tile[8] = f32(lowest);
    }
    let tile_start = (u32(workgroupUniformLoad(&v_tile[8])) / BK) * BK;
    let key_end = min(q_block + BQ, q_len) + q_offset;

    var qv: array<f32, D>;
    var acc: array<f32, D>;
    let q_base = ((b * q_len + qi) * heads + h) * D;
    for (var d = 0u; d < D; d++) {
        qv[d] = q[q_base + d] * scale;
        acc[d] = 0.0;
    }
    var m = NEG;
    var l = 0.0;
    var s: array<f32, BK>;

    for (var kt = tile_start; kt < key_end; kt += BK) {
        workgroupBarrier();
        for (var e = lid; e < BK * D; e += BQ) {
            let j = kt + e / D;
            var kx = 0.0;
            var vx = 0.0;
            if (j < k_len) {
                let src = ((b * k_len + j) * kv_heads + kvh) * D + e % D;
                kx = k[src];
                vx = v[src];
            }
            k_tile[e] = kx;
            v_tile[e] = vx;
        }
        workgroupBarrier();

        var tile_max = NEG;
        for (var jj = 0u; jj < BK; jj++) {
            let j = kt + jj;
            var score = NEG;
            if (j >= first && j <= p) {
                var dot = 0.0;
                for (var d = 0u; d < D; d++) {
                    dot = dot + qv[d] * k_tile[jj * D + d];
                }
                score = dot;
            }
            s[jj] = score;
            tile_max = max(tile_max, score);
        }
        if (tile_max > 0.5 * NEG) {
            let m_new = max(m, tile_max);
            let correction = exp(m - m_new);
            l = l * correction;
            for (var d = 0u; d < D; d++) {
                acc[d] = acc[d] * correction;
            }
            for (var jj = 0u; jj < BK; jj++) {
                if (s[jj] > 0.5 * NEG) {
                    let w = exp(s[jj] - m_new);
                    l = l + w;
                    for (var d = 0u; d < D; d++) {
                        acc[d] = acc[d] + w * v_tile[jj * D + d];
                    }
                }
            }
            m = m_new;
        }
    }

    if (in_range) {
        let inv_l = 1.0 / l;
        for (var d = 0u; d < D; d++) {
            out[q_base + d] = acc[d] * inv_l;
        }
        lse[(b * heads + h) * q_len + i] = m + log(l);
    }
}
