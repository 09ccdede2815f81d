//! Where the time of custom flash attention goes on a wgpu device: forward alone, then forward
//! plus backward, at the benchmark shape (batch 4, 8 heads, T 1024, head dim 64).
//! `cargo run --release --example attention_profile [T]`

use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use kiln::device::{self, DeviceChoice};
use kiln::kernels::{Kernels, PreparedLayout, SequenceLayout};
use kiln::model::ops::RopeTables;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let t: usize = std::env::args().nth(1).map_or(1024, |v| v.parse().unwrap());
    let (b, h, d) = (4, 8, 64);
    let device = device::select(DeviceChoice::Wgpu).unwrap().device;
    let ad = device.clone().autodiff();
    let x: Vec<f32> = (0..b * t * h * d)
        .map(|i| ((i % 89) as f32 - 44.0) / 45.0)
        .collect();
    let mk =
        || Tensor::<4>::from_data(TensorData::new(x.clone(), [b, t, h, d]), &ad).require_grad();
    let tables = RopeTables::new(t, d, 10_000.0, &ad);
    let layout = PreparedLayout::new(
        &SequenceLayout::causal(b, t),
        Kernels::Custom,
        &tables,
        1,
        &ad,
    );
    for backward in [false, true, false, true] {
        let (q, k, v) = (mk(), mk(), mk());
        device.sync().unwrap();
        let start = Instant::now();
        let out = layout.attention(q.clone(), k, v);
        if backward {
            let grads = out.sum().backward();
            drop(q.grad(&grads));
        } else {
            drop(out);
        }
        device.sync().unwrap();
        println!(
            "backward {backward}: {:.0} ms",
            start.elapsed().as_secs_f64() * 1e3
        );
    }
}
