//! The report of a `kiln pipeline` run: `OUT/report.md` and `OUT/report/*.png`, drawn from
//! what the run stored (`plan.json`, each stage's `stage.json`, `eval.json`, metrics and
//! samples), so `kiln report OUT` redraws it at any time and the pipeline redraws it after
//! every stage.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use plotters::style::{BLACK, BLUE, CYAN, GREEN, MAGENTA, RED, RGBColor};

use crate::gym::eval::GymReport;
use crate::infer::score::RmReport;
use crate::stages::pipeline::{
    self, EVAL_FILE, PLAN_FILE, PlanEntry, STAGE_FILE, StageEval, StageKind, StageRecord,
};
use crate::stages::rs::{self, RoundSummary, SampleRecord};
use crate::train::plot::{self, Panel, Series};

pub const REPORT_FILE: &str = "report.md";
pub const REPORT_DIR: &str = "report";

/// A stage as the report sees it.
struct StageView {
    plan: PlanEntry,
    record: Option<StageRecord>,
    eval: Option<StageEval>,
}

impl StageView {
    fn gym(&self) -> Option<&GymReport> {
        match &self.eval {
            Some(StageEval::Gym(g)) => Some(g),
            _ => None,
        }
    }

    fn rm(&self) -> Option<&RmReport> {
        match &self.eval {
            Some(StageEval::RewardModel(r)) => Some(r),
            _ => None,
        }
    }
}

/// A JSON file of the run, if it was written.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    path.is_file()
        .then(|| pipeline::read_json(path))
        .transpose()
}

fn read_views(out: &Path) -> Result<Vec<StageView>> {
    let plan: Vec<PlanEntry> = read_json(&out.join(PLAN_FILE))?.ok_or_else(|| {
        anyhow!(
            "{} holds no pipeline run ({} is missing)",
            out.display(),
            out.join(PLAN_FILE).display()
        )
    })?;
    plan.into_iter()
        .map(|plan| {
            let dir = out.join(&plan.name);
            let record: Option<StageRecord> = read_json(&dir.join(STAGE_FILE))?;
            // An evaluation counts once its stage completed (a later rerun may be writing one).
            let eval = match &record {
                Some(_) => read_json(&dir.join(EVAL_FILE))?,
                None => None,
            };
            Ok(StageView { plan, record, eval })
        })
        .collect()
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or("-".into(), f)
}

/// Mean compliance over turns 3 to 6 (the turns GAtt is for), or over what there is.
fn late_compliance(g: &GymReport) -> Option<f64> {
    let late: Vec<f64> = g
        .compliance_by_turn
        .iter()
        .skip(2)
        .take(4)
        .copied()
        .collect();
    (!late.is_empty()).then(|| late.iter().sum::<f64>() / late.len() as f64)
}

/// Each evaluated stage against the stage it started from, when that one was evaluated too:
/// one line of before -> after per figure.
fn against_start(views: &[StageView]) -> Vec<String> {
    let mut lines = Vec::new();
    for v in views {
        let Some(after) = v.gym() else { continue };
        let Some(start) = v.plan.init_stage.as_ref() else {
            continue;
        };
        let Some(before) = views
            .iter()
            .find(|w| &w.plan.name == start)
            .and_then(|w| w.gym())
        else {
            continue;
        };
        let change = |name: &str, b: f64, a: f64| {
            format!("{name} {} -> {} ({:+.1})", pct(b), pct(a), 100.0 * (a - b))
        };
        let mut parts = vec![
            change("tasks", before.task_accuracy, after.task_accuracy),
            format!(
                "gold score {:.3} -> {:.3}",
                before.task_score, after.task_score
            ),
            change(
                "unsafe refused",
                before.unsafe_refusal_rate,
                after.unsafe_refusal_rate,
            ),
            change(
                "benign refused",
                before.benign_refusal_rate,
                after.benign_refusal_rate,
            ),
        ];
        if let (Some(b), Some(a)) = (late_compliance(before), late_compliance(after)) {
            parts.push(change("compliance t3-6", b, a));
        }
        lines.push(format!(
            "`{}` ({}, from `{start}`): {}",
            v.plan.name,
            v.plan.kind.name(),
            parts.join(", ")
        ));
    }
    lines
}

