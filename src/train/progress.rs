//! Progress of a training run: an `indicatif` bar on a terminal, plain lines otherwise (logs,
//! CI), so that piped output stays readable.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Puts a new bar at `start` (a resumed run's position) without counting the jump as speed:
/// indicatif's rate estimate would otherwise take the resumed steps as done in an instant,
/// and the ETA right after a resume was several times too short.
fn start_at(bar: &ProgressBar, start: u64) {
    bar.set_position(start);
    bar.tick();
    bar.reset_eta();
}

pub struct Progress {
    bar: Option<ProgressBar>,
    log_interval: u64,
    /// Where the last plain line was printed ([`Progress::update`]).
    logged: u64,
}

impl Progress {
    pub fn new(start: u64, total: u64, log_interval: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | eta {eta}")
                    .expect("valid template"),
            );
            start_at(&bar, start);
            bar
        });
        Self {
            bar,
            log_interval: log_interval.max(1),
            logged: start,
        }
    }

    /// The progress `make` builds where `show` holds; otherwise one that prints nothing at all
    /// (a data-parallel worker other than worker 0), without drawing a bar first.
    pub fn shown_if(show: bool, make: impl FnOnce() -> Self) -> Self {
        match show {
            true => make(),
            false => Self {
                bar: Some(ProgressBar::hidden()),
                log_interval: 1,
                logged: 0,
            },
        }
    }

    /// A bar over `total` items of `unit` (prompts, ...), starting at `start`; without a
    /// terminal a line about every tenth of the way.
    pub fn counter(start: u64, total: u64, unit: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{bar:30}} {{pos}}/{{len}} {unit} | {{msg}} | eta {{eta}}"
                ))
                .expect("valid template"),
            );
            start_at(&bar, start);
            bar
        });
        Self {
            bar,
            log_interval: (total / 10).max(1),
            logged: start,
        }
    }

    /// Moves a [`Progress::counter`] to `position`, with `line` saying how it goes.
    pub fn update(&mut self, position: u64, line: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(position);
                bar.set_message(line.to_string());
            }
            // A line each time another tenth of the way is passed.
            None if position / self.log_interval > self.logged / self.log_interval => {
                self.logged = position;
                eprintln!("{position:>6} | {line}");
            }
            None => {}
        }
    }

    pub fn step(&mut self, step: u64, loss: f64, lr: f64, tokens_per_s: f64) {
        let line = format!("loss {loss:.4} | lr {lr:.2e} | {tokens_per_s:.0} tok/s");
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(line);
            }
            None if step.is_multiple_of(self.log_interval) => eprintln!("step {step:>6} | {line}"),
            None => {}
        }
    }

    /// A line that stays (evaluations, checkpoints), printed above the bar.
    pub fn message(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
