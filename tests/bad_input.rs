//! Bad input gets a one-line error naming the file (and line or key), a non-zero exit, and
//! leaves every existing output file as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

mod common;
use common::repo;

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

/// `--set` arguments for a very small model on `corpus`.
fn small(corpus: &str) -> Vec<String> {
    let mut sets = common::tiny_model(Path::new(corpus));
    sets.extend([
        "train.batch_size=2".into(),
        "train.max_steps=2".into(),
        "sample.max_tokens=4".into(),
    ]);
    sets.into_iter()
        .flat_map(|o| ["--set".to_string(), o])
        .collect()
}

fn pretrain(out: &Path, corpus: &str, extra: &[&str]) -> Output {
    let mut args: Vec<String> = vec![
        "pretrain".into(),
        "--device".into(),
        "cpu".into(),
        "--out".into(),
    ];
    args.push(out.display().to_string());
    args.extend(small(corpus));
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    kiln(&refs)
}

/// Asserts failure with exactly one line on stderr that contains every one of `needles`.
fn assert_fails(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "error should mention {needle:?}: {stderr}"
        );
    }
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// A finished small run, shared by the tests that damage a copy of it.
fn trained_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kiln-bad-input-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = pretrain(
            &dir,
            &repo("data/shakespeare/hamlet.txt").display().to_string(),
            &[],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

fn copy_dir(from: &Path, to: &Path) {
    for (path, bytes) in snapshot(from) {
        let target = to.join(path.strip_prefix(from).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, bytes).unwrap();
    }
}

fn newest_checkpoint(run: &Path) -> PathBuf {
    kiln::interop::checkpoint::resolve(run).unwrap()
}

#[test]
fn missing_empty_and_non_utf8_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.txt");
    assert_fails(
        &pretrain(&dir.path().join("o1"), missing.to_str().unwrap(), &[]),
        &["nope.txt", "not found"],
    );

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    assert_fails(
        &pretrain(&dir.path().join("o2"), empty.to_str().unwrap(), &[]),
        &["empty.txt", "empty"],
    );

    let bad = dir.path().join("latin1.txt");
    std::fs::write(&bad, b"first line\nsecond line\nna\xefve\n").unwrap();
    assert_fails(
        &pretrain(&dir.path().join("o3"), bad.to_str().unwrap(), &[]),
        &["latin1.txt:3", "UTF-8"],
    );

    let empty_dir = dir.path().join("nothing");
    std::fs::create_dir(&empty_dir).unwrap();
    assert_fails(
        &pretrain(&dir.path().join("o4"), empty_dir.to_str().unwrap(), &[]),
        &["nothing", ".txt"],
    );
}

#[test]
fn malformed_config_unknown_key_and_out_of_range_value() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broken.toml");
    let with_config = |text: &str| {
        std::fs::write(&config, text).unwrap();
        kiln(&[
            "pretrain",
            "--config",
            config.to_str().unwrap(),
            "--out",
            "unused",
        ])
    };
    let out = with_config("[train]\nbatch_size = 4\nmax_steps = = 3\n");
    assert_fails(&out, &["broken.toml", "line 3"]);
    let out = with_config("[train]\nbatch_sise = 4\n");
    assert_fails(&out, &["broken.toml", "train.batch_sise"]);
    let out = with_config("[optim]\nlr = \"fast\"\n");
    assert_fails(&out, &["broken.toml", "lr"]);

    let out = kiln(&["pretrain", "--set", "optim.lr=-1", "--out", "unused"]);
    assert_fails(&out, &["optim.lr"]);
    let out = kiln(&["pretrain", "--set", "model.n_kv_heads=3", "--out", "unused"]);
    assert_fails(&out, &["model.n_kv_heads"]);
    let out = kiln(&["pretrain", "--set", "optim.nope=1", "--out", "unused"]);
    assert_fails(&out, &["optim.nope"]);
    assert!(
        !Path::new("unused").exists(),
        "a rejected config must not create the output directory"
    );
}

