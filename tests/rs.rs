//! Rejection sampling end to end on tiny models (CPU): what each round writes, the combined
//! reward against the reward models scoring alone, the pool across rounds, exact resume after
//! SIGKILL during sampling and during fine-tuning, and bad input refused before sampling.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::infer::combined_reward::{Branch, gate};
use kiln::interop::checkpoint;
use kiln::stages::rs::{self, PoolEntry, RoundSummary, SampleRecord};

mod common;
use common::rlhf::{
    Fixture, command_line, finish, fixture, kill_when, kiln, listing, occupied_out, read_lines,
    refused, reward_models,
};

/// The `kiln rs` command line of a fresh run into `out`.
fn rs_args(f: &Fixture, out: &Path) -> Vec<String> {
    let sets = [
        format!("rs.prompts=[\"{}\"]", f.prompts.display()),
        "rs.k=4".into(),
        "rs.iterations=2".into(),
        "rs.max_answer_tokens=10".into(),
        // A 2-step model rarely stops by itself: keep cut answers, or nothing is selected.
        "rs.keep_unfinished=true".into(),
        "rs.batch_prompts=1".into(),
        "rs.temperature=1.2".into(),
        "data.seq_len=64".into(),
        "data.val_fraction=0.2".into(),
        "train.batch_size=2".into(),
        "train.max_steps=12".into(),
        "train.checkpoint_interval=1".into(),
        "train.keep_checkpoints=20".into(),
        "optim.lr=1e-3".into(),
    ];
    command_line("rs", f, out, &sets)
}

/// The samples of a round without their timings (which differ run to run).
fn samples_without_timing(dir: &Path) -> Vec<SampleRecord> {
    read_lines::<SampleRecord>(&dir.join(rs::SAMPLES_FILE))
        .into_iter()
        .map(|mut s| {
            s.sample_s = 0.0;
            s.score_s = 0.0;
            s
        })
        .collect()
}

fn final_weights(run: &Path) -> Vec<u8> {
    std::fs::read(
        checkpoint::resolve(run)
            .unwrap()
            .join(checkpoint::MODEL_FILE),
    )
    .unwrap()
}

