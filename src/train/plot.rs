//! `kiln plot OUT`: loss and learning-rate curves of a run as PNG files, from its
//! `metrics.jsonl`. The font is bundled (DejaVu Sans Mono) so plots need no system fonts.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Result, anyhow, bail};
use plotters::prelude::*;

use crate::train::metrics::{self, Record};

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let bytes = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");
        // Only fails on an invalid font file, which the test below rules out.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, bytes);
    });
}

/// Writes `loss.png` (training and validation loss) and `lr.png` into `out_dir`; for a
/// rejection-sampling run (`rounds.jsonl`), `rewards.png` and `time.png` per round.
pub fn plot_run(out_dir: &Path) -> Result<Vec<PathBuf>> {
    plot_run_into(out_dir, &Outputs::beside(out_dir))
}

/// Where a run's charts go: a directory, each file's name after a prefix.
pub struct Outputs {
    pub dir: PathBuf,
    pub prefix: String,
}

impl Outputs {
    /// Into the run's own directory (`kiln plot`).
    pub fn beside(run: &Path) -> Self {
        Self {
            dir: run.to_path_buf(),
            prefix: String::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{}{name}", self.prefix))
    }
}

/// [`plot_run`] with the charts written to `into` (the pipeline's report leaves the stages'
/// own directories as they were).
pub fn plot_run_into(out_dir: &Path, into: &Outputs) -> Result<Vec<PathBuf>> {
    if crate::stages::ppo::is_ppo_run(out_dir) {
        return plot_ppo(out_dir, into);
    }
    let rounds = out_dir.join(crate::stages::rs::ROUNDS_FILE);
    if rounds.is_file() && !out_dir.join("metrics.jsonl").exists() {
        return plot_rounds(&rounds, into);
    }
    let records = metrics::read(&out_dir.join("metrics.jsonl"))?;
    let mut train = Vec::new();
    let mut val = Vec::new();
    let mut lr = Vec::new();
    for r in records {
        match r {
            Record::Step {
                step,
                loss,
                lr: rate,
                ..
            } => {
                train.push((step as f64, loss));
                lr.push((step as f64, rate));
            }
            Record::Eval { step, val_loss, .. } => val.push((step as f64, val_loss)),
        }
    }
    if train.is_empty() {
        bail!(
            "{}: no training steps recorded",
            out_dir.join("metrics.jsonl").display()
        );
    }
    let (loss_png, lr_png) = (into.path("loss.png"), into.path("lr.png"));
    check_outputs(&[loss_png.clone(), lr_png.clone()])?;
    line_chart(
        &loss_png,
        "Loss",
        "step",
        "loss",
        &[("train", &train, BLUE), ("validation", &val, RED)],
    )?;
    line_chart(&lr_png, "Learning rate", "step", "lr", &[("lr", &lr, BLUE)])?;
    Ok(vec![loss_png, lr_png])
}

/// A line chart of `series` (name, points, colour) written to `path` as PNG.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    stacked_charts(
        path,
        &[Panel {
            x_names: &[],
            title,
            x_label,
            y_label,
            series,
        }],
    )
}

/// A line of a chart: its name, its points and its colour.
pub type Series<'a> = (&'a str, &'a Vec<(f64, f64)>, RGBColor);

/// One chart of a figure.
pub struct Panel<'a> {
    pub title: &'a str,
    /// Names of the x positions 1, 2, ... (stages); empty: the x axis shows numbers.
    pub x_names: &'a [String],
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series<'a>],
}