#[test]
fn unwritable_output_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = pretrain(
        &file.join("run"),
        &repo("data/shakespeare/hamlet.txt").display().to_string(),
        &[],
    );
    assert_fails(&out, &["a-file"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn existing_run_is_not_overwritten_without_resume() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    copy_dir(trained_run(), &run);
    let before = snapshot(&run);
    let out = pretrain(
        &run,
        &repo("data/shakespeare/hamlet.txt").display().to_string(),
        &[],
    );
    assert_fails(&out, &["already holds a run", "--resume"]);
    assert_eq!(snapshot(&run), before);
}

#[test]
fn checkpoint_of_another_shape() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    copy_dir(trained_run(), &run);
    let before = snapshot(&run);
    let corpus = repo("data/shakespeare/hamlet.txt").display().to_string();
    let out = pretrain(&run, &corpus, &["--resume", "--set", "model.dim=64"]);
    assert_fails(&out, &["another model shape"]);
    assert_eq!(snapshot(&run), before);

    // A model file from a different shape, with a matching manifest, is named by tensor.
    let other = dir.path().join("other");
    let trained = pretrain(&other, &corpus, &["--set", "model.ffn_dim=48"]);
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    let target = newest_checkpoint(&run);
    let source = newest_checkpoint(&other);
    std::fs::copy(
        source.join("model.safetensors"),
        target.join("model.safetensors"),
    )
    .unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("manifest.json")).unwrap()).unwrap();
    let other_manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(source.join("manifest.json")).unwrap()).unwrap();
    manifest["files"]["model.safetensors"] = other_manifest["files"]["model.safetensors"].clone();
    std::fs::write(
        target.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let out = kiln(&common::generate_args(run.to_str().unwrap(), "To"));
    assert_fails(&out, &["model.safetensors", "mlp.", "shape"]);
}

#[test]
fn truncated_or_corrupted_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = repo("data/shakespeare/hamlet.txt").display().to_string();
    for damage in ["truncated", "corrupted"] {
        let run = dir.path().join(damage);
        copy_dir(trained_run(), &run);
        let model = newest_checkpoint(&run).join("model.safetensors");
        let mut bytes = std::fs::read(&model).unwrap();
        if damage == "truncated" {
            bytes.truncate(bytes.len() / 2);
        } else {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x40;
        }
        std::fs::write(&model, &bytes).unwrap();
        let before = snapshot(&run);
        let out = kiln(&common::generate_args(run.to_str().unwrap(), "To"));
        assert_fails(&out, &["model.safetensors", damage]);
        let out = pretrain(&run, &corpus, &["--resume", "--set", "train.max_steps=4"]);
        assert_fails(&out, &["model.safetensors", damage]);
        assert_eq!(
            snapshot(&run),
            before,
            "a failed run must leave the run directory as it was"
        );
    }
    let out = kiln(&[
        "generate",
        "--checkpoint",
        dir.path().join("absent").to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_fails(&out, &["absent", "not found"]);
}

#[test]
fn tokenizer_that_does_not_match_the_model_or_is_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = repo("data/shakespeare/hamlet.txt").display().to_string();
    let out = pretrain(
        &dir.path().join("o"),
        &corpus,
        &["--set", "model.vocab_size=100"],
    );
    assert_fails(&out, &["model.vocab_size", "tokenizer"]);
    let bad = dir.path().join("tok.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let out = pretrain(
        &dir.path().join("o2"),
        &corpus,
        &["--set", &format!("data.tokenizer=\"{}\"", bad.display())],
    );
    assert_fails(&out, &["tok.json"]);
    // Item 9: as many tokens as the model's vocabulary, but one id far past it.
    let sparse = dir.path().join("sparse.json");
    std::fs::write(&sparse, common::sparse_tokenizer_json()).unwrap();
    let out = pretrain(
        &dir.path().join("o3"),
        &corpus,
        &["--set", &format!("data.tokenizer=\"{}\"", sparse.display())],
    );
    assert_fails(&out, &["sparse.json", "99999", "model.vocab_size"]);
    assert!(!dir.path().join("o3").exists());
}

