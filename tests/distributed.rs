//! Data-parallel training equals training alone: N workers with a global batch of B, each
//! taking its slice, give the per-step losses and final weights of one process with batch B.
//! Workers are threads on devices of one process (`--devices`, host-staged all-reduce) and,
//! with the `mpi` feature, the ranks of `mpirun -n 2`.
//!
//! Tolerance: relative 1e-5 on losses and on the L2 distance of the weights. The gradient of
//! a global batch is summed in another order when it is split (per-worker partial sums, then
//! the all-reduce), so the bits differ in the last places; 6 AdamW steps at a high learning
//! rate keep that well under 1e-5 (measured: 1.6e-7 pretraining, 4.7e-8 SFT, 1.5e-7 reward
//! model on two CPU workers; 1.3e-6 with a CPU and a lavapipe worker).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln::interop::checkpoint::{self, NamedTensor};

mod common;
use common::{pretrained, relative_distance, repo, step_losses, tiny_model, write_sft_data};

const TOLERANCE: f64 = 1e-5;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

fn ok(output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{stderr}");
    stderr
}

/// `--set` flags.
fn set(overrides: &[String]) -> Vec<String> {
    overrides
        .iter()
        .flat_map(|o| ["--set".to_string(), o.clone()])
        .collect()
}

/// Pretraining of the tiny model: 6 steps of 2 micro-batches of 5 sequences (an odd batch,
/// so two workers split it 2 + 3), at a learning rate high enough to move every weight.
fn pretrain_overrides() -> Vec<String> {
    let mut o = tiny_model(&repo("data/shakespeare/macbeth.txt"));
    o.extend(
        [
            "train.max_steps=6",
            "train.batch_size=5",
            "train.grad_accum_steps=2",
            "train.eval_interval=3",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
        ]
        .map(String::from),
    );
    o
}

/// SFT from a pretrained tiny model on dialogues whose answers differ in length, 3 per
/// micro-batch (split 1 + 2): the step must weigh every answer token alike, not average the
/// workers' means.
fn sft_overrides(dir: &Path) -> Vec<String> {
    let (train, val) = write_sft_data(dir);
    [
        format!("data.train=[\"{train}\"]"),
        format!("data.val=[\"{val}\"]"),
        "data.pack=false".into(),
        "train.max_steps=6".into(),
        "train.batch_size=3".into(),
        "train.eval_interval=3".into(),
        "optim.lr=1e-2".into(),
        "optim.warmup_steps=0".into(),
    ]
    .to_vec()
}

fn final_weights(out: &Path) -> Vec<NamedTensor> {
    checkpoint::load(&checkpoint::resolve(out).unwrap())
        .unwrap()
        .model
}

/// Asserts that the data-parallel run in `parallel` trained like the single run in `single`:
/// the same steps, losses and final weights within [`TOLERANCE`], and that the weights moved
/// far more than that (so equality is not that of two untrained models).
fn assert_same_training(single: &Path, parallel: &Path, initial: &[NamedTensor]) {
    assert_trained_alike(single, parallel, initial, TOLERANCE, |_| TOLERANCE);
}

/// Asserts that `run` took the steps of `reference` with losses within `loss_tolerance`
/// (relative) and ended with weights closer than `max_apart(moved)`, `moved` being how far
/// `reference` moved from `initial` (which must be well above rounding).
fn assert_trained_alike(
    reference: &Path,
    run: &Path,
    initial: &[NamedTensor],
    loss_tolerance: f64,
    max_apart: impl Fn(f64) -> f64,
) {
    let (a, b) = (step_losses(reference), step_losses(run));
    assert_eq!(a.len(), 6, "{a:?}");
    assert_eq!(a.len(), b.len());
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            ((x - y) / x).abs() < loss_tolerance,
            "step {}: loss {x} in {}, {y} in {}",
            step + 1,
            reference.display(),
            run.display()
        );
    }
    let (wa, wb) = (final_weights(reference), final_weights(run));
    let apart = relative_distance(&wa, &wb);
    let moved = relative_distance(initial, &wa);
    eprintln!(
        "{}: weights apart {apart:.2e}, moved {moved:.2e}",
        run.display()
    );
    assert!(
        moved > 1e-3,
        "training moved the weights by only {moved:.2e}"
    );
    assert!(
        apart < max_apart(moved),
        "weights {apart:.2e} apart, moved {moved:.2e}"
    );
}

