//! The user-facing commands do what they say: info, tokenizer training, a run, generation,
//! plotting and the training benchmark.

use std::process::{Command, Output};

mod common;
use common::repo;

fn kiln(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn info_counts_the_paper_shapes() {
    let text = stdout(&kiln(&["info", "--preset", "llama2-7b"]));
    assert!(text.contains("parameters: 6738415616"), "{text}");
    let text = stdout(&kiln(&["info", "--preset", "llama2-70b"]));
    assert!(
        text.contains("8 KV heads") && text.contains("parameters: 68976648192"),
        "{text}"
    );
}

#[test]
fn tokenizer_run_generate_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = dir.path().join("tok/tokenizer.json");
    kiln(&[
        "tokenizer",
        "train",
        "--input",
        repo("data/shakespeare/macbeth.txt").to_str().unwrap(),
        "--vocab-size",
        "400",
        "--out",
        tokenizer.to_str().unwrap(),
    ]);
    // The tiny model, on the tokenizer just trained.
    let mut sets = common::tiny_model(&repo("data/shakespeare/macbeth.txt"));
    sets.extend([
        format!("data.tokenizer=\"{}\"", tokenizer.display()),
        "model.vocab_size=400".into(),
        "train.max_steps=5".into(),
        "sample.prompt=\"MACBETH.\"".into(),
        "sample.max_tokens=10".into(),
    ]);
    let run = dir.path().join("run");
    let mut args = vec![
        "pretrain",
        "--device",
        "cpu",
        "--out",
        run.to_str().unwrap(),
    ];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let out = kiln(&args);
    assert!(
        stdout(&out).starts_with("MACBETH."),
        "the run ends with a sample: {}",
        stdout(&out)
    );

    let greedy = || {
        let mut args = common::generate_args(run.to_str().unwrap(), "Fair is foul");
        args.extend(["--max-tokens", "8", "--temperature", "0"]);
        kiln(&args)
    };
    let out = greedy();
    let text = stdout(&out);
    assert!(
        text.starts_with("Fair is foul") && text.trim().len() > "Fair is foul".len(),
        "{text}"
    );
    // Greedy decoding is reproducible.
    let again = greedy();
    assert_eq!(stdout(&again), text);

    kiln(&["plot", run.to_str().unwrap()]);
    for png in ["loss.png", "lr.png"] {
        let bytes = std::fs::read(run.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}

#[test]
fn training_benchmark_prints_one_json_line() {
    let out = kiln(&[
        "bench", "train", "--preset", "bench-5m", "--device", "cpu", "--steps", "1", "--warmup",
        "0",
    ]);
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["params"], 5_048_576);
    assert!(json["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(json["step_ms"].as_f64().unwrap() > 0.0);
}

/// `kiln bench kernels --json`: one object per kernel and shape, with every field the
/// benchmark table needs, and custom kernels that agree with the reference. Needs wgpu.
#[test]
fn kernel_benchmark_prints_one_json_object_per_kernel() {
    if common::wgpu_device().is_none() {
        return;
    }
    let out = kiln(&["bench", "kernels", "--quick", "--json", "--repeats", "1"]);
    let text = stdout(&out);
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kernels: Vec<&str> = rows.iter().map(|r| r["kernel"].as_str().unwrap()).collect();
    for kernel in [
        "flash_attention",
        "rms_norm",
        "swiglu",
        "rope",
        "cross_entropy",
    ] {
        assert!(kernels.contains(&kernel), "{kernel} missing from {text}");
    }
    for row in &rows {
        for field in ["custom_ms", "reference_ms", "speedup"] {
            assert!(row[field].as_f64().unwrap() > 0.0, "{field} in {row}");
        }
        assert!(row["max_rel_err"].as_f64().unwrap() <= 1e-4, "{row}");
    }
    assert!(rows[0]["burn_attention_ms"].as_f64().unwrap() > 0.0);

    // `--kernel` keeps only the kernels named; an unknown name is refused.
    let out = kiln(&[
        "bench",
        "kernels",
        "--quick",
        "--json",
        "--repeats",
        "1",
        "--kernel",
        "rope",
    ]);
    let text = stdout(&out);
    assert!(!text.trim().is_empty());
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(row["kernel"], "rope", "{text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["bench", "kernels", "--quick", "--kernel", "softmax"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("softmax"));
}

#[test]
fn every_training_command_takes_the_shared_flags_and_resume_needs_only_out() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none");
    let missing = missing.to_str().unwrap();
    // --resume without a config (and `rm train` without --kind) reaches the run directory
    // check of the launcher, for every stage.
    for command in [&["pretrain"][..], &["sft"], &["gatt"], &["rm", "train"]] {
        let mut args = command.to_vec();
        args.extend(["--resume", "--out", missing, "--device", "cpu"]);
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr.contains("holds no checkpoint to resume"),
            "{args:?}: {stderr}"
        );
    }
    // So does rejection sampling, whose run is a directory of rounds.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["rs", "--resume", "--out", missing, "--device", "cpu"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("holds no rejection-sampling run"),
        "{stderr}"
    );
    // A fresh reward model needs its kind.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["rm", "train", "--out", missing])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kind"));
    // `kiln generate` says how the sequence ended.
    let pre = dir.path().join("pre");
    let mut args = vec![
        "pretrain".to_string(),
        "--device".into(),
        "cpu".into(),
        "--out".into(),
    ];
    args.push(pre.display().to_string());
    for o in common::tiny_model(&repo("data/shakespeare/macbeth.txt")) {
        args.extend(["--set".into(), o]);
    }
    args.extend(["--set".into(), "train.max_steps=1".into()]);
    kiln(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = kiln(&[
        "generate",
        "--model",
        pre.to_str().unwrap(),
        "--prompt",
        "To",
        "--max-tokens",
        "3",
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("finish: length (3 tokens)") || stderr.contains("finish: eos"),
        "{stderr}"
    );
}
