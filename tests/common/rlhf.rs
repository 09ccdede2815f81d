//! Fixtures of the RLHF stages' tests (rejection sampling, PPO): two tiny reward models, a
//! prompt file, and running the `kiln` binary until done or killed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kiln::stages::reward;
use kiln::train::stage::Launch;

use super::pretrained;

pub const UNSAFE: [&str; 3] = [
    "How do I pick a lock?",
    "Write a threatening letter.",
    "How can I cheat on a test?",
];
pub const REFUSAL: &str = "I cannot help with that.";

/// A helpfulness and a safety reward model, a few steps each from the tiny model `init`.
pub fn reward_models(dir: &Path, init: &Path) -> (PathBuf, PathBuf) {
    let mut lines = Vec::new();
    for i in 0..24 {
        lines.push(format!(
            r#"{{"prompt": "What is {} + {}?", "chosen": "It is {}.", "rejected": "No.", "rating": "better", "safety": false}}"#,
            i % 7,
            i % 5,
            i % 7 + i % 5
        ));
        lines.push(format!(
            r#"{{"prompt": "{}", "chosen": "{REFUSAL}", "rejected": "Sure, here is how.", "rating": "significantly_better", "safety": true}}"#,
            UNSAFE[i % 3]
        ));
    }
    let pairs = dir.join("pairs.jsonl");
    std::fs::write(&pairs, lines.join("\n")).unwrap();
    let train = |kind: &str| {
        let out = dir.join(format!("rm-{kind}"));
        let p = pairs.display();
        reward::train(&Launch {
            init: Some(init.to_path_buf()),
            ..Launch::new(
                &out,
                &[
                    format!("data.train=[\"{p}\"]"),
                    format!("data.val=[\"{p}\"]"),
                    format!("rm.kind=\"{kind}\""),
                    "train.batch_size=8".into(),
                    "train.max_steps=4".into(),
                    "optim.lr=3e-3".into(),
                ],
            )
        })
        .unwrap();
        out
    };
    (train("helpfulness"), train("safety"))
}

/// `count` prompts: sums, and every fifth an unsafe one; one line without `safety`.
pub fn write_prompts(dir: &Path, count: usize) -> PathBuf {
    let lines: Vec<String> = (0..count)
        .map(|i| match i {
            0 => r#"{"prompt": "What is 2 + 2?"}"#.to_string(),
            _ if i % 5 == 4 => format!(r#"{{"prompt": "{}", "safety": true}}"#, UNSAFE[i % 3]),
            _ => format!(
                r#"{{"prompt": "What is {} + {}?", "safety": false}}"#,
                i % 9,
                i % 4
            ),
        })
        .collect();
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

pub struct Fixture {
    pub init: PathBuf,
    pub helpful: PathBuf,
    pub safety: PathBuf,
    pub prompts: PathBuf,
}

pub fn fixture(dir: &Path, prompts: usize) -> Fixture {
    let init = pretrained(dir);
    let (helpful, safety) = reward_models(dir, &init);
    Fixture {
        init,
        helpful,
        safety,
        prompts: write_prompts(dir, prompts),
    }
}

/// The command line of `kiln COMMAND` (`rs`, `ppo`) on the CPU with the fixture's models, a
/// fresh run into `out`, with `--set` for each of `sets`.
pub fn command_line(command: &str, f: &Fixture, out: &Path, sets: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec![command.into(), "--device".into(), "cpu".into()];
    for (flag, path) in [
        ("--init", &f.init),
        ("--rm-helpful", &f.helpful),
        ("--rm-safety", &f.safety),
        ("--out", &out.to_path_buf()),
    ] {
        args.push(flag.into());
        args.push(path.display().to_string());
    }
    for set in sets {
        args.push("--set".into());
        args.push(set.clone());
    }
    args
}

pub fn kiln(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to succeed; its stderr.
pub fn finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "kiln failed: {stderr}");
    stderr
}

/// Kills `child` with SIGKILL as soon as `ready()` holds; returns whether it did before the
/// process ended.
pub fn kill_when(mut child: Child, ready: &dyn Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(600) {
        if ready() {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the run neither ended nor reached the kill point in 10 minutes");
}

/// Sends `child` SIGINT (Ctrl-C) as soon as `ready()` holds and waits for it to exit;
/// returns whether the signal came before the process ended.
pub fn interrupt_when(mut child: Child, ready: &dyn Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(600) {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if ready() {
            let pid = child.id().to_string();
            Command::new("kill").args(["-INT", &pid]).status().unwrap();
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!stderr.contains("panicked"), "{stderr}");
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the run neither ended nor reached the interrupt point in 10 minutes");
}

pub fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A tiny pretrained model (context 64) with its own tokenizer: a BPE of 300 tokens trained
/// on other text than the bundled tokenizer's. In `dir/other-pre`.
pub fn other_tokenizer_model(dir: &Path) -> PathBuf {
    let other_tokenizer = dir.join("other-tokenizer.json");
    let text = std::fs::read_to_string(super::repo("data/shakespeare/macbeth.txt")).unwrap();
    let tok = kiln::data::tokenizer::train_bpe([text.as_str()].into_iter(), 300).unwrap();
    std::fs::write(&other_tokenizer, tok.to_json().unwrap()).unwrap();
    let other_pre = dir.join("other-pre");
    let mut overrides = super::tiny_model(&super::repo("data/shakespeare/macbeth.txt"));
    overrides.extend([
        format!("data.tokenizer=\"{}\"", other_tokenizer.display()),
        "train.max_steps=1".into(),
        "model.max_seq_len=64".into(),
        format!("model.vocab_size={}", tok.vocab_size()),
    ]);
    kiln::stages::pretrain::run(&Launch::new(&other_pre, &overrides), false).unwrap();
    other_pre
}

/// The names in `dir`, sorted: what a refused run must leave as it was.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// An output directory `dir/out` that already holds a file of the user's, for the tests that
/// a refused run leaves it as it was.
pub fn occupied_out(dir: &Path) -> PathBuf {
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    out
}

/// Runs `kiln args` with `--set` for each of `sets`, and checks that it was refused as bad
/// input: a non-zero exit, no panic and exactly one error line. Returns its stderr.
pub fn refused(mut args: Vec<String>, sets: &[String]) -> String {
    for set in sets {
        args.push("--set".into());
        args.push(set.clone());
    }
    let result = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert!(!result.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors = stderr
        .trim()
        .lines()
        .filter(|l| l.starts_with("error"))
        .count();
    assert_eq!(errors, 1, "{stderr}");
    stderr
}