/// Runs `kiln ARGS LAUNCH --out DIR/OUT` with `overrides`; returns `DIR/OUT` and its stderr.
fn train(
    dir: &Path,
    out: &str,
    args: &[&str],
    launch: &[&str],
    overrides: &[String],
) -> (PathBuf, String) {
    let out = dir.join(out);
    let stderr = ok(kiln()
        .args(args)
        .args(launch)
        .arg("--out")
        .arg(&out)
        .args(set(overrides))
        .output()
        .unwrap());
    (out, stderr)
}

/// The weights a run of `args` starts from, within 1e-30: one step at a negligible rate
/// (AdamW moves each weight by about the rate).
fn initial_weights(
    dir: &Path,
    name: &str,
    args: &[&str],
    overrides: &[String],
) -> Vec<NamedTensor> {
    let mut o = overrides.to_vec();
    o.extend(["train.max_steps=1".into(), "optim.lr=1e-30".into()]);
    final_weights(
        &train(
            dir,
            &format!("{name}-initial"),
            args,
            &["--device", "cpu"],
            &o,
        )
        .0,
    )
}

fn initial_pretrain_weights(dir: &Path, overrides: &[String]) -> Vec<NamedTensor> {
    initial_weights(dir, "pretrain", &["pretrain"], overrides)
}

#[test]
fn two_devices_in_one_process_train_like_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let (alone, parallel, initial) = alone_and_on_devices(
        dir.path(),
        "pretrain",
        &["pretrain"],
        &pretrain_overrides(),
        "cpu,cpu",
    );
    assert_same_training(&alone, &parallel, &initial);

    // SFT with answers of different lengths, split unevenly.
    let init = pretrained(dir.path());
    let (alone, parallel, initial) = alone_and_on_devices(
        dir.path(),
        "sft",
        &["sft", "--init", init.to_str().unwrap()],
        &sft_overrides(dir.path()),
        "cpu,cpu",
    );
    assert_same_training(&alone, &parallel, &initial);
}

/// The global batch is the config's, and the data cursor is global: a run started on two
/// workers resumes on one (or the other way round) and trains as if it had stayed.
#[test]
fn a_run_resumes_with_another_number_of_workers() {
    let dir = tempfile::tempdir().unwrap();
    let mut first_half = pretrain_overrides();
    first_half.push("train.max_steps=3".into());
    let initial = initial_pretrain_weights(dir.path(), &first_half);
    let run = |out: &str, device: &[&str], then: &[&str]| -> PathBuf {
        let out = dir.path().join(out);
        ok(kiln()
            .arg("pretrain")
            .args(device)
            .arg("--out")
            .arg(&out)
            .args(set(&first_half))
            .output()
            .unwrap());
        ok(kiln()
            .args(["pretrain", "--resume", "--set", "train.max_steps=6"])
            .args(then)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap());
        out
    };
    let alone = run("alone", &["--device", "cpu"], &["--device", "cpu"]);
    let two_then_one = run(
        "two-then-one",
        &["--devices", "cpu,cpu"],
        &["--device", "cpu"],
    );
    assert_same_training(&alone, &two_then_one, &initial);
    let one_then_two = run(
        "one-then-two",
        &["--device", "cpu"],
        &["--devices", "cpu,cpu"],
    );
    assert_same_training(&alone, &one_then_two, &initial);
}

/// The host-staged all-reduce between backends: flex and wgpu (lavapipe in CI). Each
/// replica applies the update on its own backend, so they may drift apart by rounding; worker
/// 0's (the CPU's) is saved. Measured: relative 1.3e-6 after 6 steps.
#[test]
fn a_cpu_and_a_wgpu_device_train_like_one_device() {
    if common::wgpu_device().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (alone, parallel, initial) = alone_and_on_devices(
        dir.path(),
        "pretrain",
        &["pretrain"],
        &pretrain_overrides(),
        "cpu,wgpu",
    );
    assert_same_training(&alone, &parallel, &initial);
}

/// Runs `args` (a command and its flags) with `overrides` alone on the CPU and on the
/// `devices` of one process; returns both runs and the weights they start from.
fn alone_and_on_devices(
    dir: &Path,
    name: &str,
    args: &[&str],
    overrides: &[String],
    devices: &str,
) -> (PathBuf, PathBuf, Vec<NamedTensor>) {
    let out = |run: &str| format!("{name}-{run}");
    (
        train(dir, &out("alone"), args, &["--device", "cpu"], overrides).0,
        train(
            dir,
            &out("parallel"),
            args,
            &["--devices", devices],
            overrides,
        )
        .0,
        initial_weights(dir, name, args, overrides),
    )
}

