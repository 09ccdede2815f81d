// RMSNorm backward, weight gradient: dw[c] = sum over rows of dy * x * rstd.
// Invocation (chunk, c) sums one chunk of ROWS rows of columns 4c..4c+3 (a vec4) into
// partial[chunk, c] (neighbouring invocations read neighbouring columns); the chunks are
// summed afterwards. No barriers: one pass on GPUs and CPU adapters alike.

const ROWS: u32 = {{ rows_per_chunk }}u;

@group(0) @binding(0) var<storage, read_write> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(2) var<storage, read_write> dy: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> partial: array<vec4<f32>>;
// rows, C
@group(0) @binding(4) var<storage, read_write> params: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let rows = params[0];
    let c = params[1] / 4u;
    let col = gid.x;
    let chunk = gid.y;
    if (col >= c) {
        return;
    }
    let start = chunk * ROWS;
    let end = min(start + ROWS, rows);
    var sum = vec4<f32>(0.0);
    for (var r = start; r < end; r++) {
        sum = sum + dy[r * c + col] * x[r * c + col] * rstd[r];
    }
    partial[chunk * c + col] = sum;
}
