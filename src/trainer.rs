//! The training loop every stage shares: gradient accumulation, AdamW with the cosine schedule
//! and global-norm clipping, metrics, periodic evaluation, atomic checkpoints, Ctrl-C and exact
//! resume. A stage supplies its data and loss as an [`Objective`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointData};
use crate::config::{ModelConfig, OptimConfig, TrainConfig};
use crate::data::{DataCursor, ShuffledIndices};
use crate::metrics::{MetricsLog, Record};
use crate::model::Llama;
use crate::optim::{self, AdamW};
use crate::params;
use crate::progress::Progress;
use crate::tokenizer::Tokenizer;

/// Set by the SIGINT handler: the loop saves a checkpoint after the current step and stops.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

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
        }
    }
}

/// What a stage trains on: examples drawn in shuffled micro-batches, and a validation loss.
/// `M` is the model the stage trains (the language model, or a reward model).
pub trait Objective<M = Llama> {
    /// Number of training examples (rows) the shuffle draws from.
    fn len(&self) -> usize;
    /// Mean loss of the training examples `indices`, and how many tokens they hold.
    fn loss(&self, model: &M, indices: &[usize]) -> (Tensor<1>, u64);
    /// Validation loss of `model` (a model without autodiff).
    fn validation_loss(&self, model: &M) -> f64;
}

pub fn checkpoints_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}

/// Makes sure `out_dir` can take this run before any work starts; returns the checkpoint to
/// resume from.
pub fn prepare_out_dir(out_dir: &Path, resume: bool) -> Result<Option<PathBuf>> {
    let existing = checkpoint::list(&checkpoints_dir(out_dir))?;
    match (resume, existing.last()) {
        (false, Some(_)) => bail!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            out_dir.display()
        ),
        (true, None) => bail!(
            "--resume: {} holds no checkpoint to resume",
            out_dir.display()
        ),
        _ => {}
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| anyhow!("cannot create output directory {}: {e}", out_dir.display()))?;
    let probe = out_dir.join(".kiln-write-probe");
    std::fs::write(&probe, b"")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| {
            anyhow!(
                "output directory {} is not writable: {e}",
                out_dir.display()
            )
        })?;
    Ok(existing.last().map(|(_, dir)| dir.clone()))
}

/// A run's model, optimizer and position, as training continues from them.
pub struct Resumed<M = Llama> {
    pub model: M,
    pub optimizer: AdamW,
    pub tokenizer: Tokenizer,
    pub state: TrainState,
}

/// Loads model, optimizer, tokenizer and training state from a checkpoint of this run, for a
/// language model of shape `model_config` on the autodiff `device`.
pub fn resume(
    dir: &Path,
    saved: CheckpointData,
    model_config: &ModelConfig,
    optim: &OptimConfig,
    device: &Device,
) -> Result<Resumed> {
    resume_with(dir, saved, optim, |seed| {
        Llama::new(model_config, seed, device)
    })
}

/// [`resume`] for any model: `build` makes the model (from the run's seed) whose parameters
/// the checkpoint fills.
pub fn resume_with<M: Module>(
    dir: &Path,
    saved: CheckpointData,
    optim: &OptimConfig,
    build: impl FnOnce(u64) -> M,
) -> Result<Resumed<M>> {
    let tokenizer = saved.tokenizer(dir)?;
    let state: TrainState = serde_json::from_str(&saved.state_json)
        .map_err(|e| anyhow!("{}: {e}", dir.join(checkpoint::STATE_FILE).display()))?;
    let model = params::import(
        build(state.seed),
        saved.model,
        &dir.join(checkpoint::MODEL_FILE),
    )?;
    let optimizer = AdamW::import(
        optim.clone(),
        &model,
        state.step,
        saved.optimizer,
        &dir.join(checkpoint::OPTIMIZER_FILE),
    )?;
    eprintln!("resuming from {} (step {})", dir.display(), state.step);
    Ok(Resumed {
        model,
        optimizer,
        tokenizer,
        state,
    })
}

/// A language model from another stage's checkpoint (`--init`), to start a new stage from.
pub struct Initial {
    pub dir: PathBuf,
    pub step: u64,
    /// The checkpoint's shape, with `kernels` as the new stage's config asks.
    pub model_config: ModelConfig,
    pub model: Llama,
    pub tokenizer: Tokenizer,
}

/// Loads the `--init` checkpoint (a checkpoint or run directory) onto the autodiff `device`.
pub fn initial_model(
    init: Option<&Path>,
    kernels: crate::kernels::Kernels,
    device: &Device,
) -> Result<Initial> {
    let init = init.ok_or_else(|| {
        anyhow!("--init is required: the checkpoint (or run directory) to start from")
    })?;
    let dir = checkpoint::resolve(init)?;
    let saved = checkpoint::load(&dir)?;
    let model_config = ModelConfig {
        kernels,
        ..saved.model_config(&dir)?
    };
    let tokenizer = saved.tokenizer(&dir)?;
    let model = params::import(
        Llama::for_import(&model_config, device),
        saved.model,
        &dir.join(checkpoint::MODEL_FILE),
    )?;
    Ok(Initial {
        dir,
        step: saved.step,
        model_config,
        model,
        tokenizer,
    })
}

