//! Pretraining recipe (Llama 2 sec. 2.2): next-token prediction on packed sequences, AdamW,
//! cosine schedule with warm-up, global-norm clipping, gradient accumulation, periodic
//! evaluation and checkpoints, and exact resume.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointData};
use crate::config::Config;
use crate::data::{self, DataCursor, PackedSequences, ShuffledBatches};
use crate::device::ComputeDevice;
use crate::generate::{self, SamplingParams};
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

pub struct PretrainOptions {
    pub config: Config,
    /// True when the user gave a config (file or `--set`) rather than relying on the
    /// checkpoint's, on resume.
    pub config_given: bool,
    pub out_dir: PathBuf,
    pub resume: bool,
    pub device: ComputeDevice,
    /// Print the closing sample.
    pub print_sample: bool,
    /// Stop (as if interrupted, with a checkpoint) after this many steps of this process; for
    /// tests of resume.
    pub stop_after: Option<u64>,
}

pub struct PretrainSummary {
    pub step: u64,
    pub final_val_loss: Option<f64>,
    pub checkpoint: PathBuf,
    pub sample: Option<String>,
    pub interrupted: bool,
}

pub fn checkpoints_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}

/// Makes sure `out_dir` can take this run before any work starts.
fn prepare_out_dir(out_dir: &Path, resume: bool) -> Result<Option<PathBuf>> {
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

pub fn run(options: PretrainOptions) -> Result<PretrainSummary> {
    let PretrainOptions {
        mut config,
        config_given,
        out_dir,
        resume,
        device,
        print_sample,
        stop_after,
    } = options;
    let resume_from = prepare_out_dir(&out_dir, resume)?;
    let autodiff = device.device.clone().autodiff();

    // Model, optimizer, tokenizer and position: from the newest checkpoint, or fresh.
    let (mut model, mut optimizer, tokenizer, mut state) = match &resume_from {
        Some(dir) => {
            let saved = checkpoint::load(dir)?;
            let saved_config = saved.config(dir)?;
            if config_given {
                if config.model != saved_config.model {
                    bail!(
                        "{}: checkpoint has another model shape than the given config ([model] differs)",
                        dir.display()
                    );
                }
            } else {
                config = saved_config;
            }
            let tokenizer = saved.tokenizer(dir)?;
            let state: TrainState = serde_json::from_str(&saved.state_json)
                .map_err(|e| anyhow!("{}: {e}", dir.join(checkpoint::STATE_FILE).display()))?;
            let model = params::import(
                Llama::new(&config.model, state.seed, &autodiff),
                saved.model,
                &dir.join(checkpoint::MODEL_FILE),
            )?;
            let optimizer = AdamW::import(
                config.optim.clone(),
                &model,
                state.step,
                saved.optimizer,
                &dir.join(checkpoint::OPTIMIZER_FILE),
            )?;
            eprintln!("resuming from {} (step {})", dir.display(), state.step);
            (model, optimizer, tokenizer, state)
        }
        None => {
            let tokenizer = Tokenizer::load(&config.data.tokenizer)?;
            let state = TrainState {
                step: 0,
                data: DataCursor {
                    epoch: 0,
                    position: 0,
                },
                seed: config.train.seed,
                tokens_seen: 0,
                elapsed_s: 0.0,
            };
            let model = Llama::new(&config.model, state.seed, &autodiff);
            (model, AdamW::new(config.optim.clone()), tokenizer, state)
        }
    };
    if tokenizer.vocab_size() != config.model.vocab_size {
        bail!(
            "model.vocab_size is {} but the tokenizer {} has {} tokens",
            config.model.vocab_size,
            config.data.tokenizer.display(),
            tokenizer.vocab_size()
        );
    }

    let documents = data::read_corpus(&config.data.corpus)?;
    let splits = data::tokenize_corpus(&documents, &tokenizer, config.data.val_fraction)?;
    let seq_len = config.data.seq_len;
    let train_seqs = PackedSequences::new(splits.train, seq_len);
    let val_seqs = PackedSequences::new(splits.val, seq_len);
    if train_seqs.is_empty() || val_seqs.is_empty() {
        bail!(
            "corpus is too small: it needs more than {} tokens in both splits (data.seq_len)",
            seq_len
        );
    }
    eprintln!(
        "device: {} | model: {:.2}M parameters | data: {} train / {} val sequences of {} tokens",
        device.describe(),
        config.model.num_params() as f64 / 1e6,
        train_seqs.len(),
        val_seqs.len(),
        seq_len
    );
    std::fs::write(out_dir.join("config.toml"), config.to_toml()).map_err(|e| {
        anyhow!(
            "cannot write {}: {e}",
            out_dir.join("config.toml").display()
        )
    })?;

    let mut batches = ShuffledBatches::new(train_seqs, state.seed, state.data);
    let mut metrics = MetricsLog::open(&out_dir, resume_from.as_ref().map(|_| state.step))?;
    let tokenizer_json = tokenizer.to_json()?;
    let train = config.train.clone();
    let tokens_per_step = (train.batch_size * train.grad_accum_steps * seq_len) as u64;
    let mut progress = Progress::new(state.step, train.max_steps, train.log_interval);
    let started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut final_val_loss = None;
    let mut last_checkpoint = resume_from.clone();
    let mut interrupted = false;
    let mut steps_this_run = 0u64;

    let save = |model: &Llama, optimizer: &AdamW, state: &TrainState| -> Result<PathBuf> {
        let data = CheckpointData {
            step: state.step,
            config_toml: config.to_toml(),
            model: params::export(model),
            optimizer: optimizer.export(model),
            state_json: serde_json::to_string_pretty(state)?,
            tokenizer_json: tokenizer_json.clone(),
        };
        checkpoint::save(&checkpoints_dir(&out_dir), &data, train.keep_checkpoints)
    };

    while state.step < train.max_steps {
        let step_start = Instant::now();
        let mut grads: Option<GradientsParams> = None;
        let mut loss_sum = 0.0f64;
        for _ in 0..train.grad_accum_steps {
            let batch = batches.next_batch(train.batch_size);
            let (inputs, targets) = batch_tensors(&batch, &autodiff);
            let loss = model.loss(inputs, targets);
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
        let lr = optim::learning_rate(&config.optim, state.step, train.max_steps);
        let (updated, report) = optimizer.step(model, grads.expect("at least one micro-batch"), lr);
        model = updated;
        state.step += 1;
        steps_this_run += 1;
        state.tokens_seen += tokens_per_step;
        state.data = batches.cursor();
        state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        let loss = loss_sum / train.grad_accum_steps as f64;
        if !loss.is_finite() {
            bail!("training diverged at step {}: loss is {loss}", state.step);
        }
        let tokens_per_s = tokens_per_step as f64 / step_start.elapsed().as_secs_f64();
        metrics.write(&Record::Step {
            step: state.step,
            loss,
            lr,
            grad_norm: report.grad_norm,
            tokens_per_s,
            elapsed_s: state.elapsed_s,
        })?;
        progress.step(state.step, loss, lr, tokens_per_s);

        let last = state.step == train.max_steps;
        let due = |interval: u64| interval > 0 && state.step % interval == 0;
        if last || due(train.eval_interval) {
            let val_loss = evaluate(
                &model.valid(),
                &val_seqs,
                train.batch_size,
                train.eval_batches,
            );
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

    let sample = if print_sample && !interrupted {
        let s = &config.sample;
        let params = SamplingParams {
            temperature: s.temperature,
            top_p: s.top_p,
            max_tokens: s.max_tokens,
        };
        let mut rng = generate::seeded_rng(s.seed);
        let continuation = generate::complete(
            &model.valid(),
            &tokenizer,
            &[s.prompt.as_str()],
            &params,
            &mut rng,
        )?;
        Some(format!("{}{}", s.prompt, continuation[0]))
    } else {
        None
    };
    Ok(PretrainSummary {
        step: state.step,
        final_val_loss,
        checkpoint,
        sample,
        interrupted,
    })
}

pub fn batch_tensors(
    batch: &data::Batch,
    device: &burn::tensor::Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let shape = [batch.batch_size, batch.seq_len];
    (
        Tensor::from_data(TensorData::new(batch.inputs.clone(), shape), device),
        Tensor::from_data(TensorData::new(batch.targets.clone(), shape), device),
    )
}

/// Mean loss over the first `max_batches` batches of the validation sequences (a fixed set,
/// so evaluations are comparable across steps).
pub fn evaluate(
    model: &Llama,
    sequences: &PackedSequences,
    batch_size: usize,
    max_batches: usize,
) -> f64 {
    let device = model.device();
    let n = sequences.len().min(batch_size * max_batches);
    let mut total = 0.0;
    let mut count = 0usize;
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(batch_size) {
        let batch = sequences.batch(chunk);
        let (inputs, targets) = batch_tensors(&batch, &device);
        total += model.loss(inputs, targets).into_scalar::<f32>() as f64 * chunk.len() as f64;
        count += chunk.len();
    }
    total / count as f64
}
