//! Every training stage through the one launcher (CPU): training lowers the loss, and a run
//! killed mid-way and resumed with `--resume` alone ends with bit-identical weights and
//! optimizer state to an uninterrupted run. Also: `--init` from a GGUF file.

use std::path::{Path, PathBuf};

use anyhow::Result;
use kiln::interop::checkpoint;
use kiln::stages::{gatt, pretrain, reward, sft};
use kiln::train::stage::Launch;

mod common;
use common::{pretrained, repo, step_losses};

fn final_files(out: &Path) -> (Vec<u8>, Vec<u8>) {
    let dir = checkpoint::resolve(out).unwrap();
    (
        std::fs::read(dir.join(checkpoint::MODEL_FILE)).unwrap(),
        std::fs::read(dir.join(checkpoint::OPTIMIZER_FILE)).unwrap(),
    )
}

/// Runs `stage` straight through, and again killed after step 5 (checkpoints every 2 steps,
/// so the newest on disk is step 4 when the process dies), then resumed with no config at
/// all. Returns the uninterrupted run's directory after asserting both end bit-identical.
fn assert_exact_resume(dir: &Path, base: Launch, stage: &dyn Fn(&Launch) -> Result<()>) -> PathBuf {
    let mut overrides = base.overrides.clone();
    overrides.extend([
        "train.checkpoint_interval=2".into(),
        "train.keep_checkpoints=5".into(),
    ]);
    let straight = Launch {
        out_dir: dir.join("straight"),
        overrides: overrides.clone(),
        ..base.clone()
    };
    stage(&straight).unwrap();
    let killed = Launch {
        out_dir: dir.join("killed"),
        overrides,
        stop_after: Some(5),
        ..base.clone()
    };
    stage(&killed).unwrap();
    // What a SIGKILL after step 5, before its checkpoint, leaves: checkpoints up to step 4.
    let checkpoints = killed.out_dir.join("checkpoints");
    std::fs::remove_dir_all(checkpoints.join(checkpoint::step_dir_name(5))).unwrap();
    assert_eq!(checkpoint::list(&checkpoints).unwrap().last().unwrap().0, 4);
    stage(&Launch {
        config: None,
        overrides: Vec::new(),
        init: None,
        resume: true,
        stop_after: None,
        ..killed.clone()
    })
    .unwrap();
    assert!(
        final_files(&straight.out_dir) == final_files(&killed.out_dir),
        "weights or optimizer state differ after kill and resume"
    );
    // The metrics read as one run.
    assert_eq!(step_losses(&killed.out_dir), step_losses(&straight.out_dir));
    straight.out_dir
}

/// The mean of the first and of the last three step losses (in nats: a drop of 0.5 is
/// well beyond step-to-step noise on these data).
fn first_and_last(losses: &[f64]) -> (f64, f64) {
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&losses[..3]), mean(&losses[losses.len() - 3..]))
}

#[test]
fn sft_learns_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let init = pretrained(dir.path());
    let (train, val) = common::write_sft_data(dir.path());
    let base = Launch {
        init: Some(init),
        ..Launch::new(
            Path::new("unused"),
            &[
                format!("data.train=[\"{train}\"]"),
                format!("data.val=[\"{val}\"]"),
                "data.seq_len=64".into(),
                "train.batch_size=4".into(),
                "train.grad_accum_steps=2".into(),
                "train.max_steps=16".into(),
                "optim.lr=3e-3".into(),
            ],
        )
    };
    let run = assert_exact_resume(dir.path(), base, &|l| sft::run(l).map(|_| ()));
    let (first, last) = first_and_last(&step_losses(&run));
    eprintln!("SFT loss: first steps {first:.3}, last steps {last:.3}");
    assert!(
        last < first - 0.5,
        "SFT should lower the loss: {first} -> {last}"
    );
}

