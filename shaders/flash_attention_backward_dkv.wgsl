// Flash attention, backward pass, part 2: dK and dV, summed over the query heads that share
// each KV head (grouped-query attention).
//
// Same layouts as flash_attention_forward.wgsl, including a KV cache: query i sits at key
// position p = k_len - q_len + i, and cached keys (j < k_len - q_len) get gradients too. Key j
// is seen by the query at position p when j <= p and both are in one segment, i.e.
// `j <= p < last`, with `last` the end of j's segment. With P and dS as in part 1 (delta comes
// from part 1):
//   dv_j = sum_i P_ij dO_i,  dk_j = scale * sum_i dS_ij q_i.
// One workgroup owns BK consecutive keys of one (batch, KV head), one key per invocation, and
// walks the query tiles of every query head in the group, staged in workgroup memory.
// Rows are vec4s (see the forward kernel).

const D4: u32 = {{ head_dim }}u / 4u;
const BQ: u32 = {{ block_keys }}u;
const BK: u32 = 64u;

@group(0) @binding(0) var<storage, read_write> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> k: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> d_o: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
@group(0) @binding(5) var<storage, read_write> delta: array<f32>;
@group(0) @binding(6) var<storage, read_write> segments: array<i32>;
@group(0) @binding(7) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> dv: array<vec4<f32>>;
// heads, kv_heads, q_len, k_len, bitcast(scale)
@group(0) @binding(9) var<storage, read_write> params: array<u32>;

var<workgroup> q_tile: array<vec4<f32>, BQ * D4>;
var<workgroup> do_tile: array<vec4<f32>, BQ * D4>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Uniform sizes through workgroup memory (see the forward kernel).
    if (lid == 0u) {
        do_tile[0] = vec4<f32>(f32(params[0]), f32(params[1]), f32(params[2]), f32(params[3]));
        do_tile[1] = vec4<f32>(bitcast<f32>(params[4]), 0.0, 0.0, 0.0);
    }
    let sizes = vec4<u32>(workgroupUniformLoad(&do_tile[0]));
    let scale = workgroupUniformLoad(&do_tile[1]).x;
    let heads = sizes.x;
    let kv_heads = sizes.y;
    let q_len = sizes.z;
    let k_len = sizes.w;
    let q_offset = k_len - q_len;
    let group = heads / kv_heads;

    let b = wg.y / kv_heads;
    let kvh = wg.y % kv_heads;
    let k_block = wg.x * BK;
    let j = k_block + lid;
    let in_range = j < k_len;
    let kj = min(j, k_len - 1u);
    let seg_base = b * k_len;
    let seg = segments[seg_base + kj];
    var last = kj + 1u;
    while (last < k_len && segments[seg_base + last] == seg) {
        last = last + 1u;
    }
    // The block ends at the highest segment end of its keys (gathered in q_tile before it
    // holds queries; BQ * D4 >= BK).
    q_tile[lid] = vec4<f32>(f32(last));
    workgroupBarrier();
    if (lid == 0u) {
        var highest = last;
        for (var t = 1u; t < BK; t++) {
            highest = max(highest, u32(q_tile[t].x));
        }
        do_tile[2] = vec4<f32>(f32(highest));
    }
    // Queries (by index, not position) that can see a key of the block: from the first at or
    // after the block's first key to the highest segment end.
    let query_end = max(u32(workgroupUniformLoad(&do_tile[2]).x), q_offset) - q_offset;
    let tile_start = ((max(k_block, q_offset) - q_offset) / BQ) * BQ;
    let tiles = (max(query_end, tile_start) - tile_start + BQ - 1u) / BQ;

    let kv_base = ((b * k_len + kj) * kv_heads + kvh) * D4;
    var kv: array<vec4<f32>, D4>;
    var vv: array<vec4<f32>, D4>;
    var dkv: array<vec4<f32>, D4>;
    var dvv: array<vec4<f32>, D4>;
    for (var d = 0u; d < D4; d++) {
        kv[d] = k[kv_base + d] * scale;
        vv[d] = v[kv_base + d];
        dkv[d] = vec4<f32>(0.0);
        dvv[d] = vec4<f32>(0.0);
    }

    // One loop over (query head of the group, query tile).
    for (var step = 0u; step < group * tiles; step++) {
        let h = kvh * group + step / tiles;
        let qt = tile_start + (step % tiles) * BQ;
        workgroupBarrier();
        for (var e = lid; e < BQ * D4; e += BK) {
            let i = qt + e / D4;
            var qx = vec4<f32>(0.0);
            var dox = vec4<f32>(0.0);
            if (i < q_len) {
                let src = ((b * q_len + i) * heads + h) * D4 + e % D4;
                qx = q[src];
                dox = d_o[src];
            }
            q_tile[e] = qx;
            do_tile[e] = dox;
        }
        workgroupBarrier();
        for (var ii = 0u; ii < BQ; ii++) {
            let i = qt + ii;
            let p = i + q_offset;
            if (p >= kj && p < last && i < q_len) {
                var score = 0.0;
                var dp = 0.0;
                for (var d = 0u; d < D4; d++) {
                    score = score + dot(kv[d], q_tile[ii * D4 + d]);
                    dp = dp + dot(vv[d], do_tile[ii * D4 + d]);
                }
                let row = (b * heads + h) * q_len + i;
                let pr = exp(score - lse[row]);
                let ds = pr * (dp - delta[row]);
                for (var d = 0u; d < D4; d++) {
                    dvv[d] = dvv[d] + pr * do_tile[ii * D4 + d];
                    dkv[d] = dkv[d] + ds * q_tile[ii * D4 + d];
                }
            }
        }
    }

    if (in_range) {
        for (var d = 0u; d < D4; d++) {
            dk[kv_base + d] = dkv[d] * scale;
            dv[kv_base + d] = dvv[d];
        }
    }
}