/// The per-stage table's rows: stage, kind, time, steps, final loss, task accuracy, unsafe
/// refused, benign refused, compliance at turns 3-6, reward-model accuracy.
fn rows(views: &[StageView]) -> Vec<[String; 10]> {
    views
        .iter()
        .map(|v| {
            let r = v.record.as_ref();
            let g = v.gym();
            [
                v.plan.name.clone(),
                v.plan.kind.name().to_string(),
                opt(r, |r| pipeline::duration(r.wall_s)),
                opt(r.and_then(|r| r.steps), |s| s.to_string()),
                opt(r.and_then(|r| r.final_val_loss), |l| format!("{l:.4}")),
                opt(g, |g| pct(g.task_accuracy)),
                opt(g, |g| pct(g.unsafe_refusal_rate)),
                opt(g, |g| pct(g.benign_refusal_rate)),
                opt(g.and_then(late_compliance), pct),
                opt(v.rm(), |r| pct(r.accuracy)),
            ]
        })
        .collect()
}

const HEADER: [&str; 10] = [
    "stage",
    "kind",
    "time",
    "steps",
    "val loss",
    "tasks",
    "unsafe refused",
    "benign refused",
    "compliance t3-6",
    "RM accuracy",
];

/// The per-stage table as aligned text, for the terminal.
pub fn table_text(out: &Path) -> Result<String> {
    let views = read_views(out)?;
    let mut rows = rows(&views);
    for (row, v) in rows.iter_mut().zip(&views) {
        if v.record.is_none() {
            row[2] = "(not done)".into();
        }
    }
    let all: Vec<Vec<String>> = std::iter::once(HEADER.map(String::from).to_vec())
        .chain(rows.into_iter().map(|r| r.to_vec()))
        .collect();
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|c| all.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in &all {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                if c < 2 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        writeln!(text, "{}", cells.join("  ").trim_end()).unwrap();
    }
    Ok(text)
}

const PALETTE: [RGBColor; 8] = [
    BLUE,
    RED,
    GREEN,
    MAGENTA,
    CYAN,
    BLACK,
    RGBColor(230, 140, 0),
    RGBColor(120, 80, 40),
];

/// Named lines as chart series, each in the next colour of the palette.
fn coloured(lines: &[(String, Points)]) -> Vec<Series<'_>> {
    lines
        .iter()
        .enumerate()
        .map(|(i, (name, points))| (name.as_str(), points, PALETTE[i % PALETTE.len()]))
        .collect()
}

/// Expected maximum of `k` answers drawn without replacement from these `rewards`: the
/// order-statistics estimate over all k-subsets, from one set of K samples.
pub fn expected_max_of(rewards: &[f64], k: usize) -> f64 {
    let mut sorted = rewards.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    // P(the i-th smallest is the max of a k-subset) = C(i-1, k-1) / C(n, k), i = k..n.
    let ln_choose =
        |n: usize, k: usize| -> f64 { (1..=k).map(|j| ((n - k + j) as f64 / j as f64).ln()).sum() };
    let total = ln_choose(n, k);
    (k..=n)
        .map(|i| sorted[i - 1] * (ln_choose(i - 1, k - 1) - total).exp())
        .sum()
}

/// A chart line's points.
type Points = Vec<(f64, f64)>;

/// Reward against K (the paper's Figure 7) for each round of a rejection-sampling stage,
/// from its samples: the mean over prompts of the expected best of K of the round's answers.
fn k_curve(dir: &Path) -> Result<Vec<(usize, Points)>> {
    let mut curves = Vec::new();
    for round in 1.. {
        let path = dir.join(format!("round-{round}")).join(rs::SAMPLES_FILE);
        if !path.is_file() {
            break;
        }
        let samples: Vec<SampleRecord> =
            crate::data::chat::read_jsonl(&path, false, |line| Ok(serde_json::from_str(line)?))?
                .records;
        let mut by_prompt: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for s in samples {
            by_prompt
                .entry(s.prompt_index)
                .or_default()
                .push(s.score.reward);
        }
        let k_max = by_prompt.values().map(Vec::len).min().unwrap_or(0);
        let curve = (1..=k_max)
            .map(|k| {
                let mean = by_prompt
                    .values()
                    .map(|r| expected_max_of(r, k))
                    .sum::<f64>()
                    / by_prompt.len() as f64;
                (k as f64, mean)
            })
            .collect();
        curves.push((round, curve));
    }
    Ok(curves)
}

