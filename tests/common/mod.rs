//! Fixtures shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

/// A path inside the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `--set` values for the smallest useful model (one layer, dim 32, sequences of 32 tokens)
/// on `corpus` with the bundled tokenizer.
pub fn tiny_model(corpus: &Path) -> Vec<String> {
    vec![
        format!("data.corpus=[\"{}\"]", corpus.display()),
        format!(
            "data.tokenizer=\"{}\"",
            repo("data/shakespeare/tokenizer.json").display()
        ),
        "model.dim=32".into(),
        "model.n_layers=1".into(),
        "model.n_heads=2".into(),
        "model.n_kv_heads=1".into(),
        "model.ffn_dim=64".into(),
        "model.max_seq_len=32".into(),
        "data.seq_len=32".into(),
        "train.eval_batches=1".into(),
    ]
}

/// Arguments for `kiln generate` on the CPU.
pub fn generate_args<'a>(checkpoint: &'a str, prompt: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "--device",
        "cpu",
        "--checkpoint",
        checkpoint,
        "--prompt",
        prompt,
    ]
}

/// The wgpu device (in CI: lavapipe), or `None` with a note when this machine has no Vulkan
/// driver. Under CI (`CI` set) a missing adapter is a failure, not a skip.
pub fn wgpu_device() -> Option<kiln::device::ComputeDevice> {
    use kiln::device::{self, DeviceChoice};
    let found = std::panic::catch_unwind(|| device::select(DeviceChoice::Wgpu))
        .ok()
        .and_then(Result::ok);
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have a wgpu adapter (mesa-vulkan-drivers)"
        );
        eprintln!("no wgpu adapter: skipping");
    }
    found
}
