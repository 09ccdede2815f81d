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
        "data.train=[]".to_string(),
        format!("data.val=[\"{}\"]", d("data/sft_val.jsonl")),
        "gatt.max_answer_tokens=4".into(),
        // Answers cut at 4 tokens are kept without their end marker (the default drops them).
        "gatt.cut_answers=\"keep\"".into(),
        "data.seq_len=256".into(),
        "train.max_steps=1".into(),
        "train.batch_size=2".into(),
        "train.eval_batches=1".into(),
    ]));
    let stderr = ok(&kiln(&gatt));
    assert!(stderr.contains("wrote 18 GAtt samples"), "{stderr}");
    let samples = std::fs::read_to_string(dir.path().join("gatt/gatt_samples.jsonl")).unwrap();
    for line in samples.lines() {
        let messages: Vec<kiln::data::chat::Message> = serde_json::from_value(
            serde_json::from_str::<serde_json::Value>(line).unwrap()["messages"].clone(),
        )
        .unwrap();
        assert_eq!(messages[0].role, kiln::data::chat::Role::System);
        let systems = messages
            .iter()
            .filter(|m| m.role == kiln::data::chat::Role::System)
            .count();
        assert_eq!(systems, 1, "{line}");
        let trained: Vec<usize> = (0..messages.len())
            .filter(|&i| messages[i].trained())
            .collect();
        assert_eq!(trained, vec![messages.len() - 1], "{line}");
    }
    assert!(kiln::interop::checkpoint::resolve(&dir.path().join("gatt")).is_ok());

    // A safety reward model from the chat model: train, evaluate, score.
    first_lines(
        &dir.path().join("data/pref_train.jsonl"),
        &dir.path().join("pref.jsonl"),
        200,
    );
    let mut rm = args(&["rm", "train", "--kind", "safety", "--device", "cpu"]);
    rm.extend(args(&[
        "--config",
        "configs/gym-rm.toml",
        "--init",
        &d("sft"),
        "--out",
        &d("rm"),
    ]));
    rm.extend(sets(&[
        format!("data.train=[\"{}\"]", d("pref.jsonl")),
        format!("data.val=[\"{}\"]", d("data/pref_heldout.jsonl")),
        "train.max_steps=2".into(),
        "train.batch_size=4".into(),
        "train.eval_batches=1".into(),
    ]));
    let stderr = ok(&kiln(&rm));
    assert!(stderr.contains("safety reward model"), "{stderr}");
    let out = kiln(&args(&[
        "rm",
        "eval",
        "--device",
        "cpu",
        "--model",
        &d("rm"),
        "--input",
        &d("data/pref_heldout.jsonl"),
        "--json",
    ]));
    ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["pairs"], 500);
    assert!(report["unsafe_recall"].as_f64().is_some(), "{report}");
    assert_eq!(
        report["accuracy_by_rating"].as_object().unwrap().len(),
        4,
        "{report}"
    );
    let input = dir.path().join("to-score.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"What is 2 + 2?\", \"response\": \"4\", \"id\": 7}\n{\"prompt\": \"Hi\", \"response\": \"I'm sorry, but I can't help with that.\"}\n",
    )
    .unwrap();
    ok(&kiln(&args(&[
        "rm",
        "score",
        "--device",
        "cpu",
        "--model",
        &d("rm"),
        "--input",
        &d("to-score.jsonl"),
        "--out",
        &d("scored.jsonl"),
    ])));
    let scored = std::fs::read_to_string(dir.path().join("scored.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = scored
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], 7, "other fields are kept");
    let (s, p) = (
        lines[1]["score"].as_f64().unwrap(),
        lines[1]["score_sigmoid"].as_f64().unwrap(),
    );
    assert!((p - 1.0 / (1.0 + (-s).exp())).abs() < 1e-6);
    // A malformed line: FILE:LINE, and the output is not written.
    std::fs::write(&input, "{\"prompt\": \"x\"}\n").unwrap();
    let out = kiln(&args(&[
        "rm",
        "score",
        "--device",
        "cpu",
        "--model",
        &d("rm"),
        "--input",
        &d("to-score.jsonl"),
        "--out",
        &d("scored2.jsonl"),
    ]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("to-score.jsonl:1: missing field `response`")
    );
    assert!(!dir.path().join("scored2.jsonl").exists());
}