/// Sizes and values no model can have are refused before anything is allocated, naming the
/// key (issue 14: items 5, 6, 7, 8 and 17, and the same checks on every float of `[model]`
/// and `[optim]`).
#[test]
fn impossible_sizes_and_values_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out_s = out.display().to_string();
    for (set, key) in [
        ("model.init_std=1e39", "model.init_std"),
        ("model.vocab_size=1000000000000", "model.vocab_size"),
        ("model.max_seq_len=1000000000000", "model.max_seq_len"),
        ("model.dim=4294967296", "model.dim"),
        ("model.rope_theta=inf", "model.rope_theta"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.weight_decay=nan", "optim.weight_decay"),
    ] {
        let output = kiln(&["pretrain", "--set", set, "--out", &out_s]);
        assert_fails(&output, &[key]);
    }
    // Under every bound alone, too many together.
    let output = kiln(&[
        "pretrain",
        "--set",
        "model.dim=65536",
        "--set",
        "model.n_layers=1024",
        "--set",
        "model.ffn_dim=262144",
        "--out",
        &out_s,
    ]);
    assert_fails(&output, &["parameters"]);
    assert!(!out.exists(), "a refused run created its output directory");

    // `kiln info` counts parameters without wrapping.
    let huge = dir.path().join("huge.toml");
    std::fs::write(&huge, "[model]\ndim = 4294967296\n").unwrap();
    assert_fails(
        &kiln(&["info", "--config", huge.to_str().unwrap()]),
        &["model.dim"],
    );

    // A tokenizer of a trillion tokens is refused at once.
    let tok = dir.path().join("tok.json");
    let hamlet = repo("data/shakespeare/hamlet.txt").display().to_string();
    let output = kiln(&[
        "tokenizer",
        "train",
        "--input",
        &hamlet,
        "--vocab-size",
        "1000000000000",
        "--out",
        tok.to_str().unwrap(),
    ]);
    assert_fails(&output, &["--vocab-size"]);
    assert!(!tok.exists());

    // A Hugging Face directory whose config.json asks for a context of 10^15 positions.
    let hf = dir.path().join("hf");
    let run = trained_run().display().to_string();
    let converted = kiln(&["convert", &run, "--to", "hf", "--out", hf.to_str().unwrap()]);
    assert!(
        converted.status.success(),
        "{}",
        String::from_utf8_lossy(&converted.stderr)
    );
    let config_path = hf.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["max_position_embeddings"] = serde_json::json!(1_000_000_000_000_000u64);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let output = kiln(&[
        "generate",
        "--model",
        hf.to_str().unwrap(),
        "--prompt",
        "Stop",
        "--device",
        "cpu",
    ]);
    assert_fails(&output, &["model.max_seq_len", "hf"]);
}

/// `kiln plot` checks every output before writing the first: with `lr.png` a directory, the
/// run's existing `loss.png` stays as it was (issue 14, item 4).
#[test]
fn plot_replaces_nothing_when_an_output_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    copy_dir(trained_run(), &run);
    std::fs::write(run.join("loss.png"), b"the user's own plot").unwrap();
    std::fs::create_dir_all(run.join("lr.png")).unwrap();
    let before = snapshot(&run);
    assert_fails(&kiln(&["plot", run.to_str().unwrap()]), &["lr.png"]);
    assert_eq!(snapshot(&run), before, "a failed plot changed the run");
}

/// Sizes given to `kiln bench generate` are checked without wrapping, and a metrics file
/// whose values span more than a plot axis can is refused instead of hanging (issue 14,
/// items 14, 15 and 16).
#[test]
fn bench_sizes_and_unplottable_values_are_refused() {
    let run = trained_run().display().to_string();
    let bench = |prompt: &str, new: &str| {
        kiln(&[
            "bench",
            "generate",
            "--model",
            &run,
            "--device",
            "cpu",
            "--batch",
            "1",
            "--prompt-tokens",
            prompt,
            "--new-tokens",
            new,
        ])
    };
    assert_fails(&bench("0", "4"), &["--prompt-tokens"]);
    assert_fails(
        &bench("18446744073709551614", "2"),
        &["--prompt-tokens", "context"],
    );
    // Within usize, beyond the model's context: the context is named.
    assert_fails(&bench("100000", "2"), &["--prompt-tokens", "context"]);

    let dir = tempfile::tempdir().unwrap();
    let metrics = [
        r#"{"step":1,"loss":1e308,"lr":0.001,"grad_norm":1.0,"tokens_per_s":1.0,"elapsed_s":1.0}"#,
        r#"{"step":2,"loss":-1.7e308,"lr":0.001,"grad_norm":1.0,"tokens_per_s":1.0,"elapsed_s":2.0}"#,
    ];
    std::fs::write(dir.path().join("metrics.jsonl"), metrics.join("\n") + "\n").unwrap();
    let start = std::time::Instant::now();
    let output = kiln(&["plot", dir.path().to_str().unwrap()]);
    assert_fails(&output, &["loss.png", "span"]);
    assert!(
        start.elapsed().as_secs() < 60,
        "plot took {:?}",
        start.elapsed()
    );
}