/// Charts stacked top to bottom in one PNG (quantities of different scales over one x axis).
pub fn stacked_charts(path: &Path, panels: &[Panel]) -> Result<()> {
    register_font();
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root =
        BitMapBackend::new(path, (900, 540 * panels.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    for (panel, area) in panels.iter().zip(&areas) {
        draw_panel(area, panel).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    panel: &Panel,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let points = panel.series.iter().flat_map(|s| s.1.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points.filter(|p| p.1.is_finite()) {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    // An axis spanning more than f64 can hold (1e308 and -1e308) has no ticks to draw:
    // plotters would search for them forever.
    if !(y_max - y_min).is_finite() {
        return Err(format!(
            "{}: values from {y_min:e} to {y_max:e} span more than a plot axis can",
            panel.title
        )
        .into());
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-9);
    // Room above the data for the legend (upper right, a line per series), so that it does
    // not cover the last points.
    let legend_room = pad * 1.8 * panel.series.len() as f64;
    // Named positions sit half a step in from the edges.
    let x_range = if panel.x_names.is_empty() {
        0.0..x_max
    } else {
        0.5..panel.x_names.len() as f64 + 0.5
    };
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, (FONT, 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, (y_min - pad)..(y_max + pad + legend_room))?;
    chart
        .configure_mesh()
        .x_desc(panel.x_label)
        // Whole numbers only (steps, rounds, K): a fractional tick stays unlabelled rather
        // than rounding to its neighbour's label.
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() >= 1e-9 {
                String::new()
            } else if panel.x_names.is_empty() {
                format!("{x:.0}")
            } else {
                let i = x.round() as usize;
                if (1..=panel.x_names.len()).contains(&i) {
                    panel.x_names[i - 1].clone()
                } else {
                    Default::default()
                }
            }
        })
        .y_desc(panel.y_label)
        .label_style((FONT, 14))
        .draw()?;
    for (name, data, color) in panel.series {
        if data.is_empty() {
            continue;
        }
        let color = *color;
        if !panel.x_names.is_empty() {
            chart.draw_series(
                data.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )?;
        }
        chart
            .draw_series(LineSeries::new(data.iter().cloned(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Fails, naming the path, if any of `outputs` cannot be written as a file (a directory is
/// in its place): checked before the first is written, so a failed plot replaces nothing.
pub fn check_outputs(outputs: &[PathBuf]) -> Result<()> {
    for path in outputs {
        if path.is_dir() {
            bail!(
                "{} is a directory: cannot write the plot there",
                path.display()
            );
        }
    }
    Ok(())
}

fn plot_rounds(path: &Path, into: &Outputs) -> Result<Vec<PathBuf>> {
    let rounds: Vec<crate::stages::rs::RoundSummary> =
        crate::data::chat::read_jsonl(path, false, |line| Ok(serde_json::from_str(line)?))?.records;
    if rounds.is_empty() {
        bail!("{}: no finished round", path.display());
    }
    let series = |f: &dyn Fn(&crate::stages::rs::RoundSummary) -> f64| -> Vec<(f64, f64)> {
        rounds.iter().map(|r| (r.round as f64, f(r))).collect()
    };
    let (mean, median, max, selected, pool) = (
        series(&|r| r.reward_mean),
        series(&|r| r.reward_median),
        series(&|r| r.reward_max),
        series(&|r| r.selected_reward),
        series(&|r| r.pool_reward),
    );
    let (sampling, scoring, training) = (
        series(&|r| r.sampling_s),
        series(&|r| r.scoring_s),
        series(&|r| r.training_s),
    );
    let outputs = [into.path("rewards.png"), into.path("time.png")];
    check_outputs(&outputs)?;
    line_chart(
        &outputs[0],
        "Combined reward of the K samples per prompt",
        "round",
        "reward",
        &[
            ("max", &max, RED),
            ("selected", &selected, MAGENTA),
            ("pool (trained)", &pool, GREEN),
            ("mean", &mean, BLUE),
            ("median", &median, CYAN),
        ],
    )?;
    line_chart(
        &outputs[1],
        "Time per round",
        "round",
        "seconds",
        &[
            ("sampling", &sampling, BLUE),
            ("scoring", &scoring, RED),
            ("training", &training, GREEN),
        ],
    )?;
    Ok(outputs.to_vec())
}

/// PPO's charts: `ppo_monitor.png` (reward-model reward and gold score over KL: the
/// reward-hacking monitor), `ppo_losses.png` and `ppo_time.png`.
fn plot_ppo(out_dir: &Path, into: &Outputs) -> Result<Vec<PathBuf>> {
    use crate::stages::ppo::{EvalRecord, IterationRecord, PpoRecord};
    let path = out_dir.join("metrics.jsonl");
    let records: Vec<PpoRecord> = metrics::read_records(&path)?;
    let its: Vec<&IterationRecord> = records
        .iter()
        .filter_map(|r| match r {
            PpoRecord::Iteration(r) => Some(&**r),
            PpoRecord::Eval(_) => None,
        })
        .collect();
    let evals: Vec<&EvalRecord> = records
        .iter()
        .filter_map(|r| match r {
            PpoRecord::Eval(e) => Some(e),
            PpoRecord::Iteration(_) => None,
        })
        .collect();
    if its.is_empty() {
        bail!("{}: no PPO iteration recorded", path.display());
    }
    // Metrics that only gym prompts have are `None` elsewhere: those iterations are left out.
    let optional = |f: &dyn Fn(&IterationRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        its.iter()
            .filter_map(|r| f(r).map(|v| (r.iteration as f64, v)))
            .collect()
    };
    let series = |f: &dyn Fn(&IterationRecord) -> f64| optional(&|r| Some(f(r)));
    let eval_series = |f: &dyn Fn(&EvalRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        evals
            .iter()
            .filter_map(|e| f(e).map(|v| (e.iteration as f64, v)))
            .collect()
    };
    let outputs = [
        into.path("ppo_monitor.png"),
        into.path("ppo_losses.png"),
        into.path("ppo_time.png"),
    ];
    check_outputs(&outputs)?;
    let (reward, gold) = (series(&|r| r.reward), optional(&|r| r.gold));
    let (eval_reward, eval_gold) = (
        eval_series(&|e| Some(e.eval_reward)),
        eval_series(&|e| e.eval_gold),
    );
    let (kl_answer, beta_kl) = (
        series(&|r| r.kl_per_answer),
        series(&|r| r.beta * r.kl_per_answer),
    );
    let (unsafe_refused, benign_refused) = (
        optional(&|r| r.unsafe_refused),
        optional(&|r| r.benign_refused),
    );
    stacked_charts(
        &outputs[0],
        &[
            Panel {
                x_names: &[],
                title: "Reward-model reward against the gold score",
                x_label: "iteration",
                y_label: "mean",
                series: &[
                    ("R_c (rollout)", &reward, BLUE),
                    ("gold (rollout)", &gold, RED),
                    ("R_c (held-out)", &eval_reward, CYAN),
                    ("gold (held-out)", &eval_gold, MAGENTA),
                ],
            },
            Panel {
                x_names: &[],
                title: "KL to the reference policy",
                x_label: "iteration",
                y_label: "nats per answer",
                series: &[
                    ("KL per answer", &kl_answer, BLUE),
                    ("beta x KL (the penalty)", &beta_kl, RED),
                ],
            },
            Panel {
                x_names: &[],
                title: "Refusals (gym prompts)",
                x_label: "iteration",
                y_label: "share",
                series: &[
                    ("unsafe prompts refused", &unsafe_refused, GREEN),
                    ("benign prompts refused", &benign_refused, RED),
                ],
            },
        ],
    )?;
    let (policy_loss, value_loss) = (series(&|r| r.policy_loss), series(&|r| r.value_loss));
    let (clip, approx_kl, entropy, explained) = (
        series(&|r| r.clip_fraction),
        series(&|r| r.approx_kl),
        series(&|r| r.entropy),
        series(&|r| r.explained_variance),
    );
    stacked_charts(
        &outputs[1],
        &[
            Panel {
                x_names: &[],
                title: "Policy loss",
                x_label: "iteration",
                y_label: "loss",
                series: &[("clipped surrogate", &policy_loss, BLUE)],
            },
            Panel {
                x_names: &[],
                title: "Value loss",
                x_label: "iteration",
                y_label: "loss",
                series: &[("clipped value loss", &value_loss, RED)],
            },
            Panel {
                x_names: &[],
                title: "Update statistics",
                x_label: "iteration",
                y_label: "",
                series: &[
                    ("clip fraction", &clip, BLUE),
                    ("approx. KL", &approx_kl, RED),
                    ("entropy", &entropy, GREEN),
                    ("explained variance", &explained, MAGENTA),
                ],
            },
        ],
    )?;
    let (generation, scoring, no_grad, update) = (
        series(&|r| r.generation_s),
        series(&|r| r.scoring_s),
        series(&|r| r.no_grad_s),
        series(&|r| r.update_s),
    );
    line_chart(
        &outputs[2],
        "Time per iteration",
        "iteration",
        "seconds",
        &[
            ("generation", &generation, BLUE),
            ("reward models", &scoring, RED),
            ("reference and values", &no_grad, CYAN),
            ("update", &update, GREEN),
        ],
    )?;
    Ok(outputs.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_a_metrics_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for step in 1..=20u64 {
            let r = Record::Step {
                step,
                loss: 8.0 / step as f64,
                lr: 1e-3,
                grad_norm: 1.0,
                tokens_per_s: 1.0,
                elapsed_s: step as f64,
            };
            text.push_str(&serde_json::to_string(&r).unwrap());
            text.push('\n');
        }
        let eval = Record::Eval {
            step: 20,
            val_loss: 0.5,
            val_perplexity: 0.5f64.exp(),
        };
        text.push_str(&serde_json::to_string(&eval).unwrap());
        std::fs::write(dir.path().join("metrics.jsonl"), text).unwrap();
        let files = plot_run(dir.path()).unwrap();
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{}", f.display());
            assert!(bytes.len() > 5000, "{} looks empty", f.display());
        }
    }
}