/// Reward models (the loss counted in pairs) and GAtt (worker 0 samples the data, the
/// other reads it) train through the same loop.
#[test]
fn reward_models_and_gatt_train_on_two_devices_like_on_one() {
    let dir = tempfile::tempdir().unwrap();
    let init = pretrained(dir.path());
    let init = init.to_str().unwrap();
    let ratings = ["significantly_better", "better", "slightly_better"];
    let lines: Vec<String> = (0..30)
        .map(|i| {
            format!(
                r#"{{"prompt": "What is {} + {}?", "chosen": "It is {}.", "rejected": "{}", "rating": "{}", "safety": false}}"#,
                i % 7,
                i % 5,
                i % 7 + i % 5,
                ["No.", "I will not say what that is."][i % 2],
                ratings[i % 3]
            )
        })
        .collect();
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(&pairs, lines.join("\n")).unwrap();
    let p = pairs.display();
    let rm = [
        format!("data.train=[\"{p}\"]"),
        format!("data.val=[\"{p}\"]"),
        "train.batch_size=5".into(),
        "train.max_steps=6".into(),
        "train.eval_interval=3".into(),
        "optim.lr=1e-2".into(),
        "optim.warmup_steps=0".into(),
    ];
    let (alone, parallel, initial) = alone_and_on_devices(
        dir.path(),
        "rm",
        &["rm", "train", "--kind", "helpfulness", "--init", init],
        &rm,
        "cpu,cpu",
    );
    assert_same_training(&alone, &parallel, &initial);

    let [dialogues, instructions] = common::gatt_inputs(dir.path(), 8);
    let gatt = [
        dialogues,
        instructions,
        "gatt.max_answer_tokens=6".into(),
        "gatt.cut_answers=\"keep\"".into(),
        "gatt.batch_size=8".into(),
        "data.seq_len=64".into(),
        "data.val_fraction=0.25".into(),
        "train.batch_size=3".into(),
        "train.max_steps=6".into(),
        "train.eval_interval=3".into(),
        "optim.lr=1e-2".into(),
        "optim.warmup_steps=0".into(),
    ];
    let (alone, parallel, initial) = alone_and_on_devices(
        dir.path(),
        "gatt",
        &["gatt", "--init", init],
        &gatt,
        "cpu,cpu",
    );
    assert_eq!(
        std::fs::read(alone.join(kiln::stages::gatt::SAMPLES_FILE)).unwrap(),
        std::fs::read(parallel.join(kiln::stages::gatt::SAMPLES_FILE)).unwrap()
    );
    assert_same_training(&alone, &parallel, &initial);
}

/// Runs a command line of one process on `--device cpu` on two CPU devices instead.
fn on_two_cpu_devices(args: &[String]) -> Output {
    let mut args = args.to_vec();
    args.splice(1..3, ["--devices".to_string(), "cpu,cpu".to_string()]);
    kiln().args(&args).output().unwrap()
}

/// Rejection sampling on two workers: each samples every other batch of prompts and worker
/// 0 writes them all in order, so every round's samples and pool are those of one process
/// (bit for bit: each batch has its own seed), and the fine-tuning rounds are data-parallel.
#[test]
fn rejection_sampling_on_two_devices_samples_and_trains_like_one() {
    assert_rs_like_one_process(&on_two_cpu_devices);
}

