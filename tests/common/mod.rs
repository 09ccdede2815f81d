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

/// The reward-model tests' backbone: two layers of dim 32, GQA 4/2, a vocabulary of 97.
pub fn tiny_rm_config() -> kiln::config::ModelConfig {
    kiln::config::ModelConfig {
        dim: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        ffn_dim: 48,
        vocab_size: 97,
        max_seq_len: 64,
        init_std: 0.2,
        ..kiln::config::ModelConfig::default()
    }
}

/// Four preference pairs whose chosen and rejected answers share a prompt (3 to 18 tokens)
/// and differ after it (1 to 3 tokens each), over token ids 1..97.
pub fn pairs_sharing_prompts(rng: &mut impl rand::Rng) -> Vec<kiln::reward::EncodedPair> {
    let mut draw = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(1..97)).collect() };
    (0..4)
        .map(|i| {
            let prompt = draw(3 + 5 * i);
            let mut chosen = prompt.clone();
            chosen.extend(draw(1 + i % 3));
            let mut rejected = prompt;
            rejected.extend(draw(2 + i % 2));
            kiln::reward::EncodedPair {
                chosen,
                rejected,
                rating: kiln::chat::Rating::Better,
                safety: false,
            }
        })
        .collect()
}
