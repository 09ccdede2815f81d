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
    let rounds = out_dir.join(crate::stages::rs::ROUNDS_FILE);
    if rounds.is_file() && !out_dir.join("metrics.jsonl").exists() {
        return plot_rounds(out_dir, &rounds);
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
    let loss_png = out_dir.join("loss.png");
    line_chart(
        &loss_png,
        "Loss",
        "step",
        "loss",
        &[("train", &train, BLUE), ("validation", &val, RED)],
    )?;
    let lr_png = out_dir.join("lr.png");
    line_chart(&lr_png, "Learning rate", "step", "lr", &[("lr", &lr, BLUE)])?;
    Ok(vec![loss_png, lr_png])
}

/// A line chart of `series` (name, points, colour) written to `path` as PNG.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, &Vec<(f64, f64)>, RGBColor)],
) -> Result<()> {
    register_font();
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let points = series.iter().flat_map(|s| s.1.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-9);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        // Whole numbers only (steps, rounds, K): a fractional tick stays unlabelled rather
        // than rounding to its neighbour's label.
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-9 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .label_style((FONT, 14))
        .draw()
        .map_err(|e| err(&e))?;
    for (name, data, color) in series {
        if data.is_empty() {
            continue;
        }
        let color = *color;
        chart
            .draw_series(LineSeries::new(data.iter().cloned(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn plot_rounds(out_dir: &Path, path: &Path) -> Result<Vec<PathBuf>> {
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
    let outputs = [out_dir.join("rewards.png"), out_dir.join("time.png")];
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