/// Runs `kiln rs` (two rounds, 5 sampling batches) alone, and data-parallel through
/// `parallel` (given the command line of one process on `--device cpu`); asserts that both
/// sampled, pooled and trained alike.
fn assert_rs_like_one_process(parallel: &dyn Fn(&[String]) -> Output) {
    use common::rlhf::{command_line, fixture, read_lines};
    use kiln::stages::rs::{self, PoolEntry, SampleRecord};
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path(), 9);
    let sets = [
        format!("rs.prompts=[\"{}\"]", f.prompts.display()),
        "rs.k=3".into(),
        "rs.iterations=2".into(),
        "rs.max_answer_tokens=8".into(),
        "rs.keep_unfinished=true".into(),
        // 5 batches: the two workers take 3 and 2.
        "rs.batch_prompts=2".into(),
        "rs.prompts_per_round=9".into(),
        "data.seq_len=64".into(),
        "data.val_fraction=0.2".into(),
        "train.batch_size=3".into(),
        "train.max_steps=4".into(),
        "optim.lr=1e-2".into(),
        "optim.warmup_steps=0".into(),
    ];
    let alone = dir.path().join("alone");
    ok(kiln()
        .args(command_line("rs", &f, &alone, &sets))
        .output()
        .unwrap());
    let parallel_out = dir.path().join("parallel");
    ok(parallel(&command_line("rs", &f, &parallel_out, &sets)));
    let parallel = parallel_out;
    let without_timing = |run: &Path, round: usize| -> Vec<SampleRecord> {
        read_lines::<SampleRecord>(&run.join(format!("round-{round}")).join(rs::SAMPLES_FILE))
            .into_iter()
            .map(|mut s| {
                (s.sample_s, s.score_s) = (0.0, 0.0);
                s
            })
            .collect()
    };
    let pool = |run: &Path, round: usize| {
        read_lines::<PoolEntry>(&run.join(format!("round-{round}")).join(rs::POOL_FILE))
    };
    // Round 1 samples from the same policy: the same records, bit for bit.
    let samples = without_timing(&alone, 1);
    assert_eq!(samples.len(), 9 * 3);
    assert!(
        samples == without_timing(&parallel, 1),
        "round 1's samples differ"
    );
    assert!(
        pool(&alone, 1) == pool(&parallel, 1),
        "round 1's pools differ"
    );
    // Round 2 samples from round 1's fine-tuned policies, equal within 1e-7 (not bit for
    // bit): the same tokens and scores, log-probabilities within 1e-4.
    let (a, b) = (without_timing(&alone, 2), without_timing(&parallel, 2));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.prompt_index, x.k), (y.prompt_index, y.k));
        assert_eq!(
            (&x.tokens, &x.answer, x.score),
            (&y.tokens, &y.answer, y.score)
        );
        for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
            assert!((p - q).abs() < 1e-4, "log-probabilities {p} and {q}");
        }
    }
    assert!(
        pool(&alone, 2) == pool(&parallel, 2),
        "round 2's pools differ"
    );
    let policy = |run: &Path| final_weights(&run.join("round-2"));
    let distance = relative_distance(&policy(&alone), &policy(&parallel));
    eprintln!("relative weight distance {distance:.2e}");
    assert!(distance < TOLERANCE, "weights differ by {distance:.2e}");
    assert_eq!(
        read_lines::<serde_json::Value>(&alone.join(rs::ROUNDS_FILE)).len(),
        read_lines::<serde_json::Value>(&parallel.join(rs::ROUNDS_FILE)).len()
    );
}

#[test]
fn ppo_on_two_devices_trains_like_one() {
    assert_ppo_like_one_process(&on_two_cpu_devices);
}

