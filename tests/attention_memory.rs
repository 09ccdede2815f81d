//! Flash attention never materialises a T x T matrix: device memory for a forward and backward
//! pass grows linearly in T. Its own test binary, so no other test shares the device's memory
//! pools while it measures.
//!
//! The measure is the wgpu device's reserved memory (burn's `Device::memory_pool_usage`) after
//! one pass, each in a fresh process (this test binary runs itself), so that no pages are left
//! from an earlier pass. To show that it can see a T x T matrix, the same measure is taken for
//! the reference attention, which builds one.

use burn::tensor::{Device, Tensor, TensorData};
use kiln::kernels::{Kernels, PreparedLayout, SequenceLayout};
use kiln::model::ops::RopeTables;

mod common;

fn wgpu() -> Option<Device> {
    common::wgpu_device().map(|d| d.device)
}

/// Bytes the device reserved while running attention forward and backward at length `t`.
fn memory_growth(device: &Device, kernels: Kernels, t: usize) -> u64 {
    let (b, h, d) = (1, 2, 32);
    let ad = device.clone().autodiff();
    device.memory_cleanup();
    let before = device
        .memory_pool_usage()
        .expect("wgpu reports memory")
        .bytes_reserved;
    {
        let x: Vec<f32> = (0..b * t * h * d)
            .map(|i| ((i % 97) as f32 - 48.0) / 50.0)
            .collect();
        let mk =
            || Tensor::<4>::from_data(TensorData::new(x.clone(), [b, t, h, d]), &ad).require_grad();
        let (q, k, v) = (mk(), mk(), mk());
        let tables = RopeTables::new(t, d, 10_000.0, &ad);
        let layout = PreparedLayout::new(&SequenceLayout::causal(b, t), kernels, &tables, 1, &ad);
        let out = layout.attention(q.clone(), k.clone(), v.clone());
        let grads = out.sum().backward();
        let g: f32 = q.grad(&grads).unwrap().sum().into_scalar();
        assert!(g.is_finite());
    }
    device.sync().unwrap();
    let after = device.memory_pool_usage().unwrap().bytes_reserved;
    after.saturating_sub(before)
}

/// Child side: measures one `KILN_ATTENTION_MEMORY=custom|reference:T` case and prints it.
#[test]
fn measure_one_attention_pass() {
    let Ok(case) = std::env::var("KILN_ATTENTION_MEMORY") else {
        return;
    };
    let (kind, t) = case.split_once(':').unwrap();
    let kernels = if kind == "custom" {
        Kernels::Custom
    } else {
        Kernels::Reference
    };
    let device = wgpu().expect("wgpu adapter");
    println!(
        "MEMORY {}",
        memory_growth(&device, kernels, t.parse().unwrap())
    );
}

/// Runs [`measure_one_attention_pass`] in a fresh process.
fn measured(kind: &str, t: usize) -> u64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "measure_one_attention_pass",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("KILN_ATTENTION_MEMORY", format!("{kind}:{t}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split("MEMORY ").nth(1).map(|n| n.trim().parse().unwrap()))
        .unwrap_or_else(|| {
            panic!(
                "no measurement: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

#[test]
fn flash_attention_memory_grows_linearly_in_sequence_length() {
    if std::env::var_os("KILN_ATTENTION_MEMORY").is_some() || wgpu().is_none() {
        return;
    }
    let score_matrix = |t: usize| (2 * t * t * 4) as u64; // heads x T x T f32
    // The measure sees a T x T matrix: the reference path reserves at least one.
    let reference = measured("reference", 512);
    eprintln!("reference attention, T = 512: {reference} bytes");
    assert!(
        reference >= score_matrix(512),
        "the measure misses the reference's score matrix"
    );

    let short = measured("custom", 1024);
    let long = measured("custom", 4096);
    eprintln!("flash attention: T = 1024 {short} bytes, T = 4096 {long} bytes");
    // Linear: 4x the length, about 4x the memory (pages round up); quadratic would be 16x.
    assert!(
        long <= 6 * short.max(1 << 20),
        "memory grew from {short} to {long} bytes for 4x the length"
    );
    assert!(
        long < score_matrix(4096) / 4,
        "flash attention reserved {long} bytes, a T x T matrix is {}",
        score_matrix(4096)
    );
}
