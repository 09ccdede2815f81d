//! `cargo bench --bench train`: training throughput of the benchmark presets on the CPU, the
//! same measurement as `kiln bench train` (one JSON line per preset). Pass `wgpu` as an
//! argument to measure the wgpu device instead.

use kiln::config::Preset;
use kiln::device::{self, DeviceChoice};

fn main() -> anyhow::Result<()> {
    let choice = if std::env::args().any(|a| a == "wgpu") {
        DeviceChoice::Wgpu
    } else {
        DeviceChoice::Cpu
    };
    let device = device::select(choice)?;
    for preset in [Preset::Bench5m, Preset::Bench32m] {
        let result = kiln::bench::train(
            preset,
            &device,
            5,
            2,
            kiln::kernels::Kernels::Reference,
            &kiln::train::collective::Solo,
        )?;
        println!("{}", serde_json::to_string(&result)?);
    }
    Ok(())
}