/// Runs `kiln ppo` (3 iterations of 8 prompts: 2 generation batches, mini-batches of 4 split
/// 2 + 2) alone and through `parallel`; asserts the same rewards, KL and final policy and
/// value model. Iteration 1 samples from the same policy, so its reward is bit-identical;
/// later ones sample from policies equal within 1e-7.
fn assert_ppo_like_one_process(parallel: &dyn Fn(&[String]) -> Output) {
    use common::rlhf::{command_line, fixture, read_lines};
    use kiln::stages::ppo::PpoRecord;
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path(), 12);
    let sets = [
        format!("ppo.prompts=[\"{}\"]", f.prompts.display()),
        format!("ppo.eval_prompts=[\"{}\"]", f.prompts.display()),
        "ppo.eval_limit=4".into(),
        "ppo.eval_interval=2".into(),
        "ppo.iterations=3".into(),
        "ppo.rollout_batch=8".into(),
        "ppo.mini_batch=4".into(),
        "ppo.generation_batch=4".into(),
        "ppo.max_new_tokens=8".into(),
        "optim.lr=1e-3".into(),
        "value_optim.lr=1e-3".into(),
    ];
    let alone = dir.path().join("alone");
    ok(kiln()
        .args(command_line("ppo", &f, &alone, &sets))
        .output()
        .unwrap());
    let parallel_out = dir.path().join("parallel");
    ok(parallel(&command_line("ppo", &f, &parallel_out, &sets)));
    let iterations = |run: &Path| -> Vec<(f64, f64, f64)> {
        read_lines::<PpoRecord>(&run.join("metrics.jsonl"))
            .into_iter()
            .filter_map(|r| match r {
                PpoRecord::Iteration(r) => Some((r.reward, r.kl_per_token, r.entropy)),
                PpoRecord::Eval(_) => None,
            })
            .collect()
    };
    let (a, b) = (iterations(&alone), iterations(&parallel_out));
    assert_eq!(a.len(), 3);
    assert_eq!(a.len(), b.len());
    assert_eq!(a[0].0, b[0].0, "iteration 1's rewards differ");
    for (x, y) in a.iter().zip(&b) {
        assert!((x.0 - y.0).abs() < 1e-5, "rewards {x:?} and {y:?}");
        assert!((x.1 - y.1).abs() < 1e-5, "KL {x:?} and {y:?}");
        assert!((x.2 - y.2).abs() < 1e-4, "entropy {x:?} and {y:?}");
    }
    let saved = |run: &Path| {
        let saved = checkpoint::load(&checkpoint::resolve(run).unwrap()).unwrap();
        let value = saved
            .extra
            .into_iter()
            .find(|(name, _)| name == kiln::stages::ppo::VALUE_MODEL_FILE)
            .unwrap()
            .1;
        (saved.model, value)
    };
    let ((pa, va), (pb, vb)) = (saved(&alone), saved(&parallel_out));
    for (what, x, y) in [("policy", &pa, &pb), ("value model", &va, &vb)] {
        let distance = relative_distance(x, y);
        eprintln!("{what}: relative weight distance {distance:.2e}");
        assert!(
            distance < TOLERANCE,
            "{what} weights differ by {distance:.2e}"
        );
    }
}

#[test]
fn devices_that_are_not_there_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    for (devices, expected) in [
        ("cpu,wgpu:7", "`wgpu:7` is not there"),
        ("cpu,tpu", "`tpu` is not a device"),
        ("cpu", "two devices or more"),
        (
            "cpu,cuda:4096",
            if cfg!(feature = "cuda") {
                "`cuda:4096` is not there"
            } else {
                "needs kiln built with `--features cuda`"
            },
        ),
    ] {
        let output = kiln()
            .args(["pretrain", "--devices", devices, "--out"])
            .arg(&out)
            .args(set(&pretrain_overrides()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains(expected), "{devices}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(!out.exists(), "{devices}: --out was created");
    }
}

#[test]
fn a_global_batch_smaller_than_the_workers_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut overrides = pretrain_overrides();
    overrides.push("train.batch_size=1".into());
    let output = kiln()
        .args(["pretrain", "--devices", "cpu,cpu", "--out"])
        .arg(&out)
        .args(set(&overrides))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("train.batch_size = 1 is the global batch, split among 2 workers"),
        "{stderr}"
    );
    assert!(!out.join("checkpoints").exists());
}

#[cfg(feature = "mpi")]
mod mpi {
    use super::*;

    /// `mpirun -n 2` on this machine (as root Open MPI also wants `--allow-run-as-root`).
    fn mpirun() -> Command {
        let mut command = Command::new("mpirun");
        command.args(["-n", "2", "--oversubscribe"]);
        if std::env::var("USER").is_ok_and(|u| u == "root")
            || std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
        {
            command.arg("--allow-run-as-root");
        }
        command.arg(env!("CARGO_BIN_EXE_kiln"));
        command
    }

    #[test]
    fn two_mpi_ranks_train_like_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let overrides = pretrain_overrides();
        let initial = initial_pretrain_weights(dir.path(), &overrides);
        let single = dir.path().join("single");
        ok(kiln()
            .args(["pretrain", "--device", "cpu", "--out"])
            .arg(&single)
            .args(set(&overrides))
            .output()
            .unwrap());
        let parallel = dir.path().join("parallel");
        let stderr = ok(mpirun()
            .args(["pretrain", "--device", "cpu", "--out"])
            .arg(&parallel)
            .args(set(&overrides))
            .output()
            .unwrap());
        assert!(stderr.contains("data-parallel: 2 MPI ranks"), "{stderr}");
        // Rank 1 printed nothing of its own: one start-up line, one final line.
        assert_eq!(stderr.matches("device: flex").count(), 1, "{stderr}");
        assert_eq!(
            stderr.matches("final validation loss").count(),
            1,
            "{stderr}"
        );
        assert_same_training(&single, &parallel, &initial);

