//! The supervised training loop (pretraining, SFT, GAtt, reward models): shuffled
//! micro-batches of an [`Objective`], one optimizer step ([`crate::train::step`]) each, the
//! cosine schedule, metrics, periodic evaluation, checkpoints into the [`RunDir`], Ctrl-C and
//! exact resume. PPO has its own loop made of the same pieces.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use burn::module::Module;

use crate::data::corpus::ShuffledIndices;
use crate::interop::checkpoint::CheckpointData;
use crate::interop::params;
use crate::model::Llama;
use crate::train::collective::share;
use crate::train::metrics::{MetricsLog, Record};
use crate::train::optim::{self, AdamW};
use crate::train::progress::Progress;
use crate::train::run_dir::{INTERRUPTED, TrainState};
use crate::train::stage::{Stage, Started, TrainingConfig};
use crate::train::step::{self, Accumulated, MicroBatchLoss};

/// What a stage trains on: examples drawn in shuffled micro-batches, and a validation loss.
/// `M` is the model the stage trains (the language model, or a reward model).
pub trait Objective<M = Llama> {
    /// Number of training examples (rows) the shuffle draws from.
    fn len(&self) -> usize;
    /// Loss of the training examples `indices`, summed over the items it counts (trained
    /// tokens, or pairs), with their count: the step divides by the count of all its
    /// micro-batches together.
    fn loss(&self, model: &M, indices: &[usize]) -> MicroBatchLoss;
    /// Validation loss of `model` (a model without autodiff).
    fn validation_loss(&self, model: &M) -> f64;
}

/// Where a run ended.
pub struct RunSummary {
    pub step: u64,
    pub final_val_loss: Option<f64>,
    /// The step `final_val_loss` was measured at (an interrupted run's last evaluation can
    /// be older than its last step).
    pub val_step: u64,
    pub checkpoint: PathBuf,
    /// Stopped by Ctrl-C (or `stop_after`) with a checkpoint, before its last step.
    pub interrupted: bool,
}

pub struct TrainOutcome<M = Llama> {
    pub model: M,
    pub summary: RunSummary,
}