/// Writes `OUT/report.md` and its charts; returns the report's path.
pub fn write(out: &Path) -> Result<PathBuf> {
    let views = read_views(out)?;
    let charts = out.join(REPORT_DIR);
    std::fs::create_dir_all(&charts)
        .with_context(|| format!("cannot create {}", charts.display()))?;
    let mut md = String::new();
    let done = views.iter().filter(|v| v.record.is_some()).count();
    writeln!(md, "# Pipeline report\n").unwrap();
    writeln!(
        md,
        "{} of {} stages done. The recipe: [`{}`]({}). Redraw with `kiln report {}`.\n",
        done,
        views.len(),
        pipeline::RECIPE_COPY,
        pipeline::RECIPE_COPY,
        out.display()
    )
    .unwrap();
    let total: f64 = views
        .iter()
        .filter_map(|v| v.record.as_ref().map(|r| r.wall_s))
        .sum();
    writeln!(md, "## Stages\n").unwrap();
    writeln!(md, "| {} |", HEADER.join(" | ")).unwrap();
    writeln!(md, "|{}", "---|".repeat(HEADER.len())).unwrap();
    for row in rows(&views) {
        writeln!(md, "| {} |", row.join(" | ")).unwrap();
    }
    writeln!(
        md,
        "\nTotal time of the completed stages: {} (wall clock, evaluation included). Tasks: exact match on the held-out tasks; refusals on held-out unsafe and benign prompts; compliance: the system instruction's, turns 3 to 6 of held-out dialogues; RM accuracy: held-out preference pairs.\n",
        pipeline::duration(total)
    )
    .unwrap();

    let gym: Vec<(&StageView, &GymReport)> = views
        .iter()
        .filter_map(|v| v.gym().map(|g| (v, g)))
        .collect();
    if !gym.is_empty() {
        let names: Vec<String> = gym.iter().map(|(v, _)| v.plan.name.clone()).collect();
        let at = |f: &dyn Fn(&GymReport) -> Option<f64>| -> Points {
            gym.iter()
                .enumerate()
                .filter_map(|(i, (_, g))| f(g).map(|y| ((i + 1) as f64, 100.0 * y)))
                .collect()
        };
        let (tasks, unsafe_refused, benign_refused, late) = (
            at(&|g| Some(g.task_accuracy)),
            at(&|g| Some(g.unsafe_refusal_rate)),
            at(&|g| Some(g.benign_refusal_rate)),
            at(&late_compliance),
        );
        let stages_png = charts.join("stages.png");
        plot::stacked_charts(
            &stages_png,
            &[Panel {
                x_names: &names,
                title: "Held-out evaluation after each stage",
                x_label: "stage",
                y_label: "%",
                series: &[
                    ("task accuracy", &tasks, BLUE),
                    ("unsafe prompts refused", &unsafe_refused, GREEN),
                    ("benign prompts refused", &benign_refused, RED),
                    ("compliance, turns 3-6", &late, MAGENTA),
                ],
            }],
        )?;
        writeln!(md, "## What each stage bought\n").unwrap();
        writeln!(
            md,
            "![held-out evaluation per stage]({REPORT_DIR}/stages.png)\n"
        )
        .unwrap();
        for line in against_start(&views) {
            writeln!(md, "- {line}").unwrap();
        }
        writeln!(md).unwrap();
        let kinds: Vec<&String> = gym[0].1.task_accuracy_by_kind.keys().collect();
        write!(md, "| stage | ").unwrap();
        for k in &kinds {
            write!(md, "{k} | ").unwrap();
        }
        writeln!(
            md,
            "all tasks | gold score | unsafe refused | benign refused |"
        )
        .unwrap();
        writeln!(md, "|---|{}", "---|".repeat(kinds.len() + 4)).unwrap();
        for (v, g) in &gym {
            write!(md, "| {} | ", v.plan.name).unwrap();
            for k in &kinds {
                write!(
                    md,
                    "{} | ",
                    opt(g.task_accuracy_by_kind.get(*k), |a| pct(*a))
                )
                .unwrap();
            }
            writeln!(
                md,
                "{} | {:.3} | {} | {} |",
                pct(g.task_accuracy),
                g.task_score,
                pct(g.unsafe_refusal_rate),
                pct(g.benign_refusal_rate)
            )
            .unwrap();
        }
        let (t, u, d) = (gym[0].1.tasks, gym[0].1.unsafe_prompts, gym[0].1.dialogues);
        writeln!(
            md,
            "\n{t} held-out tasks, {u} held-out unsafe prompts, {d} held-out dialogues per evaluation (greedy answers).\n"
        )
        .unwrap();

        // Compliance by turn: before and after GAtt shows as the GAtt stage's line against
        // the line of the stage it started from.
        let turns = gym
            .iter()
            .map(|(_, g)| g.compliance_by_turn.len())
            .max()
            .unwrap_or(0);
        if turns > 0 {
            let lines: Vec<(String, Points)> = gym
                .iter()
                .map(|(v, g)| {
                    let points = g
                        .compliance_by_turn
                        .iter()
                        .enumerate()
                        .map(|(i, c)| ((i + 1) as f64, 100.0 * c))
                        .collect();
                    (v.plan.name.clone(), points)
                })
                .collect();
            let series = coloured(&lines);
            plot::stacked_charts(
                &charts.join("compliance.png"),
                &[Panel {
                    x_names: &[],
                    title: "Instruction compliance by turn (instruction in turn 1 only)",
                    x_label: "turn",
                    y_label: "% of dialogues",
                    series: &series,
                }],
            )?;
            writeln!(md, "### Instruction compliance by turn\n").unwrap();
            writeln!(md, "![compliance by turn]({REPORT_DIR}/compliance.png)\n").unwrap();
            write!(md, "| stage |").unwrap();
            for t in 1..=turns {
                write!(md, " turn {t} |").unwrap();
            }
            writeln!(md, "\n|---|{}", "---|".repeat(turns)).unwrap();
            for (v, g) in &gym {
                write!(md, "| {} |", v.plan.name).unwrap();
                for c in &g.compliance_by_turn {
                    write!(md, " {} |", pct(*c)).unwrap();
                }
                writeln!(md).unwrap();
            }
            for v in views.iter().filter(|v| v.plan.kind == StageKind::Gatt) {
                let before = v
                    .plan
                    .init_stage
                    .as_ref()
                    .and_then(|n| views.iter().find(|w| &w.plan.name == n))
                    .and_then(|w| w.gym().map(|g| (w, g)));
                if let (Some((w, b)), Some(a)) = (before, v.gym()) {
                    let (b, a) = (late_compliance(b), late_compliance(a));
                    if let (Some(b), Some(a)) = (b, a) {
                        writeln!(
                            md,
                            "\nGAtt (`{}`, from `{}`): compliance at turns 3-6 {} -> {}.",
                            v.plan.name,
                            w.plan.name,
                            pct(b),
                            pct(a)
                        )
                        .unwrap();
                    }
                }
            }
            writeln!(md).unwrap();
        }
    }

    let rms: Vec<(&StageView, &RmReport)> = views
        .iter()
        .filter_map(|v| v.rm().map(|r| (v, r)))
        .collect();
    if !rms.is_empty() {
        writeln!(md, "## Reward models (held-out pairs)\n").unwrap();
        let ratings: Vec<&String> = {
            let mut all: Vec<&String> = rms
                .iter()
                .flat_map(|(_, r)| r.accuracy_by_rating.keys())
                .collect();
            all.sort();
            all.dedup();
            all
        };
        write!(md, "| stage | pairs | accuracy |").unwrap();
        for r in &ratings {
            write!(md, " {r} |").unwrap();
        }
        writeln!(md, " unsafe flagged (recall) | refusals flagged |").unwrap();
        writeln!(md, "|---|---|---|{}---|---|", "---|".repeat(ratings.len())).unwrap();
        for (v, r) in &rms {
            write!(
                md,
                "| {} | {} | {} |",
                v.plan.name,
                r.pairs,
                pct(r.accuracy)
            )
            .unwrap();
            for rating in &ratings {
                write!(
                    md,
                    " {} |",
                    opt(r.accuracy_by_rating.get(*rating), |a| pct(*a))
                )
                .unwrap();
            }
            writeln!(
                md,
                " {} | {} |",
                opt(r.unsafe_recall, pct),
                opt(r.refusals_flagged, pct)
            )
            .unwrap();
        }
        writeln!(md).unwrap();
    }

    for v in views.iter().filter(|v| v.plan.kind == StageKind::Rs) {
        let Some(record) = &v.record else { continue };
        let rounds: Vec<RoundSummary> =
            serde_json::from_value(record.details.clone()).map_err(|e| {
                anyhow!(
                    "{}: details: {e}",
                    out.join(&v.plan.name).join(STAGE_FILE).display()
                )
            })?;
        writeln!(md, "## Rejection sampling: `{}`\n", v.plan.name).unwrap();
        writeln!(
            md,
            "| round | K | mean reward | median of K | best of K | selected | pool | val loss |"
        )
        .unwrap();
        writeln!(md, "|---|---|---|---|---|---|---|---|").unwrap();
        for r in &rounds {
            writeln!(
                md,
                "| {} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {} | {} |",
                r.round,
                r.k,
                r.reward_mean,
                r.reward_median,
                r.reward_max,
                r.selected_reward,
                r.pool_size,
                opt(r.final_val_loss, |l| format!("{l:.4}"))
            )
            .unwrap();
        }
        let curves = k_curve(&out.join(&v.plan.name))?;
        if !curves.is_empty() {
            let named: Vec<(String, Points)> = curves
                .into_iter()
                .map(|(round, c)| (format!("round {round}"), c))
                .collect();
            let series = coloured(&named);
            let png = format!("{}-k-curve.png", v.plan.name);
            plot::stacked_charts(
                &charts.join(&png),
                &[Panel {
                    x_names: &[],
                    title: "Expected best combined reward of K samples",
                    x_label: "K",
                    y_label: "reward",
                    series: &series,
                }],
            )?;
            writeln!(
                md,
                "\n![reward against K]({REPORT_DIR}/{png})\n\nThe expected best reward of K answers per prompt, from each round's samples (every K-subset of the round's answers): what rejection sampling harvests as K grows.\n"
            )
            .unwrap();
        }
    }

    for v in views.iter().filter(|v| v.plan.kind == StageKind::Ppo) {
        let Some(record) = &v.record else { continue };
        let evals: Vec<crate::stages::ppo::EvalRecord> =
            serde_json::from_value(record.details["evals"].clone()).unwrap_or_default();
        writeln!(md, "## PPO: `{}`\n", v.plan.name).unwrap();
        writeln!(
            md,
            "![reward, gold score and KL]({REPORT_DIR}/{}-ppo_monitor.png)\n\nThe reward models' reward and the gym's gold score of the rollouts, the KL to the starting policy, refusals; below, the greedy held-out evaluations during training.\n",
            v.plan.name
        )
        .unwrap();
        if !evals.is_empty() {
            writeln!(
                md,
                "| iteration | held-out reward | gold | unsafe refused | benign refused |"
            )
            .unwrap();
            writeln!(md, "|---|---|---|---|---|").unwrap();
            for e in &evals {
                writeln!(
                    md,
                    "| {}{} | {:.4} | {} | {} | {} |",
                    e.iteration,
                    if e.best { " (best)" } else { "" },
                    e.eval_reward,
                    opt(e.eval_gold, |g| format!("{g:.4}")),
                    opt(e.eval_unsafe_refused, pct),
                    opt(e.eval_benign_refused, pct)
                )
                .unwrap();
            }
            writeln!(md).unwrap();
        }
    }

    // Each stage's own curves, as `kiln plot` draws them, into the report's directory.
    let mut curves = String::new();
    for v in &views {
        if v.record.is_none() {
            continue;
        }
        let dir = out.join(&v.plan.name);
        let into = |prefix: String| plot::Outputs {
            dir: charts.clone(),
            prefix,
        };
        let mut pngs: Vec<PathBuf> = Vec::new();
        let plotted = matches!(
            v.plan.kind,
            StageKind::Pretrain
                | StageKind::Sft
                | StageKind::Gatt
                | StageKind::Rm
                | StageKind::Rs
                | StageKind::Ppo
        );
        if plotted {
            pngs.extend(plot::plot_run_into(
                &dir,
                &into(format!("{}-", v.plan.name)),
            )?);
        }
        if v.plan.kind == StageKind::Rs {
            for round in 1.. {
                let round_dir = dir.join(format!("round-{round}"));
                if !round_dir.join("metrics.jsonl").is_file() {
                    break;
                }
                let prefix = format!("{}-round-{round}-", v.plan.name);
                pngs.extend(plot::plot_run_into(&round_dir, &into(prefix))?);
            }
        }
        if pngs.is_empty() {
            continue;
        }
        writeln!(curves, "### {} ({})\n", v.plan.name, v.plan.kind.name()).unwrap();
        for png in pngs {
            let relative = png.strip_prefix(out).unwrap_or(&png);
            writeln!(curves, "![]({})", relative.display()).unwrap();
        }
        writeln!(curves).unwrap();
    }
    if !curves.is_empty() {
        writeln!(md, "## Training curves\n\n{curves}").unwrap();
    }
    let path = out.join(REPORT_FILE);
    crate::interop::checkpoint::write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order-statistics estimate against the mean over every k-subset, enumerated.
    #[test]
    fn expected_max_matches_enumeration() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for n in 1..=7usize {
            let rewards: Vec<f64> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            for k in 1..=n {
                let (mut sum, mut count) = (0.0f64, 0usize);
                for mask in 0u32..(1 << n) {
                    if mask.count_ones() as usize != k {
                        continue;
                    }
                    let best = (0..n)
                        .filter(|i| mask & (1 << i) != 0)
                        .map(|i| rewards[i])
                        .fold(f64::NEG_INFINITY, f64::max);
                    sum += best;
                    count += 1;
                }
                let want = sum / count as f64;
                let got = expected_max_of(&rewards, k);
                assert!(
                    (got - want).abs() < 1e-12,
                    "seed {seed}: n {n} k {k}: {got} vs {want}"
                );
            }
        }
    }
}