#[test]
fn reward_model_learns_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let init = pretrained(dir.path());
    // The chosen answer states the sum, the rejected one refuses: easy to tell apart.
    let ratings = ["significantly_better", "better", "slightly_better"];
    let lines: Vec<String> = (0..48)
        .map(|i| {
            format!(
                r#"{{"prompt": "What is {} + {}?", "chosen": "It is {}.", "rejected": "No.", "rating": "{}", "safety": false}}"#,
                i % 7,
                i % 5,
                i % 7 + i % 5,
                ratings[i % 3]
            )
        })
        .collect();
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(&pairs, lines.join("\n")).unwrap();
    let p = pairs.display();
    let base = Launch {
        init: Some(init),
        ..Launch::new(
            Path::new("unused"),
            &[
                format!("data.train=[\"{p}\"]"),
                format!("data.val=[\"{p}\"]"),
                "rm.kind=\"helpfulness\"".into(),
                "train.batch_size=8".into(),
                "train.max_steps=14".into(),
                "optim.lr=3e-3".into(),
            ],
        )
    };
    let run = assert_exact_resume(dir.path(), base, &|l| reward::train(l).map(|_| ()));
    let (first, last) = first_and_last(&step_losses(&run));
    eprintln!("ranking loss: first steps {first:.3}, last steps {last:.3}");
    assert!(
        last < 0.8 * first,
        "the reward model should learn: {first} -> {last}"
    );

    // Scoring a dialogue longer than the reward model's context (64) names file and line,
    // and writes nothing.
    let input = dir.path().join("score.jsonl");
    let long = "word ".repeat(200);
    std::fs::write(
        &input,
        format!(
            "{{\"prompt\": \"What is 1 + 1?\", \"response\": \"It is 2.\"}}\n{{\"prompt\": \"Hi\", \"response\": \"{long}\"}}\n"
        ),
    )
    .unwrap();
    let scored = dir.path().join("scored.jsonl");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["rm", "score", "--device", "cpu", "--model"])
        .arg(&run)
        .arg("--input")
        .arg(&input)
        .arg("--out")
        .arg(&scored)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("score.jsonl:2") && stderr.contains("context of 64"),
        "{stderr}"
    );
    assert!(!scored.exists());
    // The same for `kiln rm eval` on a pair with such an answer (issue 14, item 12).
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        format!(
            "{{\"prompt\": \"Hi\", \"chosen\": \"Hello.\", \"rejected\": \"No.\", \"rating\": \"better\"}}\n{{\"prompt\": \"Hi\", \"chosen\": \"{long}\", \"rejected\": \"No.\", \"rating\": \"better\"}}\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["rm", "eval", "--device", "cpu", "--model"])
        .arg(&run)
        .arg("--input")
        .arg(&pairs)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pairs.jsonl:2") && stderr.contains("context of 64"),
        "{stderr}"
    );
}

#[test]
fn gatt_learns_and_resumes_exactly_from_its_own_config() {
    let dir = tempfile::tempdir().unwrap();
    let init = pretrained(dir.path());
    let [dialogues, instructions] = common::gatt_inputs(dir.path(), 12);
    let base = Launch {
        init: Some(init),
        ..Launch::new(
            Path::new("unused"),
            &[
                dialogues,
                instructions,
                // A 2-step model never stops by itself: its answers are cut and kept
                // without the end marker (with `drop` nothing would be left to train).
                "gatt.max_answer_tokens=6".into(),
                "gatt.cut_answers=\"keep\"".into(),
                "gatt.batch_size=12".into(),
                "data.seq_len=64".into(),
                "data.val_fraction=0.2".into(),
                "train.batch_size=2".into(),
                "train.max_steps=16".into(),
                "optim.lr=3e-3".into(),
            ],
        )
    };
    let run = assert_exact_resume(dir.path(), base, &|l| gatt::run(l).map(|_| ()));
    // Every answer was cut, so no sample trains an end marker after its last answer.
    let samples = std::fs::read_to_string(run.join(gatt::SAMPLES_FILE)).unwrap();
    assert!(samples.lines().count() >= 12, "{samples}");
    assert!(samples.contains("\"complete\":false"), "{samples}");
    let (first, last) = first_and_last(&step_losses(&run));
    eprintln!("GAtt loss: first steps {first:.3}, last steps {last:.3}");
    assert!(
        last < first - 0.5,
        "GAtt should lower the loss: {first} -> {last}"
    );
}