#[test]
fn rejection_sampling_rounds_pool_and_resume_exactly_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = 30;
    let f = fixture(dir.path(), prompts);
    let straight = dir.path().join("straight");
    let stderr = finish(kiln(&rs_args(&f, &straight)));
    // The prompt line without `safety` is counted and reported.
    assert!(stderr.contains("1 without a `safety` field"), "{stderr}");
    // `kiln plot` draws the rounds.
    let plot: Vec<String> = vec!["plot".into(), straight.display().to_string()];
    finish(kiln(&plot));
    for png in ["rewards.png", "time.png"] {
        let bytes = std::fs::read(straight.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }

    // What each round wrote.
    let rounds: Vec<RoundSummary> = read_lines(&straight.join(rs::ROUNDS_FILE));
    assert_eq!(rounds.len(), 2);
    let helpful =
        kiln::infer::score::load(&f.helpful, &kiln::device::ComputeDevice::cpu().device).unwrap();
    let safety_rm =
        kiln::infer::score::load(&f.safety, &kiln::device::ComputeDevice::cpu().device).unwrap();
    for (n, summary) in rounds.iter().enumerate() {
        let round = straight.join(format!("round-{}", n + 1));
        let samples = samples_without_timing(&round);
        assert_eq!(samples.len(), prompts * 4);
        assert_eq!(summary.samples, prompts * 4);
        assert_eq!(summary.finish.values().sum::<usize>(), prompts * 4);
        assert!(summary.reward_max >= summary.reward_median);
        assert!(summary.train_steps == 12 && summary.final_val_loss.is_some());
        for s in &samples {
            // The gate, checked on the stored sigmoid scores.
            let expected = gate(s.score.safe, s.safety, 0.15);
            assert_eq!(s.score.branch, expected, "{s:?}");
            let r = match expected {
                Branch::Safety => s.score.safe,
                Branch::Helpfulness => s.score.helpful,
            };
            assert_eq!(s.score.reward, r);
            assert_eq!(s.tokens.len() + s.finished() as usize, s.logprobs.len());
        }
        // The scores (of shared-prefix batches) against each reward model scoring each
        // dialogue alone: tolerance 1e-4 on the sigmoid scale.
        for s in samples.iter().step_by(7) {
            let dialogue = kiln::infer::combined_reward::dialogue(
                &s.prompt,
                &kiln::infer::combined_reward::Answer {
                    text: s.answer.clone(),
                    complete: s.finished(),
                },
            );
            for (rm, stored) in [(&helpful, s.score.helpful), (&safety_rm, s.score.safe)] {
                let alone = kiln::infer::score::score_dialogues(
                    rm,
                    std::slice::from_ref(&dialogue),
                    1,
                    &|_| "sample".into(),
                )
                .unwrap()[0];
                let alone = kiln::infer::score::sigmoid(alone) as f64;
                assert!((alone - stored).abs() < 1e-4, "{stored} vs {alone} alone");
            }
        }
        // The pool: one selected answer per prompt, the best of its candidates; in round 2
        // the candidates are round 1's and round 2's best.
        let pool: Vec<PoolEntry> = read_lines(&round.join(rs::POOL_FILE));
        for p in 0..prompts {
            let candidates: Vec<&PoolEntry> = pool.iter().filter(|e| e.prompt_index == p).collect();
            let selected: Vec<&&PoolEntry> = candidates.iter().filter(|e| e.selected).collect();
            assert_eq!(selected.len(), 1, "prompt {p}");
            let best = candidates
                .iter()
                .map(|e| e.score.reward)
                .fold(f64::MIN, f64::max);
            assert_eq!(selected[0].score.reward, best);
            let round_best = samples
                .iter()
                .filter(|s| s.prompt_index == p)
                .map(|s| s.score.reward)
                .fold(f64::MIN, f64::max);
            assert!(
                candidates
                    .iter()
                    .any(|e| e.round == n + 1 && e.score.reward == round_best)
            );
            assert!(candidates.len() <= n + 1);
        }
        if n == 1 {
            assert!(
                pool.iter().any(|e| e.round == 1),
                "round 2's pool keeps round 1's answers"
            );
        }
        let train = std::fs::read_to_string(round.join(rs::TRAIN_FILE)).unwrap();
        assert_eq!(train.lines().count(), prompts);
    }
    let summary: RoundSummary = serde_json::from_str(
        &std::fs::read_to_string(straight.join("round-2").join(rs::SUMMARY_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(summary, rounds[1]);

    // Killed during sampling, then during fine-tuning, then resumed with --resume alone.
    let killed = dir.path().join("killed");
    let round1 = killed.join("round-1");
    let samples_file = round1.join(rs::SAMPLES_FILE);
    let pool_file = round1.join(rs::POOL_FILE);
    // Kill points drawn afresh each run (the seed is printed): after some batches of
    // sampling, at some step of round 1's fine-tuning.
    use rand::Rng;
    let mut rng = common::rng();
    // Several batches and steps before the end, so a slow poll still lands inside.
    let kill_after_lines = 4 * rng.random_range(1..prompts - 6);
    let kill_at_step = rng.random_range(1..8u64);
    let in_sampling = || {
        std::fs::read_to_string(&samples_file).is_ok_and(|t| t.lines().count() >= kill_after_lines)
            && !pool_file.exists()
    };
    assert!(kill_when(kiln(&rs_args(&f, &killed)), &in_sampling));
    assert!(!pool_file.exists(), "the kill came after sampling");
    let lines_before = std::fs::read_to_string(&samples_file)
        .unwrap()
        .lines()
        .count();
    assert!(lines_before < prompts * 4, "sampling had finished");
    // What a kill in the middle of appending a batch leaves: a torn last line.
    let mut torn = std::fs::OpenOptions::new()
        .append(true)
        .open(&samples_file)
        .unwrap();
    std::io::Write::write_all(&mut torn, b"{\"round\":1,\"batch\":").unwrap();
    drop(torn);

    let resume: Vec<String> = ["rs", "--resume", "--device", "cpu", "--out"]
        .iter()
        .map(|s| s.to_string())
        .chain([killed.display().to_string()])
        .collect();
    let checkpoints = round1.join("checkpoints");
    let summary_file = round1.join(rs::SUMMARY_FILE);
    let in_training = || {
        checkpoint::list(&checkpoints).is_ok_and(|c| c.last().is_some_and(|s| s.0 >= kill_at_step))
            && !summary_file.exists()
    };
    assert!(kill_when(kiln(&resume), &in_training));
    let steps = checkpoint::list(&checkpoints).unwrap();
    assert!(
        !summary_file.exists(),
        "the kill came after round 1's fine-tuning"
    );
    assert!(steps.last().unwrap().0 < 12, "fine-tuning had finished");
    eprintln!(
        "killed after {lines_before} sample lines, then at fine-tuning step {}",
        steps.last().unwrap().0
    );
    finish(kiln(&resume));

    for round in ["round-1", "round-2"] {
        let (a, b) = (straight.join(round), killed.join(round));
        assert!(
            samples_without_timing(&a) == samples_without_timing(&b),
            "{round}: samples differ"
        );
        for file in [rs::POOL_FILE, rs::TRAIN_FILE] {
            assert!(
                std::fs::read(a.join(file)).unwrap() == std::fs::read(b.join(file)).unwrap(),
                "{round}: {file} differs"
            );
        }
        assert!(
            final_weights(&a) == final_weights(&b),
            "{round}: weights differ"
        );
    }
}

#[test]
fn bad_input_is_refused_before_sampling_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path(), 6);
    let out = occupied_out(dir.path());
    let before = listing(&out);
    let run_with = |extra: &[String], fixture: &Fixture| refused(rs_args(fixture, &out), extra);
    let prompts_file = |name: &str, text: &str| -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        format!("rs.prompts=[\"{}\"]", path.display())
    };

    let e = run_with(&["rs.k=0".into()], &f);
    assert!(e.contains("rs.k"), "{e}");
    let e = run_with(
        &[prompts_file(
            "empty.jsonl",
            "{\"prompt\": \"Hi\"}\n{\"prompt\": \"\", \"safety\": false}\n",
        )],
        &f,
    );
    assert!(
        e.contains("empty.jsonl:2") && e.contains("empty prompt"),
        "{e}"
    );
    let long = "word ".repeat(80);
    let e = run_with(
        &[prompts_file(
            "long.jsonl",
            &format!("{{\"prompt\": \"Hi\"}}\n{{\"prompt\": \"{long}\"}}\n"),
        )],
        &f,
    );
    assert!(e.contains("long.jsonl:2") && e.contains("context"), "{e}");
    let e = run_with(
        &[prompts_file(
            "bad.jsonl",
            "{\"prompt\": \"Hi\"}\n{\"prompt\": \"Hi\", \"safety\": 1}\n",
        )],
        &f,
    );
    assert!(e.contains("bad.jsonl:2") && e.contains("safety"), "{e}");
    // The reward models swapped: each is of the other kind.
    let swapped = Fixture {
        init: f.init.clone(),
        helpful: f.safety.clone(),
        safety: f.helpful.clone(),
        prompts: f.prompts.clone(),
    };
    let e = run_with(&[], &swapped);
    assert!(
        e.contains("safety reward model where the helpfulness"),
        "{e}"
    );

    // A safety reward model of another tokenizer (its own BPE, trained on other text).
    let other_pre = common::rlhf::other_tokenizer_model(dir.path());
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let (_, other_safety) = reward_models(&other_dir, &other_pre);
    let mismatched = Fixture {
        safety: other_safety.clone(),
        ..Fixture {
            init: f.init.clone(),
            helpful: f.helpful.clone(),
            safety: PathBuf::new(),
            prompts: f.prompts.clone(),
        }
    };
    let e = run_with(&[], &mismatched);
    assert!(
        e.contains("another tokenizer")
            && e.contains(&other_safety.display().to_string())
            && e.contains(&f.init.display().to_string()),
        "{e}"
    );
    assert_eq!(listing(&out), before, "a refused run wrote into --out");
}