        let init = pretrained(dir.path());
        let sft = sft_overrides(dir.path());
        let initial = final_weights(&init);
        let single = dir.path().join("sft-single");
        ok(kiln()
            .args(["sft", "--device", "cpu", "--init"])
            .arg(&init)
            .arg("--out")
            .arg(&single)
            .args(set(&sft))
            .output()
            .unwrap());
        let parallel = dir.path().join("sft-parallel");
        ok(mpirun()
            .args(["sft", "--device", "cpu", "--init"])
            .arg(&init)
            .arg("--out")
            .arg(&parallel)
            .args(set(&sft))
            .output()
            .unwrap());
        assert_same_training(&single, &parallel, &initial);
    }

    /// The pid of the `kiln` process that is MPI rank `rank` of the job started by `mpirun`.
    fn rank_pid(mpirun: u32, rank: usize) -> Option<u32> {
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised command name.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if parent != Some(mpirun) {
                continue;
            }
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
            if environ.split(|&b| b == 0).any(|v| v == wanted.as_bytes()) {
                return Some(pid);
            }
        }
        None
    }

    #[test]
    fn killing_one_rank_stops_the_job_and_resume_continues_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut overrides = pretrain_overrides();
        overrides.extend(
            [
                "train.max_steps=400",
                "train.eval_interval=0",
                "train.checkpoint_interval=2",
                "train.keep_checkpoints=3",
            ]
            .map(String::from),
        );
        let straight = dir.path().join("straight");
        ok(mpirun()
            .args(["pretrain", "--device", "cpu", "--out"])
            .arg(&straight)
            .args(set(&overrides))
            .output()
            .unwrap());

        let killed = dir.path().join("killed");
        let job = mpirun()
            .args(["pretrain", "--device", "cpu", "--out"])
            .arg(&killed)
            .args(set(&overrides))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Kill rank 1 once a few checkpoints are written, well before the end.
        let checkpoints = killed.join("checkpoints");
        let started = std::time::Instant::now();
        loop {
            let newest = checkpoint::list(&checkpoints)
                .ok()
                .and_then(|list| list.last().map(|(step, _)| *step));
            if newest.is_some_and(|step| step >= 20) {
                break;
            }
            assert!(started.elapsed().as_secs() < 120, "no checkpoint appeared");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let pid = rank_pid(job.id(), 1).expect("rank 1's process");
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        let output = job.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(
            stderr.contains("rank 1") && stderr.contains("signal 9"),
            "the job's message does not say which rank died: {stderr}"
        );
        let (newest, newest_dir) = checkpoint::list(&checkpoints).unwrap().pop().unwrap();
        assert!(newest < 400, "the job ran to the end before the kill");
        checkpoint::load(&newest_dir).expect("the newest checkpoint is intact");

        ok(mpirun()
            .args(["pretrain", "--device", "cpu", "--resume", "--out"])
            .arg(&killed)
            .output()
            .unwrap());
        // The same ranks summing in the same order: bit-identical to the uninterrupted job.
        let files = |out: &Path| {
            let dir = checkpoint::resolve(out).unwrap();
            (
                std::fs::read(dir.join(checkpoint::MODEL_FILE)).unwrap(),
                std::fs::read(dir.join(checkpoint::OPTIMIZER_FILE)).unwrap(),
            )
        };
        assert!(files(&straight) == files(&killed), "resumed weights differ");
    }

    #[test]
    fn rejection_sampling_on_two_ranks_samples_and_trains_like_one_process() {
        assert_rs_like_one_process(&|args| mpirun().args(args).output().unwrap());
    }

    #[test]
    fn ppo_on_two_ranks_trains_like_one_process() {
        assert_ppo_like_one_process(&|args| mpirun().args(args).output().unwrap());
    }

    /// The whole tiny recipe as one `mpirun -n 2` job: every stage trains on both ranks,
    /// rank 0 writes the pipeline's files, and each stage's model equals the one-process
    /// run's (measured: 4e-8 to 2.5e-7; RS, PPO and GAtt sample from earlier stages' models
    /// that are equal within 1e-7, and drew the same tokens).
    #[test]
    fn the_tiny_recipe_on_two_ranks_trains_like_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let args = |out: &Path| -> Vec<String> {
            ["pipeline", "--device", "cpu", "--config"]
                .map(String::from)
                .into_iter()
                .chain([
                    repo("configs/tiny.toml").display().to_string(),
                    "--out".into(),
                    out.display().to_string(),
                ])
                .collect()
        };
        let alone = dir.path().join("alone");
        ok(kiln().args(args(&alone)).output().unwrap());
        let parallel = dir.path().join("parallel");
        let stderr = ok(mpirun().args(args(&parallel)).output().unwrap());
        assert!(stderr.contains("data-parallel: 2 MPI ranks"), "{stderr}");
        assert_eq!(
            stderr.matches("[1/8] data (gym-data): done").count(),
            1,
            "one line per stage: {stderr}"
        );
        assert!(parallel.join("report.md").is_file());
        for stage in common::TINY_RECIPE_MODELS {
            let distance = relative_distance(
                &final_weights(&alone.join(stage)),
                &final_weights(&parallel.join(stage)),
            );
            eprintln!("{stage}: relative weight distance {distance:.2e}");
            assert!(
                distance < TOLERANCE,
                "{stage}: weights differ by {distance:.2e}"
            );
        }
    }
}

