//! A run's output directory, the same for every stage:
//!
//! ```text
//! OUT/config.toml      the run's resolved configuration, written with its first checkpoint
//! OUT/metrics.jsonl    one JSON object per step and per evaluation
//! OUT/checkpoints/     step-NNNNNNNN/ written atomically, the newest `keep_checkpoints` kept
//! ```
//!
//! It is checked before any work starts (a new run needs an empty place, `--resume` a
//! checkpoint), Ctrl-C finishes the step and saves, and [`TrainState`] is everything besides
//! tensors that a resumed run needs to continue exactly.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::config::ConfigSource;
use crate::data::corpus::DataCursor;
use crate::interop::checkpoint::{self, CheckpointData};

/// Set by the SIGINT handler: the loop saves a checkpoint after the current step and stops.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler of the training commands: the first Ctrl-C finishes the step
/// and saves a checkpoint, a second one exits at once (the last checkpoint is intact).
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)"
        );
    })
    .map_err(|e| anyhow!("cannot install the Ctrl-C handler: {e}"))
}

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Position of the shuffled training stream.
    pub data: DataCursor,
    /// Seed of the initialisation and of the data order (the data order's generator is
    /// re-derived from it and the cursor's epoch, so no generator state needs saving).
    pub seed: u64,
    pub tokens_seen: u64,
    /// Wall time spent training, summed over resumes.
    pub elapsed_s: f64,
    /// Length of the learning-rate schedule, fixed when the run started: a resumed run that
    /// extends `train.max_steps` keeps the rate of every step scheduled before, and runs the
    /// steps past it at the schedule's final rate. 0 in checkpoints written before it was
    /// recorded (the resumed run's length is then taken).
    #[serde(default)]
    pub schedule_steps: u64,
}

impl TrainState {
    pub fn start(seed: u64) -> Self {
        Self {
            step: 0,
            data: DataCursor {
                epoch: 0,
                position: 0,
            },
            seed,
            tokens_seen: 0,
            elapsed_s: 0.0,
            schedule_steps: 0,
        }
    }
}

/// The output directory of a run, checked and ready to take it.
pub struct RunDir {
    pub path: PathBuf,
    /// The newest checkpoint, when the run resumes.
    pub resume_from: Option<PathBuf>,
}

impl RunDir {
    /// Makes sure `path` can take this run, before any work starts: a new run needs a
    /// place without checkpoints, `--resume` one with a checkpoint. Creates nothing: call
    /// [`RunDir::create`] once the run's inputs have been checked.
    ///
    /// A new run writes `OUT/config.toml`, so `--config OUT/config.toml` (a user's own file,
    /// comments and all) is refused rather than replaced. A resumed run's `config.toml` is
    /// the one kiln wrote, and is rewritten with the keys changed on resume.
    pub fn check(path: &Path, resume: bool, config: Option<&ConfigSource>) -> Result<Self> {
        let existing = checkpoint::list(&checkpoints_dir(path))?;
        match (resume, existing.last()) {
            (false, Some(_)) => bail!(
                "{} already holds a run: pass --resume to continue it, or choose another --out",
                path.display()
            ),
            (true, None) => bail!("--resume: {} holds no checkpoint to resume", path.display()),
            _ => {}
        }
        if !resume {
            refuse_config_in_place(&path.join(CONFIG_FILE), config)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            resume_from: existing.last().map(|(_, dir)| dir.clone()),
        })
    }

    /// Creates the directory if needed and makes sure it is writable.
    pub fn create(&self) -> Result<()> {
        let path = &self.path;
        std::fs::create_dir_all(path)
            .map_err(|e| anyhow!("cannot create output directory {}: {e}", path.display()))?;
        let probe = path.join(".kiln-write-probe");
        std::fs::write(&probe, b"")
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| anyhow!("output directory {} is not writable: {e}", path.display()))
    }

    /// Stores the run's resolved configuration in `OUT/config.toml` (atomically).
    pub fn write_config(&self, config_toml: &str) -> Result<()> {
        checkpoint::write_atomic(&self.path.join(CONFIG_FILE), config_toml.as_bytes())
    }

    /// Where the checkpoint of `step` is (or will be) written.
    pub fn checkpoint_path(&self, step: u64) -> PathBuf {
        checkpoints_dir(&self.path).join(checkpoint::step_dir_name(step))
    }

    /// Writes a checkpoint atomically, keeping the newest `keep`.
    pub fn save(&self, data: &CheckpointData, keep: usize) -> Result<PathBuf> {
        checkpoint::save(&checkpoints_dir(&self.path), data, keep)
    }
}

/// Where a run (of any stage, rejection sampling and PPO too) stores its resolved
/// configuration. A checkpoint keeps its own copy ([`checkpoint::CONFIG_FILE`]).
pub const CONFIG_FILE: &str = "config.toml";

/// Refuses a `--config` file that is `target`, the file a new run is about to write.
pub fn refuse_config_in_place(target: &Path, config: Option<&ConfigSource>) -> Result<()> {
    let Some(ConfigSource::File(given)) = config else {
        return Ok(());
    };
    let same = match (std::fs::canonicalize(given), std::fs::canonicalize(target)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        bail!(
            "--config {} is the file this run writes its resolved configuration to: move it out of --out {} (kiln never replaces a file it was given)",
            given.display(),
            target.parent().unwrap_or(target).display()
        );
    }
    Ok(())
}

fn checkpoints_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}