/// Trains a launched stage on `objective` until `train.max_steps` (or `train.epochs` over
/// the objective's examples), saving checkpoints into the run directory. `config_toml` is the
/// configuration the run stores (what `--resume` reads back); `stop_after` stops (as if
/// interrupted, with a checkpoint) after this many steps of this process, for tests.
pub fn run<S: Stage>(
    started: Started<S>,
    config_toml: String,
    objective: &dyn Objective<S::Model>,
    stop_after: Option<u64>,
) -> Result<TrainOutcome<S::Model>> {
    let Started {
        run,
        config,
        mut model,
        mut optimizer,
        tokenizer,
        mut state,
        collective,
    } = started;
    let writer = collective.is_writer();
    let (optim_config, train) = (config.optim(), config.train());
    let max_steps = train.total_steps(objective.len());
    if state.schedule_steps == 0 {
        state.schedule_steps = max_steps;
    }
    let resumed_from = run.resume_from.clone();
    // The run's config.toml is written with its first checkpoint: a run that fails before
    // it (a diverged resume) leaves the stored configuration as it was.
    let config_written = std::cell::Cell::new(false);
    let mut batches = ShuffledIndices::new(objective.len(), state.seed, state.data);
    if train.batch_size < collective.world_size() {
        bail!(
            "train.batch_size = {} is the global batch, split among {} workers: give each at least one example",
            train.batch_size,
            collective.world_size()
        );
    }
    // Worker 0 writes metrics, checkpoints and progress; the others only train.
    let mut metrics = match writer {
        true => Some(MetricsLog::open(
            &run.path,
            resumed_from.as_ref().map(|_| state.step),
        )?),
        false => None,
    };
    let tokenizer_json = tokenizer.to_json()?;
    let mut progress = Progress::shown_if(writer, || {
        Progress::new(state.step, max_steps, train.log_interval)
    });
    if collective.world_size() > 1 {
        progress.message(&format!("data-parallel: {}", collective.describe()));
    }
    if state.step == 0 && optim_config.warmup_steps >= state.schedule_steps {
        progress.message(&format!(
            "warning: optim.warmup_steps = {} is not shorter than this run's {} steps, so the learning rate never reaches optim.lr = {}",
            optim_config.warmup_steps, state.schedule_steps, optim_config.lr
        ));
    }
    let started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut final_val_loss = None;
    let mut val_step = 0;
    let mut last_checkpoint = resumed_from;
    let mut interrupted = false;
    let mut steps_this_run = 0u64;

    // Worker 0 saves while the others wait, so none runs ahead of a checkpoint it might be
    // resumed from.
    let save = |model: &S::Model, optimizer: &AdamW, state: &TrainState| -> Result<PathBuf> {
        if !writer {
            collective.barrier()?;
            return Ok(run.checkpoint_path(state.step));
        }
        let data = CheckpointData {
            step: state.step,
            config_toml: config_toml.clone(),
            model: params::export(model),
            optimizer: optimizer.export(model),
            state_json: serde_json::to_string_pretty(state)?,
            tokenizer_json: tokenizer_json.clone(),
            extra: Vec::new(),
        };
        let saved = run.save(&data, train.keep_checkpoints)?;
        if !config_written.replace(true) {
            run.write_config(&config_toml)?;
        }
        collective.barrier()?;
        Ok(saved)
    };

    while state.step < max_steps {
        let step_start = Instant::now();
        let mut accumulated = Accumulated::default();
        for _ in 0..train.grad_accum_steps {
            let global = batches.next_batch(train.batch_size);
            let indices = share(&global, collective.rank(), collective.world_size());
            accumulated.add(&model, objective.loss(&model, indices));
        }
        let lr = optim::learning_rate(optim_config, state.step, state.schedule_steps);
        let accumulated = accumulated.all_reduce(&model, &*collective)?;
        let (updated, result) = step::apply(model, &mut optimizer, accumulated, lr)
            .map_err(|e| anyhow!("training diverged at step {}: {e}", state.step + 1))?;
        model = updated;
        state.step += 1;
        steps_this_run += 1;
        state.tokens_seen += result.tokens;
        state.data = batches.cursor();
        state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        let (loss, step_tokens) = (result.loss, result.tokens);
        let tokens_per_s = step_tokens as f64 / step_start.elapsed().as_secs_f64();
        let mut write = |record: &Record| match &mut metrics {
            Some(metrics) => metrics.write(record),
            None => Ok(()),
        };
        write(&Record::Step {
            step: state.step,
            loss,
            lr,
            grad_norm: result.grad_norm,
            tokens_per_s,
            elapsed_s: state.elapsed_s,
        })?;
        progress.step(state.step, loss, lr, tokens_per_s);

        let last = state.step == max_steps;
        let due = |interval: u64| interval > 0 && state.step % interval == 0;
        if last || due(train.eval_interval) {
            // Worker 0 evaluates and tells the others, who need it to stop on divergence.
            let mut val_loss = [match writer {
                true => objective.validation_loss(&model.valid()),
                false => 0.0,
            }];
            collective.all_reduce_sum(&mut val_loss)?;
            let [val_loss] = val_loss;
            if !val_loss.is_finite() {
                bail!(
                    "training diverged at step {}: validation loss is {val_loss}",
                    state.step
                );
            }
            write(&Record::Eval {
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
            val_step = state.step;
        }
        // Every worker stops at the same step, whichever saw the Ctrl-C.
        interrupted = collective.any(INTERRUPTED.load(Ordering::SeqCst))?
            || stop_after == Some(steps_this_run);
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
        summary: RunSummary {
            step: state.step,
            final_val_loss,
            val_step,
            checkpoint,
            interrupted,
        },
    })
}