/// A malformed line names its file and line; only commands that can skip such lines (through
/// `data.skip_bad_lines`) say so (issue 14, items 20-24).
#[test]
fn jsonl_errors_suggest_skipping_only_where_it_exists() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gym");
    let out = kiln(&[
        "gym",
        "generate",
        "--out",
        data.to_str().unwrap(),
        "--unsafe-prompts",
        repo("data/gym/donotanswer").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model = newest_checkpoint(trained_run());
    // eval gym: a task of an unknown kind.
    let tasks = data.join("eval_tasks.jsonl");
    let text = std::fs::read_to_string(&tasks).unwrap();
    std::fs::write(
        &tasks,
        text.replacen("\"kind\":\"add\"", "\"kind\":\"multiply\"", 1),
    )
    .unwrap();
    let out = kiln(&[
        "eval",
        "gym",
        "--device",
        "cpu",
        "--checkpoint",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "2",
    ]);
    let error = one_error(&out);
    assert!(error.contains("eval_tasks.jsonl:1:"), "{error}");
    assert!(!error.contains("skip"), "{error}");
    // The held-out files are read before the model is loaded (no device line first).
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    // sft: the same kind of mistake in its data says how to skip it.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": 3}\n").unwrap();
    let out = sft_on(&model, &dir.path().join("sft"), &bad);
    let error = one_error(&out);
    assert!(
        error.contains("bad.jsonl:1:") && error.contains("data.skip_bad_lines"),
        "{error}"
    );
}

/// `kiln sft` from `model` into `out` on the training file `train`.
fn sft_on(model: &Path, out: &Path, train: &Path) -> Output {
    let train = format!("data.train=[\"{}\"]", train.display());
    kiln(&[
        "sft",
        "--device",
        "cpu",
        "--init",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        &train,
    ])
}

/// The one error line of a failed run that may have printed progress first (the device, the
/// model it started from), checked for no panic.
fn one_error(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0].to_string()
}

/// Item 1: a run whose weights blow up saves no checkpoint of them and prunes none before
/// them: the newest good checkpoint survives, loadable and finite.
#[test]
fn diverged_run_keeps_its_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let hamlet = repo("data/shakespeare/hamlet.txt").display().to_string();
    let sets = [
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "train.max_steps=6",
        "train.checkpoint_interval=1",
        "train.keep_checkpoints=1",
    ];
    let extra: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
    let output = pretrain(&out, &hamlet, &extra);
    let error = one_error(&output);
    assert!(
        error.contains("diverged") && error.contains("not finite"),
        "{error}"
    );
    let kept = kiln::interop::checkpoint::list(&out.join("checkpoints")).unwrap();
    assert!(!kept.is_empty(), "the last good checkpoint was pruned");
    let saved = kiln::interop::checkpoint::load(&kept.last().unwrap().1).unwrap();
    assert!(
        saved
            .model
            .iter()
            .all(|t| t.values.iter().all(|v| v.is_finite())),
        "a checkpoint of non-finite weights was written"
    );
}

/// Item 2: `--config OUT/config.toml` on a new run is refused, and the user's file (comments
/// and all) is left as it was.
#[test]
fn config_file_inside_out_is_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let text = "# my notes on this run\n[train]\nmax_steps = 2 # short\n";
    std::fs::write(&config, text).unwrap();
    let hamlet = repo("data/shakespeare/hamlet.txt").display().to_string();
    let output = pretrain(dir.path(), &hamlet, &["--config", config.to_str().unwrap()]);
    assert_fails(&output, &["config.toml", "--out"]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), text);
    assert!(!dir.path().join("checkpoints").exists());
}

/// Item 19: a prompt that fills the model's context is an error saying so, not an empty
/// answer with exit code 0.
#[test]
fn generate_refuses_a_prompt_that_leaves_no_room() {
    let model = trained_run().display().to_string();
    let prompt = "word ".repeat(200);
    let output = kiln(&[
        "generate",
        "--device",
        "cpu",
        "--model",
        &model,
        "--prompt",
        &prompt,
        "--max-tokens",
        "8",
    ]);
    let error = one_error(&output);
    assert!(
        error.contains("no room to generate") && error.contains("context of 32"),
        "{error}"
    );
}

/// Sibling found on the way: an output given as a bare file name (its parent is "") was
/// written, then reported as an error when its directory was synced.
#[test]
fn a_bare_output_file_name_is_written_without_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir.path())
        .args([
            "tokenizer",
            "train",
            "--vocab-size",
            "300",
            "--out",
            "tok.json",
            "--input",
        ])
        .arg(repo("data/shakespeare/hamlet.txt"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    kiln::data::tokenizer::Tokenizer::load(&dir.path().join("tok.json")).unwrap();
}

/// Newcomer item: a stage that fails on its inputs after checking `--out` (here a data file
/// that does not exist) leaves no empty `--out` directory behind, and does not suggest
/// skipping malformed lines for a file that is missing.
#[test]
fn a_failed_stage_leaves_no_empty_out_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sft");
    let model = newest_checkpoint(trained_run());
    let output = sft_on(&model, &out, Path::new("no-such-file.jsonl"));
    let error = one_error(&output);
    assert!(
        error.contains("no-such-file.jsonl") && !error.contains("skip"),
        "{error}"
    );
    assert!(!out.exists(), "an empty --out was left behind");
}
