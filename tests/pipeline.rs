//! `kiln pipeline` on the tiny recipe (`configs/tiny.toml`, every stage a few steps on the
//! CPU): an uninterrupted run against one killed (SIGKILL, and once Ctrl-C) at random moments
//! and resumed, which must end with the same weights bit for bit; the plan and the report;
//! and recipes and output directories it must refuse before running anything.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::rlhf::{finish, kiln, listing};
use rand::{Rng, SeedableRng};

const TINY: &str = "configs/tiny.toml";

fn pipeline_args(recipe: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "pipeline".into(),
        "--device".into(),
        "cpu".into(),
        "--config".into(),
        recipe.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs `kiln args`; its exit status and stderr.
fn run(args: &[String]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every stage's output model, read back as bytes: (stage, the checkpoint's weights).
fn weights(out: &Path) -> Vec<(String, Vec<u8>)> {
    let mut all = Vec::new();
    for stage in common::TINY_RECIPE_MODELS {
        let dir = kiln::interop::checkpoint::resolve(&out.join(stage)).unwrap();
        let bytes = std::fs::read(dir.join(kiln::interop::checkpoint::MODEL_FILE)).unwrap();
        all.push((stage.to_string(), bytes));
    }
    all
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn killed_and_resumed_recipe_ends_with_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = common::repo(TINY);
    let straight = tmp.path().join("straight");
    let started = Instant::now();
    let (ok, stderr) = run(&pipeline_args(&recipe, &straight, &[]));
    assert!(ok, "{stderr}");
    let duration = started.elapsed();

    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let killed = tmp.path().join("killed");
    let mut kills = 0;
    // Stopped at random moments (the second time by Ctrl-C, else SIGKILL) and resumed, until
    // a run gets to the end by itself or six stops were made; then run to the end.
    for attempt in 0..6 {
        let extra: &[&str] = if attempt == 0 { &[] } else { &["--resume"] };
        let child = kiln(&pipeline_args(&recipe, &killed, extra));
        let at = Duration::from_secs_f64(rng.random_range(0.02..0.35) * duration.as_secs_f64());
        let begun = Instant::now();
        let ready = || begun.elapsed() >= at;
        let stopped = if attempt == 1 {
            common::rlhf::interrupt_when(child, &ready)
        } else {
            common::rlhf::kill_when(child, &ready)
        };
        if !stopped {
            break;
        }
        kills += 1;
    }
    assert!(kills >= 1, "seed {seed}: the run was never stopped");
    let stderr = finish(kiln(&pipeline_args(&recipe, &killed, &["--resume"])));
    eprintln!("seed {seed}: {kills} interruptions");
    assert!(!stderr.contains("error"), "seed {seed}: {stderr}");

    let (a, b) = (weights(&straight), weights(&killed));
    for ((stage, wa), (_, wb)) in a.iter().zip(&b) {
        assert!(
            wa == wb,
            "seed {seed}: stage {stage}: weights differ after resuming"
        );
    }
    for stage in ["sft", "rm-helpful", "rm-safety", "rs", "ppo", "gatt"] {
        let eval = |out: &Path| read(&out.join(stage).join("eval.json"));
        assert_eq!(
            eval(&straight),
            eval(&killed),
            "seed {seed}: {stage} eval.json"
        );
    }
    // Every stage is recorded as done, and the report lists each.
    let report = read(&killed.join("report.md"));
    for stage in [
        "data",
        "pretrain",
        "sft",
        "rm-helpful",
        "rm-safety",
        "rs",
        "ppo",
        "gatt",
    ] {
        assert!(killed.join(stage).join("stage.json").is_file(), "{stage}");
        assert!(
            report.contains(&format!("| {stage} |")),
            "{stage} missing: {report}"
        );
    }
}

#[test]
fn plan_report_and_refusals_of_a_completed_run() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = common::repo(TINY);
    let out = tmp.path().join("run");

    // The plan of a fresh run writes nothing.
    let (ok, _) = run(&pipeline_args(&recipe, &out, &["--plan"]));
    assert!(ok);
    assert!(!out.exists(), "--plan wrote {}", out.display());
    let plan = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(pipeline_args(&recipe, &out, &["--plan"]))
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert_eq!(plan.matches("to run").count(), 8, "{plan}");
    assert!(
        plan.contains("rs") && plan.contains("<- data, rm-helpful, rm-safety, sft"),
        "{plan}"
    );

    let (ok, stderr) = run(&pipeline_args(&recipe, &out, &[]));
    assert!(ok, "{stderr}");
    let plan = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(pipeline_args(&recipe, &out, &["--plan"]))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&plan.stdout)
            .matches(": done")
            .count(),
        8
    );

    // The report is redrawn from the run alone, the same.
    let report = read(&out.join("report.md"));
    std::fs::remove_file(out.join("report.md")).unwrap();
    std::fs::remove_dir_all(out.join("report")).unwrap();
    let (ok, stderr) = run(&["report".into(), out.display().to_string()]);
    assert!(ok, "{stderr}");
    assert_eq!(read(&out.join("report.md")), report);
    for png in ["stages.png", "compliance.png", "rs-k-curve.png"] {
        assert!(out.join("report").join(png).is_file(), "{png}");
    }
    // Each stage's curves go into the report's directory; the stages' own stay untouched.
    for png in [
        "pretrain-loss.png",
        "sft-loss.png",
        "ppo-ppo_monitor.png",
        "rs-rewards.png",
        "rs-round-2-loss.png",
    ] {
        assert!(out.join("report").join(png).is_file(), "{png}");
    }
    // Every chart drawn is linked from the report.
    for png in listing(&out.join("report")) {
        assert!(
            report.contains(&format!("report/{png})")),
            "{png} is not linked"
        );
    }
    for stage in ["pretrain", "sft", "ppo", "rs"] {
        let pngs = listing(&out.join(stage))
            .into_iter()
            .filter(|n| n.ends_with(".png"))
            .count();
        assert_eq!(pngs, 0, "{stage}");
    }
    // Skimming it tells what each stage changed against the model it started from.
    assert!(
        report.contains("`gatt` (gatt, from `ppo`): tasks"),
        "{report}"
    );

    // A fresh run into it is refused; a resumed run of the same recipe skips every stage.
    let before = listing(&out);
    let stderr = refused(&pipeline_args(&recipe, &out, &[]));
    assert!(stderr.contains("--resume"), "{stderr}");
    let (ok, stderr) = run(&pipeline_args(&recipe, &out, &["--resume"]));
    assert!(ok, "{stderr}");
    assert_eq!(stderr.matches("done, skipped").count(), 8, "{stderr}");

    // A completed stage's config changed: refused, naming the stage and the key.
    let text = read(&recipe);
    let changed = tmp.path().join("changed.toml");
    std::fs::write(&changed, text.replace("max_steps = 3\n", "max_steps = 4\n")).unwrap();
    let stderr = refused(&pipeline_args(&changed, &out, &["--resume"]));
    assert!(
        stderr.contains("stage `rm-helpful`")
            && stderr.contains("train.max_steps")
            && stderr.contains("--rerun-from"),
        "{stderr}"
    );
    assert_eq!(listing(&out), before);

    // Another recipe's run: OUT holds a stage this recipe does not have.
    let other = tmp.path().join("other.toml");
    std::fs::write(&other, text.replace("name = \"gatt\"", "name = \"ghost\"")).unwrap();
    let stderr = refused(&pipeline_args(&other, &out, &["--resume"]));
    assert!(
        stderr.contains("stage `gatt`") && stderr.contains("another recipe"),
        "{stderr}"
    );
    assert_eq!(listing(&out), before);

    // A completed stage's output changed on disk: refused.
    let manifest = kiln::interop::checkpoint::resolve(&out.join("gatt"))
        .unwrap()
        .join(kiln::interop::checkpoint::MANIFEST_FILE);
    let saved = read(&manifest);
    std::fs::write(&manifest, saved.replace("{", "{ ")).unwrap();
    let stderr = refused(&pipeline_args(&recipe, &out, &["--resume"]));
    assert!(
        stderr.contains("stage `gatt`") && stderr.contains("changed"),
        "{stderr}"
    );
    std::fs::write(&manifest, &saved).unwrap();

    // --rerun-from reruns the stage and those after it; the old runs are kept aside.
    let gatt_before = weights(&out).pop().unwrap();
    let (ok, stderr) = run(&pipeline_args(
        &changed,
        &out,
        &["--rerun-from", "rm-helpful"],
    ));
    assert!(ok, "{stderr}");
    assert_eq!(stderr.matches("done, skipped").count(), 3, "{stderr}");
    let replaced: Vec<PathBuf> = std::fs::read_dir(out.join("replaced"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(replaced.len(), 1);
    assert_eq!(
        listing(&replaced[0]),
        ["gatt", "ppo", "rm-helpful", "rm-safety", "rs"]
    );
    let gatt_after = weights(&out).pop().unwrap();
    assert!(gatt_before.1 != gatt_after.1, "the rerun changed nothing");

    // An interrupted stage (as if killed before its stage.json) resumes only with the config
    // it started with.
    std::fs::remove_file(out.join("gatt").join("stage.json")).unwrap();
    let edited = tmp.path().join("edited.toml");
    let edited_text = read(&changed).replace("cut_answers = \"keep\"", "cut_answers = \"drop\"");
    std::fs::write(&edited, edited_text).unwrap();
    let stderr = refused(&pipeline_args(&edited, &out, &["--resume"]));
    assert!(
        stderr.contains("stage `gatt`")
            && stderr.contains("gatt.cut_answers")
            && stderr.contains("interrupted"),
        "{stderr}"
    );
    let (ok, stderr) = run(&pipeline_args(&changed, &out, &["--resume"]));
    assert!(ok, "{stderr}");
    assert_eq!(weights(&out).pop().unwrap().1, gatt_after.1);
}

/// Runs `kiln args` and checks it was refused as bad input: non-zero exit, no panic, one
/// error line. Returns its stderr.
fn refused(args: &[String]) -> String {
    common::rlhf::refused(args.to_vec(), &[])
}

#[test]
fn bad_recipes_are_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let text = read(&common::repo(TINY));
    let no_prompts = tmp.path().join("no-unsafe-prompts");
    std::fs::create_dir(&no_prompts).unwrap();
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "a directory without unsafe prompts",
            text.replace(
                "[stage.gym]\n",
                &format!(
                    "[stage.gym]\nunsafe_dir = {:?}\n",
                    no_prompts.display().to_string()
                ),
            ),
            &[
                "stage `data`",
                "gym.unsafe_dir",
                "no-unsafe-prompts",
                "no *.jsonl files",
            ],
        ),
        (
            "a reference to no stage",
            text.replace("init = \"@pretrain\"", "init = \"@pretrian\""),
            &["stage `sft`", "init", "@pretrian", "no stage"],
        ),
        (
            "a reference to a later stage",
            text.replacen(
                "val = [\"@data/pref_heldout.jsonl\"]",
                "val = [\"@rm-safety/pairs.jsonl\"]",
                1,
            ),
            &["stage `rm-helpful`", "data.val", "@rm-safety", "later"],
        ),
        (
            "a cycle",
            text.replace("init = \"@pretrain\"", "init = \"@rm-helpful\""),
            &["stage `sft`", "cycle", "sft -> rm-helpful -> sft"],
        ),
        (
            "two stages with one name",
            text.replace("name = \"rm-safety\"", "name = \"rm-helpful\""),
            &["two stages", "rm-helpful"],
        ),
        (
            "an unknown kind",
            text.replace("kind = \"gatt\"", "kind = \"gat\""),
            &["stage `gatt`", "unknown kind `gat`"],
        ),
        (
            "an unknown config key",
            text.replace("cut_answers = \"keep\"", "cut_answer = \"keep\""),
            &["stage `gatt`", "gatt.cut_answer"],
        ),
        (
            "a bad config value",
            text.replace("k = 3\n", "k = 0\n"),
            &["stage `rs`", "rs.k"],
        ),
        (
            "a missing input file",
            text.replace(
                "data/shakespeare/macbeth.txt",
                "data/shakespeare/macbth.txt",
            ),
            &["stage `pretrain`", "data.corpus", "macbth.txt"],
        ),
        (
            "a missing init",
            text.replace("init = \"@ppo\"\n", ""),
            &["stage `gatt`", "`init` is required"],
        ),
        (
            "an eval stage without a model",
            text + "\n[[stage]]\nname = \"final\"\nkind = \"eval\"\n",
            &["stage `final`", "`checkpoint` is required"],
        ),
    ];
    for (what, recipe_text, expected) in cases {
        let recipe = tmp.path().join("recipe.toml");
        std::fs::write(&recipe, &recipe_text).unwrap();
        let out = tmp.path().join("out");
        let stderr = refused(&pipeline_args(&recipe, &out, &[]));
        for e in expected {
            assert!(stderr.contains(e), "{what}: expected {e:?} in: {stderr}");
        }
        assert!(!out.exists(), "{what}: {} was created", out.display());
    }
}
