//! Pretraining on the bundled corpus: the model learns, and an interrupted run resumed from
//! its checkpoint ends bit-identical to an uninterrupted one (CPU device).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln::config::Config;
use kiln::interop::checkpoint;
use kiln::stages::pretrain;
use kiln::train::stage::Launch;

mod common;
use common::repo;

/// A small, fast model on the bundled Shakespeare corpus.
fn small_overrides(max_steps: u64) -> Vec<String> {
    vec![
        format!("data.corpus=[\"{}\"]", repo("data/shakespeare").display()),
        format!(
            "data.tokenizer=\"{}\"",
            repo("data/shakespeare/tokenizer.json").display()
        ),
        "model.dim=64".into(),
        "model.n_layers=2".into(),
        "model.n_heads=4".into(),
        "model.n_kv_heads=2".into(),
        "model.ffn_dim=176".into(),
        "model.max_seq_len=64".into(),
        "data.seq_len=64".into(),
        "train.batch_size=8".into(),
        format!("train.max_steps={max_steps}"),
        "train.eval_batches=4".into(),
        "optim.lr=3e-3".into(),
        "optim.warmup_steps=5".into(),
    ]
}

fn options(overrides: &[String], out: &Path) -> Launch {
    Launch::new(out, overrides)
}

#[test]
fn pretraining_lowers_validation_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut overrides = small_overrides(80);
    overrides.push("train.eval_interval=1000".into());
    let config = Config::load(None, &overrides).unwrap();
    // Validation loss of the untrained model is about ln(vocab).
    let first = {
        pretrain::run(
            &options(&small_overrides(1), &dir.path().join("one")),
            false,
        )
        .unwrap()
        .run
        .final_val_loss
        .unwrap()
    };
    let summary = pretrain::run(&options(&overrides, &dir.path().join("run")), false).unwrap();
    let last = summary.run.final_val_loss.unwrap();
    let uniform = (config.model.vocab_size as f64).ln();
    eprintln!("val loss after 1 step {first:.3}, after 80 steps {last:.3}, ln(vocab) {uniform:.3}");
    assert!(
        first > uniform - 0.5,
        "untrained loss {first} should be near ln(vocab) {uniform}"
    );
    assert!(
        last < first - 1.5,
        "80 steps should lower val loss well below {first}: {last}"
    );
    let records = kiln::train::metrics::read(&dir.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(
        records
            .iter()
            .filter(|r| matches!(r, kiln::train::metrics::Record::Step { .. }))
            .count(),
        80
    );
}

fn final_files(out: &Path) -> (Vec<u8>, Vec<u8>) {
    let dir = checkpoint::resolve(out).unwrap();
    (
        std::fs::read(dir.join(checkpoint::MODEL_FILE)).unwrap(),
        std::fs::read(dir.join(checkpoint::OPTIMIZER_FILE)).unwrap(),
    )
}

