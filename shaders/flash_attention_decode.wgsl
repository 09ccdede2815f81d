// Flash attention forward for a few queries over many keys (decoding with a KV cache), the
// same operation as flash_attention_forward.wgsl with the same layouts, visibility rule and
// outputs (out and the log-sum-exp, so the backward kernels serve both).
//
// That kernel gives each query an invocation and walks the keys in tiles; with one query per
// row, 63 of its 64 invocations would idle. Here one workgroup owns one (batch, head, query)
// and its invocations split the visible keys (invocation t takes keys first + t, + 64, ...),
// each keeping a partial online softmax (max, sum, weighted values); the partials are then
// merged in workgroup memory: max, rescale, sum, and the value rows in chunks of CH vec4s.

const D4: u32 = {{ head_dim }}u / 4u;
const WG: u32 = 64u;
const CH: u32 = 8u;
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read_write> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> k: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> segments: array<i32>;
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
// heads, kv_heads, q_len, k_len, bitcast(scale), the batch stride of k and v in vec4s (that
// of the KV cache's longer buffers, which the kernel reads in place)
@group(0) @binding(6) var<storage, read_write> params: array<u32>;

var<workgroup> red: array<f32, WG>;
var<workgroup> red_u: array<u32, WG>;
var<workgroup> acc_red: array<vec4<f32>, WG * CH>;

// Tree reductions over the workgroup; every invocation gets the result, and the scratch is
// free again when they return.
fn workgroup_max_u32(lid: u32, value: u32) -> u32 {
    red_u[lid] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            red_u[lid] = max(red_u[lid], red_u[lid + stride]);
        }
        workgroupBarrier();
    }
    let result = red_u[0];
    workgroupBarrier();
    return result;
}

fn workgroup_max(lid: u32, value: f32) -> f32 {
    red[lid] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            red[lid] = max(red[lid], red[lid + stride]);
        }
        workgroupBarrier();
    }
    let result = red[0];
    workgroupBarrier();
    return result;
}

fn workgroup_sum(lid: u32, value: f32) -> f32 {
    red[lid] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            red[lid] = red[lid] + red[lid + stride];
        }
        workgroupBarrier();
    }
    let result = red[0];
    workgroupBarrier();
    return result;
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Every barrier below sits in loops with constant bounds, so the sizes need not be uniform.
    let heads = params[0];
    let kv_heads = params[1];
    let q_len = params[2];
    let k_len = params[3];
    let scale = bitcast<f32>(params[4]);
    let kv_batch = params[5];
    let i = wg.x;
    let b = wg.y / heads;
    let h = wg.y % heads;
    let kvh = h / (heads / kv_heads);
    let p = i + k_len - q_len;
    let seg_base = b * k_len;
    let seg = segments[seg_base + p];

    // The first visible key: one past the last earlier key of another segment (segments are
    // contiguous runs), found by all invocations together.
    var boundary = 0u;
    for (var j = lid; j < p; j += WG) {
        if (segments[seg_base + j] != seg) {
            boundary = j + 1u;
        }
    }
    let first = workgroup_max_u32(lid, boundary);

    let q_base = ((b * q_len + i) * heads + h) * D4;
    var qv: array<vec4<f32>, D4>;
    var acc: array<vec4<f32>, D4>;
    for (var d = 0u; d < D4; d++) {
        qv[d] = q[q_base + d] * scale;
        acc[d] = vec4<f32>(0.0);
    }
    var m = NEG;
    var l = 0.0;
    for (var j = first + lid; j <= p; j += WG) {
        let kv_base = b * kv_batch + (j * kv_heads + kvh) * D4;
        var s = 0.0;
        for (var d = 0u; d < D4; d++) {
            s = s + dot(qv[d], k[kv_base + d]);
        }
        let m_new = max(m, s);
        let correction = exp(m - m_new);
        let w = exp(s - m_new);
        l = l * correction + w;
        for (var d = 0u; d < D4; d++) {
            acc[d] = acc[d] * correction + w * v[kv_base + d];
        }
        m = m_new;
    }

    // Merge the partials: the overall max, then every partial rescaled to it.
    let m_all = workgroup_max(lid, m);
    // An invocation without keys has l = 0 and acc = 0; exp(NEG - m_all) = 0 keeps them so.
    let f = exp(m - m_all);
    let l_all = workgroup_sum(lid, l * f);
    let inv_l = 1.0 / l_all;
    for (var c = 0u; c < D4; c += CH) {
        for (var x = 0u; x < CH; x++) {
            if (c + x < D4) {
                acc_red[lid * CH + x] = acc[c + x] * f;
            }
        }
        workgroupBarrier();
        if (lid < CH && c + lid < D4) {
            var sum = vec4<f32>(0.0);
            for (var t = 0u; t < WG; t++) {
                sum = sum + acc_red[t * CH + lid];
            }
            out[q_base + c + lid] = sum * inv_l;
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        lse[(b * heads + h) * q_len + i] = m_all + log(l_all);
    }
}