/// The fixed parts of a training loop.
pub struct TrainLoop<'a> {
    pub out_dir: &'a Path,
    /// The run's whole configuration as TOML, stored in every checkpoint.
    pub config_toml: String,
    pub tokenizer: &'a Tokenizer,
    pub optim: &'a OptimConfig,
    pub train: &'a TrainConfig,
    /// The checkpoint the run resumed from, if any.
    pub resumed_from: Option<PathBuf>,
    /// Stop (as if interrupted, with a checkpoint) after this many steps of this process; for
    /// tests of resume.
    pub stop_after: Option<u64>,
}

pub struct TrainOutcome<M = Llama> {
    pub model: M,
    pub step: u64,
    pub final_val_loss: Option<f64>,
    pub checkpoint: PathBuf,
    pub interrupted: bool,
}

/// Trains `model` on `objective` until `train.max_steps` (or `train.epochs` over the
/// objective's examples), saving checkpoints into `out_dir/checkpoints`.
pub fn run<M: Module>(
    setup: TrainLoop<'_>,
    mut model: M,
    mut optimizer: AdamW,
    mut state: TrainState,
    objective: &dyn Objective<M>,
) -> Result<TrainOutcome<M>> {
    let TrainLoop {
        out_dir,
        config_toml,
        tokenizer,
        optim: optim_config,
        train,
        resumed_from,
        stop_after,
    } = setup;
    let max_steps = train.total_steps(objective.len());
    std::fs::write(out_dir.join("config.toml"), &config_toml).map_err(|e| {
        anyhow!(
            "cannot write {}: {e}",
            out_dir.join("config.toml").display()
        )
    })?;
    let mut batches = ShuffledIndices::new(objective.len(), state.seed, state.data);
    let mut metrics = MetricsLog::open(out_dir, resumed_from.as_ref().map(|_| state.step))?;
    let tokenizer_json = tokenizer.to_json()?;
    let mut progress = Progress::new(state.step, max_steps, train.log_interval);
    let started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut final_val_loss = None;
    let mut last_checkpoint = resumed_from;
    let mut interrupted = false;
    let mut steps_this_run = 0u64;

    let save = |model: &M, optimizer: &AdamW, state: &TrainState| -> Result<PathBuf> {
        let data = CheckpointData {
            step: state.step,
            config_toml: config_toml.clone(),
            model: params::export(model),
            optimizer: optimizer.export(model),
            state_json: serde_json::to_string_pretty(state)?,
            tokenizer_json: tokenizer_json.clone(),
        };
        checkpoint::save(&checkpoints_dir(out_dir), &data, train.keep_checkpoints)
    };

    while state.step < max_steps {
        let step_start = Instant::now();
        let mut grads: Option<GradientsParams> = None;
        let mut loss_sum = 0.0f64;
        let mut step_tokens = 0u64;
        for _ in 0..train.grad_accum_steps {
            let indices = batches.next_batch(train.batch_size);
            let (loss, tokens) = objective.loss(&model, &indices);
            step_tokens += tokens;
            loss_sum += loss.clone().into_scalar::<f32>() as f64;
            let loss = if train.grad_accum_steps > 1 {
                loss.div_scalar(train.grad_accum_steps as f64)
            } else {
                loss
            };
            let micro = GradientsParams::from_grads(loss.backward(), &model);
            grads = Some(match grads {
                None => micro,
                Some(sum) => optim::accumulate(&model, sum, micro),
            });
        }
        let lr = optim::learning_rate(optim_config, state.step, max_steps);
        let (updated, report) = optimizer.step(model, grads.expect("at least one micro-batch"), lr);
        model = updated;
        state.step += 1;
        steps_this_run += 1;
        state.tokens_seen += step_tokens;
        state.data = batches.cursor();
        state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        let loss = loss_sum / train.grad_accum_steps as f64;
        if !loss.is_finite() {
            bail!("training diverged at step {}: loss is {loss}", state.step);
        }
        let tokens_per_s = step_tokens as f64 / step_start.elapsed().as_secs_f64();
        metrics.write(&Record::Step {
            step: state.step,
            loss,
            lr,
            grad_norm: report.grad_norm,
            tokens_per_s,
            elapsed_s: state.elapsed_s,
        })?;
        progress.step(state.step, loss, lr, tokens_per_s);

        let last = state.step == max_steps;
        let due = |interval: u64| interval > 0 && state.step % interval == 0;
        if last || due(train.eval_interval) {
            let val_loss = objective.validation_loss(&model.valid());
            metrics.write(&Record::Eval {
                step: state.step,
                val_loss,
                val_perplexity: val_loss.exp(),
            })?;
            progress.message(&format!(
                "step {:>6} | val loss {val_loss:.4} | perplexity {:.1}",
                state.step,
                val_loss.exp()
            ));
            final_val_loss = Some(val_loss);
        }
        interrupted = INTERRUPTED.load(Ordering::SeqCst) || stop_after == Some(steps_this_run);
        if last || interrupted || due(train.checkpoint_interval) {
            last_checkpoint = Some(save(&model, &optimizer, &state)?);
        }
        if interrupted {
            progress.message(&format!(
                "interrupted: saved checkpoint at step {}; continue with --resume",
                state.step
            ));
            break;
        }
    }
    progress.finish();
    let checkpoint = match last_checkpoint {
        Some(dir) => dir,
        // A resumed run that had nothing left to do still has a checkpoint to point at.
        None => save(&model, &optimizer, &state)?,
    };
    Ok(TrainOutcome {
        model,
        step: state.step,
        final_val_loss,
        checkpoint,
        interrupted,
    })
}

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