/// CUDA (feature `cuda`). These need an NVIDIA GPU (the ignored one two): CI builds them but
/// has no GPU; `scripts/device-check.sh` runs them on a lent GPU machine.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    /// cubecl runs f32 matmuls on TF32 tensor cores where the GPU has them (10 mantissa bits,
    /// about 5e-4 relative per product), so a CUDA run agrees with a CPU run to about 1e-3,
    /// not to f32 rounding; autotune may also pick other kernels for a worker's smaller
    /// batch. The bounds: step losses within 2e-3 relative, final weights apart by under 5%
    /// of the distance training moved them. (Chosen from TF32's precision, not yet measured.)
    const LOSS_TOLERANCE: f64 = 2e-3;
    const WEIGHT_TOLERANCE: f64 = 0.05;

    /// Trains pretraining and SFT (answers of different lengths) under `reference` and under
    /// `launch` (`--device ...` or `--devices ...`), at a learning rate low enough that
    /// rounding does not send the runs apart in 6 steps; asserts that each pair trained alike
    /// within the bounds above and returns the `launch` runs' stderr.
    fn train_alike(reference: &[&str], launch: &[&str]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let init = pretrained(dir).display().to_string();
        let stages = [
            ("pretrain", vec!["pretrain"], pretrain_overrides()),
            ("sft", vec!["sft", "--init", &init], sft_overrides(dir)),
        ];
        stages
            .into_iter()
            .map(|(name, args, mut overrides)| {
                overrides.push("optim.lr=1e-3".into());
                let (expected, _) = train(
                    dir,
                    &format!("{name}-reference"),
                    &args,
                    reference,
                    &overrides,
                );
                let (run, stderr) = train(dir, &format!("{name}-run"), &args, launch, &overrides);
                let initial = initial_weights(dir, name, &args, &overrides);
                assert_trained_alike(&expected, &run, &initial, LOSS_TOLERANCE, |moved| {
                    WEIGHT_TOLERANCE * moved
                });
                stderr
            })
            .collect()
    }

    #[test]
    fn one_cuda_device_trains_like_the_cpu() {
        train_alike(&["--device", "cpu"], &["--device", "cuda"]);
    }

    /// Burn's NCCL all-reduce end to end on one GPU (a group of one: the communicator, the
    /// reduction and the read-back), the self-check every NCCL worker runs before training.
    #[test]
    fn nccl_all_reduce_runs_on_one_device() {
        let device = kiln::device::select(kiln::device::DeviceChoice::Cuda).unwrap();
        let group = kiln::train::collective::InProcess::group_on(std::slice::from_ref(&device));
        kiln::train::step::check_nccl(&group[0], &device.device).unwrap();
    }

    /// Two GPUs of one process, gradients through NCCL, against one GPU.
    #[test]
    #[ignore = "needs two CUDA GPUs: cargo test --release --features cuda --test distributed -- --ignored"]
    fn two_cuda_devices_train_like_one_through_nccl() {
        for stderr in train_alike(&["--device", "cuda"], &["--devices", "cuda:0,cuda:1"]) {
            assert!(stderr.contains("gradients summed by NCCL"), "{stderr}");
        }
    }
}