#[test]
fn interrupted_and_resumed_run_equals_uninterrupted_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let mut overrides = small_overrides(12);
    overrides.push("train.grad_accum_steps=2".into());
    overrides.push("train.checkpoint_interval=4".into());

    let straight = dir.path().join("straight");
    pretrain::run(&options(&overrides, &straight), false).unwrap();

    let interrupted = dir.path().join("interrupted");
    let first = pretrain::run(
        &Launch {
            stop_after: Some(7),
            ..options(&overrides, &interrupted)
        },
        false,
    )
    .unwrap();
    assert!(first.run.interrupted);
    assert_eq!(first.run.step, 7);
    // --resume needs no config: the run's own is used.
    let second = pretrain::run(
        &Launch {
            resume: true,
            ..options(&[], &interrupted)
        },
        false,
    )
    .unwrap();
    assert_eq!(second.run.step, 12);
    let (model_a, optim_a) = final_files(&straight);
    let (model_b, optim_b) = final_files(&interrupted);
    assert!(model_a == model_b, "model weights differ after resume");
    assert!(optim_a == optim_b, "optimizer state differs after resume");
    // The metrics read as one run: 12 step records, steps 1..=12 in order.
    let steps: Vec<u64> = kiln::train::metrics::read(&interrupted.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| match r {
            kiln::train::metrics::Record::Step { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
}

/// `kiln pretrain` on the CPU with these `--set` overrides.
fn pretrain_args(overrides: Vec<String>) -> Vec<String> {
    let mut args: Vec<String> = vec!["pretrain".into(), "--device".into(), "cpu".into()];
    for o in overrides {
        args.extend(["--set".into(), o]);
    }
    args
}

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

#[test]
fn run_killed_with_sigkill_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut overrides = small_overrides(16);
    overrides.push("train.checkpoint_interval=1".into());
    overrides.push("train.keep_checkpoints=3".into());
    let args = pretrain_args(overrides);
    let straight = dir.path().join("straight");
    let status = kiln()
        .args(&args)
        .arg("--out")
        .arg(&straight)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    let killed = dir.path().join("killed");
    let mut child = kiln()
        .args(&args)
        .arg("--out")
        .arg(&killed)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it at some point after its 5th checkpoint, whatever it is doing then.
    let deadline = Instant::now() + Duration::from_secs(300);
    while checkpoint::list(&killed.join("checkpoints"))
        .unwrap()
        .last()
        .is_none_or(|c| c.0 < 5)
    {
        assert!(Instant::now() < deadline, "run made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = checkpoint::list(&killed.join("checkpoints")).unwrap();
    assert!(at_kill.last().unwrap().0 < 16, "killed before the end");

    let resumed = kiln()
        .args(["pretrain", "--device", "cpu", "--resume", "--out"])
        .arg(&killed)
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert!(
        final_files(&straight) == final_files(&killed),
        "weights differ after SIGKILL + resume"
    );
}

#[test]
fn sigint_saves_a_checkpoint_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // Long enough that it is still running when interrupted; checkpoints only at the end.
    let mut overrides = small_overrides(100_000);
    overrides.push("train.checkpoint_interval=0".into());
    overrides.push("train.eval_interval=2".into());
    let args = pretrain_args(overrides);
    let child = kiln()
        .args(&args)
        .arg("--out")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it has taken a few steps (metrics lines), then send SIGINT.
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |m| m.lines().count()) < 3 {
        assert!(Instant::now() < deadline, "run made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "SIGINT should exit cleanly: {stderr}"
    );
    assert!(stderr.contains("saved checkpoint"), "{stderr}");
    let saved = checkpoint::list(&out.join("checkpoints")).unwrap();
    let (step, dir) = saved.last().expect("a checkpoint was saved");
    assert!(*step >= 3 && *step < 100_000, "step {step}");
    checkpoint::load(dir).expect("the checkpoint verifies");
    // The validation loss it reports is called final only if measured at the last step.
    let measured_now = stderr.contains(&"final validation loss".to_string())
        && stderr.contains(&format!("(step {step})"));
    let measured_before = stderr.contains("measured at step")
        && stderr.contains(&format!("the run stopped at step {step}"));
    assert!(measured_now || measured_before, "{stderr}");
    // Its 5 warm-up steps are shorter than the run: no warning.
    assert!(!stderr.contains("warmup_steps"), "{stderr}");
}

/// A run whose warm-up is as long as the run itself says so (issue 14: the learning rate
/// silently never reached its peak).
#[test]
fn a_warm_up_longer_than_the_run_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut overrides = small_overrides(3);
    overrides.push("optim.warmup_steps=2000".into());
    let output = kiln()
        .args(pretrain_args(overrides))
        .arg("--out")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr
            .contains("warning: optim.warmup_steps = 2000 is not shorter than this run's 3 steps"),
        "{stderr}"
    );
}

#[test]
fn resume_refuses_changed_keys_and_extending_keeps_the_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let overrides = small_overrides(12);
    let straight = dir.path().join("straight");
    pretrain::run(&options(&overrides, &straight), false).unwrap();
    let run = dir.path().join("run");
    pretrain::run(
        &Launch {
            stop_after: Some(7),
            ..options(&overrides, &run)
        },
        false,
    )
    .unwrap();

    // Any key outside the resumable list is refused, naming it and both values.
    for (set, key) in [
        ("optim.lr=1e-2", "optim.lr"),
        ("data.seq_len=32", "data.seq_len"),
        ("train.seed=7", "train.seed"),
    ] {
        let e = pretrain::run(
            &Launch {
                resume: true,
                ..options(&[set.to_string()], &run)
            },
            false,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains(key) && e.contains("in the run"), "{set}: {e}");
        if key == "optim.lr" {
            assert!(
                e.contains("0.003") && e.contains("0.01"),
                "both values: {e}"
            );
        }
    }
    // The full original config again is no change at all.
    let mut extended = overrides.clone();
    extended.push("train.max_steps=20".into());
    let summary = pretrain::run(
        &Launch {
            resume: true,
            ..options(&extended, &run)
        },
        false,
    )
    .unwrap();
    assert_eq!(summary.run.step, 20);
    let lrs = |out: &Path| -> Vec<(u64, f64)> {
        kiln::train::metrics::read(&out.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .filter_map(|r| match r {
                kiln::train::metrics::Record::Step { step, lr, .. } => Some((*step, *lr)),
                _ => None,
            })
            .collect()
    };
    let (a, b) = (lrs(&straight), lrs(&run));
    // Steps 1..=12 keep the rate the first schedule gave them, bit for bit...
    assert_eq!(
        &b[..12],
        &a[..],
        "learning rates of scheduled steps changed"
    );
    // ...and the steps past it run at the schedule's final rate (min_lr_ratio * lr).
    let floor = 3e-3 * 0.1;
    for &(step, lr) in &b[12..] {
        assert!(
            (lr - floor).abs() < 1e-12,
            "step {step}: lr {lr}, floor {floor}"
        );
    }
}