#[test]
fn the_reward_curve_rises_with_k() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path(), 10);
    let out = dir.path().join("curve");
    let mut args: Vec<String> = ["rs", "curve", "--device", "cpu", "--k", "1,2,4,8"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (flag, value) in [
        ("--policy", f.init.display().to_string()),
        ("--rm-helpful", f.helpful.display().to_string()),
        ("--rm-safety", f.safety.display().to_string()),
        ("--prompts", f.prompts.display().to_string()),
        ("--out", out.display().to_string()),
        ("--temperatures", "0.7,1.3".into()),
        ("--max-answer-tokens", "8".into()),
        ("--limit", "6".into()),
    ] {
        args.extend([flag.to_string(), value]);
    }
    finish(kiln(&args));
    let points: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("curve.json")).unwrap()).unwrap();
    assert_eq!(points.len(), 8);
    let get = |p: &serde_json::Value, key: &str| p[key].as_f64().unwrap();
    for t in [0.7, 1.3] {
        let curve: Vec<&serde_json::Value> = points
            .iter()
            .filter(|p| get(p, "temperature") == t)
            .collect();
        let ks: Vec<f64> = curve.iter().map(|p| get(p, "k")).collect();
        assert_eq!(ks, vec![1.0, 2.0, 4.0, 8.0]);
        // With one answer the best is the median; the best of more answers never falls,
        // and never lies below the median.
        assert!((get(curve[0], "max_reward") - get(curve[0], "median_reward")).abs() < 1e-12);
        for w in curve.windows(2) {
            assert!(get(w[1], "max_reward") >= get(w[0], "max_reward"), "{w:?}");
        }
        for p in &curve {
            assert!(get(p, "max_reward") >= get(p, "median_reward"), "{p}");
        }
    }
    assert_eq!(&std::fs::read(out.join("curve.png")).unwrap()[1..4], b"PNG");
    // A second run refuses to replace the first's files.
    let again = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
}