/// Issue 14, item 3: a bad input of GAtt is reported before any sampling, and an earlier
/// samples file in `--out` is left as it was.
#[test]
fn gatt_checks_every_input_before_it_samples() {
    let dir = tempfile::tempdir().unwrap();
    let init = pretrained(dir.path());
    let instructions = dir.path().join("instructions.jsonl");
    std::fs::write(&instructions, "{\"text\": \"Be brief.\"}\n").unwrap();
    let dialogues = dir.path().join("dialogues.jsonl");
    std::fs::write(
        &dialogues,
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]}"#,
    )
    .unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": 3}\n").unwrap();
    let out = dir.path().join("gatt");
    std::fs::create_dir_all(&out).unwrap();
    let earlier = "{\"messages\": []} earlier samples\n";
    std::fs::write(out.join(gatt::SAMPLES_FILE), earlier).unwrap();
    let e = gatt::run(&Launch {
        init: Some(init),
        ..Launch::new(
            &out,
            &[
                format!("gatt.dialogues=[\"{}\"]", dialogues.display()),
                format!("gatt.instructions=\"{}\"", instructions.display()),
                format!("data.train=[\"{}\"]", bad.display()),
            ],
        )
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("bad.jsonl:1"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join(gatt::SAMPLES_FILE)).unwrap(),
        earlier
    );
}

#[test]
fn stages_check_init_and_resume_only_their_own_runs() {
    let dir = tempfile::tempdir().unwrap();
    let overrides = common::tiny_model(&repo("data/shakespeare/macbeth.txt"));
    let e = pretrain::run(
        &Launch {
            init: Some(dir.path().to_path_buf()),
            ..Launch::new(&dir.path().join("a"), &overrides)
        },
        false,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("--init"), "{e}");
    let (train, _) = common::write_sft_data(dir.path());
    let e = sft::run(&Launch::new(
        &dir.path().join("b"),
        &[format!("data.train=[\"{train}\"]")],
    ))
    .err()
    .unwrap();
    assert!(e.to_string().contains("--init is required"), "{e}");
    assert!(!dir.path().join("a").exists() && !dir.path().join("b").exists());
    // A run of another stage is not resumed as this one.
    let pre = pretrained(dir.path());
    let e = sft::run(&Launch {
        resume: true,
        ..Launch::new(&pre, &[])
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("is not a run of `kiln sft`"), "{e}");
}

/// `kiln sft --init model.gguf` fine-tunes SmolLM2 straight from its GGUF file, and
/// `kiln eval gym --checkpoint` takes the Hugging Face export of the result.
#[test]
fn sft_starts_from_a_gguf_file_and_eval_takes_a_hugging_face_directory() {
    let Some(gguf) = common::smollm2() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = common::write_sft_data(dir.path());
    let out = dir.path().join("sft");
    let summary = sft::run(&Launch {
        init: Some(gguf),
        ..Launch::new(
            &out,
            &[
                format!("data.train=[\"{train}\"]"),
                format!("data.val=[\"{val}\"]"),
                "data.template=\"chatml\"".into(),
                "data.seq_len=64".into(),
                "train.batch_size=2".into(),
                "train.max_steps=1".into(),
                "train.eval_batches=1".into(),
            ],
        )
    })
    .unwrap();
    assert_eq!(summary.step, 1);
    assert!(summary.final_val_loss.unwrap().is_finite());

    // Export to Hugging Face and evaluate that directory on a tiny gym.
    let kiln = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(repo(""))
            .output()
            .unwrap()
    };
    let hf = dir.path().join("hf");
    let data = dir.path().join("gym");
    for args in [
        vec![
            "convert",
            out.to_str().unwrap(),
            "--out",
            hf.to_str().unwrap(),
        ],
        vec!["gym", "generate", "--out", data.to_str().unwrap()],
    ] {
        let o = kiln(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let o = kiln(&[
        "eval",
        "gym",
        "--checkpoint",
        hf.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "2",
        "--device",
        "cpu",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["tasks"].as_u64().unwrap() > 0, "{report}");
}
