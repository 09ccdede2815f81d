//! The gym end to end on a tiny model (CPU): generate the data, fine-tune, evaluate, and run
//! Ghost Attention; then what each stage wrote is checked.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::repo;

fn kiln(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(repo(""))
        .output()
        .unwrap()
}

fn ok(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{stderr}");
    stderr
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn sets(list: &[String]) -> Vec<String> {
    list.iter()
        .flat_map(|s| ["--set".to_string(), s.clone()])
        .collect()
}

fn first_lines(from: &Path, to: &Path, n: usize) {
    let text = std::fs::read_to_string(from).unwrap();
    let head: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(to, head.join("\n") + "\n").unwrap();
}

#[test]
fn generate_fine_tune_evaluate_and_ghost_attention() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).display().to_string();

    // The gym's files; a second generate into the same directory refuses.
    let out = kiln(&args(&[
        "gym",
        "generate",
        "--out",
        &d("data"),
        "--seed",
        "3",
    ]));
    ok(&out);
    let again = kiln(&args(&[
        "gym",
        "generate",
        "--out",
        &d("data"),
        "--seed",
        "3",
    ]));
    assert!(!again.status.success());

    // A tiny pretrained model with a context long enough for the dialogues.
    let mut pre = args(&["pretrain", "--device", "cpu", "--out", &d("pre")]);
    let mut overrides = common::tiny_model(&repo("data/shakespeare/macbeth.txt"));
    overrides.extend(args(&["train.max_steps=2", "model.max_seq_len=256"]));
    pre.extend(sets(&overrides));
    ok(&kiln(&pre));

    // SFT on a slice of the gym's SFT data.
    first_lines(
        &dir.path().join("data/sft_train.jsonl"),
        &dir.path().join("sft.jsonl"),
        64,
    );
    let mut sft = args(&["sft", "--device", "cpu", "--config", "configs/gym-sft.toml"]);
    sft.extend(args(&["--init", &d("pre"), "--out", &d("sft")]));
    sft.extend(sets(&[
        format!("data.train=[\"{}\"]", d("sft.jsonl")),
        format!("data.val=[\"{}\"]", d("data/sft_val.jsonl")),
        "data.seq_len=128".into(),
        "train.max_steps=2".into(),
        "train.batch_size=2".into(),
        "train.eval_batches=1".into(),
    ]));
    ok(&kiln(&sft));

    // The evaluation prints every metric, with a compliance figure for each of the 6 turns.
    let out = kiln(&args(&[
        "eval",
        "gym",
        "--device",
        "cpu",
        "--checkpoint",
        &d("sft"),
        "--data",
        &d("data"),
        "--limit",
        "3",
        "--json",
    ]));
    ok(&out);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    for key in [
        "task_accuracy",
        "task_score",
        "unsafe_refusal_rate",
        "benign_refusal_rate",
    ] {
        let v = report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {report}"));
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    assert_eq!(report["compliance_by_turn"].as_array().unwrap().len(), 6);
    assert_eq!(report["tasks"], 3);

    // Ghost Attention on three dialogues: the samples put the instruction only in the first
    // turn and train only the last answer of each.
    first_lines(
        &dir.path().join("data/gatt_dialogues.jsonl"),
        &dir.path().join("gatt.jsonl"),
        3,
    );
    let mut gatt = args(&[
        "gatt",
        "--device",
        "cpu",
        "--config",
        "configs/gym-gatt.toml",
    ]);
    gatt.extend(args(&["--init", &d("sft"), "--out", &d("gatt")]));
    gatt.extend(sets(&[
        format!("gatt.dialogues=[\"{}\"]", d("gatt.jsonl")),
        format!("gatt.instructions=\"{}\"", d("data/instructions.jsonl")),
        format!("data.train=[]"),
        format!("data.val=[\"{}\"]", d("data/sft_val.jsonl")),
        "gatt.max_answer_tokens=4".into(),
        "data.seq_len=256".into(),
        "train.max_steps=1".into(),
        "train.batch_size=2".into(),
        "train.eval_batches=1".into(),
    ]));
    let stderr = ok(&kiln(&gatt));
    assert!(stderr.contains("wrote 18 GAtt samples"), "{stderr}");
    let samples = std::fs::read_to_string(dir.path().join("gatt/gatt_samples.jsonl")).unwrap();
    for line in samples.lines() {
        let messages: Vec<kiln::chat::Message> = serde_json::from_value(
            serde_json::from_str::<serde_json::Value>(line).unwrap()["messages"].clone(),
        )
        .unwrap();
        assert_eq!(messages[0].role, kiln::chat::Role::System);
        let systems = messages
            .iter()
            .filter(|m| m.role == kiln::chat::Role::System)
            .count();
        assert_eq!(systems, 1, "{line}");
        let trained: Vec<usize> = (0..messages.len())
            .filter(|&i| messages[i].trained())
            .collect();
        assert_eq!(trained, vec![messages.len() - 1], "{line}");
    }
    assert!(kiln::checkpoint::resolve(&dir.path().join("gatt")).is_ok());
}
