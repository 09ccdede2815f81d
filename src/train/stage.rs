//! Stage setup, written once: what every training command does before its loop starts.
//!
//! A fresh run reads the stage's config (file and `--set` over the stage's defaults), checks
//! the output directory, and builds the model (from `--init`, any format the one loader
//! reads, or from the seed). A resumed run reads the configuration the run stored, applies
//! only the changes [`config::RESUMABLE_KEYS`] allows, and restores model, optimizer,
//! tokenizer and position from the newest checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, anyhow};
use burn::module::Module;
use burn::tensor::Device;

use crate::config::{self, ModelConfig, OptimConfig, StageConfig, TrainConfig};
use crate::data::tokenizer::Tokenizer;
use crate::device::ComputeDevice;
use crate::interop::convert::{self, LoadedModel};
use crate::interop::{checkpoint, params};
use crate::model::Llama;
use crate::train::collective::{Collective, Solo};
use crate::train::optim::AdamW;
use crate::train::run_dir::{RunDir, TrainState};

/// The configuration of a training stage: its own sections plus the three every stage has.
pub trait TrainingConfig: StageConfig + Clone {
    fn model(&self) -> &ModelConfig;
    fn model_mut(&mut self) -> &mut ModelConfig;
    fn optim(&self) -> &OptimConfig;
    fn train(&self) -> &TrainConfig;

    fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// Implements [`TrainingConfig`] for a config struct with `model`, `optim` and `train` fields.
#[macro_export]
macro_rules! training_config {
    ($config:ty) => {
        impl $crate::train::stage::TrainingConfig for $config {
            fn model(&self) -> &$crate::config::ModelConfig {
                &self.model
            }
            fn model_mut(&mut self) -> &mut $crate::config::ModelConfig {
                &mut self.model
            }
            fn optim(&self) -> &$crate::config::OptimConfig {
                &self.optim
            }
            fn train(&self) -> &$crate::config::TrainConfig {
                &self.train
            }
        }
    };
}

/// A model a stage trains: how it is made from the `--init` language model, and an empty one
/// of a given shape for a checkpoint to fill.
pub trait StageModel: Module + Sized {
    fn from_init(init: Llama, config: &ModelConfig, seed: u64, device: &Device) -> Self;
    fn shell(config: &ModelConfig, device: &Device) -> Self;
}

impl StageModel for Llama {
    fn from_init(init: Llama, _: &ModelConfig, _: u64, _: &Device) -> Self {
        init
    }

    fn shell(config: &ModelConfig, device: &Device) -> Self {
        Llama::for_import(config, device)
    }
}

/// A recipe stage, as the launcher needs it.
pub trait Stage {
    type Config: TrainingConfig;
    /// The model the stage trains.
    type Model: StageModel;
    /// The command that runs it (`sft`, `rm train`, ...), for messages.
    const COMMAND: &'static str;

    /// The model of a fresh run, and its tokenizer. By default it is made from the `--init`
    /// model, whose shape the config takes; pretraining draws one from `seed` instead.
    fn start(
        config: &mut Self::Config,
        init: Option<LoadedModel>,
        seed: u64,
        device: &Device,
    ) -> Result<(Self::Model, Tokenizer)> {
        let init = init.ok_or_else(|| anyhow!("this stage starts from --init"))?;
        *config.model_mut() = init.model_config;
        let model = Self::Model::from_init(init.model, config.model(), seed, device);
        Ok((model, init.tokenizer))
    }

    /// Whether `--init` is required on a fresh run.
    fn needs_init() -> bool {
        true
    }
}

/// What a training command was asked to do: the flags every stage shares.
#[derive(Debug, Clone)]
pub struct Launch {
    /// TOML config (a file, or a pipeline stage's table); on `--resume`, optional (the run's
    /// own is used).
    pub config: Option<config::ConfigSource>,
    /// `section.key=value` overrides.
    pub overrides: Vec<String>,
    /// The model to start from: a kiln checkpoint or run directory, a Hugging Face Llama
    /// directory or a GGUF file.
    pub init: Option<PathBuf>,
    pub out_dir: PathBuf,
    pub resume: bool,
    pub device: ComputeDevice,
    /// Stop (as if interrupted, with a checkpoint) after this many steps of this process; for
    /// tests of resume.
    pub stop_after: Option<u64>,
    /// The data-parallel workers this process is one of ([`Solo`] when it trains alone).
    pub collective: Arc<dyn Collective>,
}

impl std::fmt::Debug for dyn Collective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker {} of {}", self.rank(), self.world_size())
    }
}

impl Launch {
    /// A fresh run into `out_dir` on the CPU with these overrides and no file.
    pub fn new(out_dir: &Path, overrides: &[String]) -> Self {
        Self {
            config: None,
            overrides: overrides.to_vec(),
            init: None,
            out_dir: out_dir.to_path_buf(),
            resume: false,
            device: ComputeDevice::cpu(),
            stop_after: None,
            collective: Arc::new(Solo),
        }
    }
}

/// A stage ready to train.
pub struct Started<S: Stage> {
    pub run: RunDir,
    pub config: S::Config,
    pub model: S::Model,
    pub optimizer: AdamW,
    pub tokenizer: Tokenizer,
    pub state: TrainState,
    pub collective: Arc<dyn Collective>,
}

impl<S: Stage> Started<S> {
    /// The same run trained as stage `T` with `config` (GAtt trains with the SFT recipe).
    pub fn with_config<T: Stage<Model = S::Model>>(self, config: T::Config) -> Started<T> {
        let Started {
            run,
            model,
            optimizer,
            tokenizer,
            state,
            collective,
            ..
        } = self;
        Started {
            run,
            config,
            model,
            optimizer,
            tokenizer,
            state,
            collective,
        }
    }
}

/// Prepares a stage's run: config, output directory, and model, optimizer, tokenizer and
/// position, fresh or resumed. Fails before anything is written if any of it is wrong.
pub fn launch<S: Stage>(launch: &Launch) -> Result<Started<S>> {
    launch_with(launch, None)
}

/// [`launch`], a fresh run taking `config` as made in code instead of reading it (a stage run
/// inside another: rejection sampling's fine-tuning rounds). A resumed run reads its own.
pub fn launch_with<S: Stage>(launch: &Launch, config: Option<S::Config>) -> Result<Started<S>> {
    let given = config;
    let autodiff = launch.device.device.clone().autodiff();
    let run = RunDir::check(&launch.out_dir, launch.resume, launch.config.as_ref())?;
    let (config, model, optimizer, tokenizer, state) = match run.resume_from.clone() {
        Some(dir) => {
            let saved = checkpoint::load(&dir)?;
            let source = dir.join(checkpoint::MANIFEST_FILE);
            let config: S::Config = config::load_resumed(
                &saved.config_toml,
                &source,
                S::COMMAND,
                launch.config.as_ref(),
                &launch.overrides,
            )?;
            let tokenizer = saved.tokenizer(&dir)?;
            let state: TrainState = serde_json::from_str(&saved.state_json)
                .map_err(|e| anyhow!("{}: {e}", dir.join(checkpoint::STATE_FILE).display()))?;
            let model = params::import(
                S::Model::shell(config.model(), &autodiff),
                saved.model,
                &dir.join(checkpoint::MODEL_FILE),
            )?;
            let optimizer = AdamW::import(
                config.optim().clone(),
                &model,
                state.step,
                saved.optimizer,
                &dir.join(checkpoint::OPTIMIZER_FILE),
            )?;
            let say = |line: String| launch.collective.say(&line);
            say(format!(
                "resuming from {} (step {})",
                dir.display(),
                state.step
            ));
            if let Some(init) = &launch.init {
                say(format!(
                    "note: --init {} is not used: a resumed run continues from its checkpoint",
                    init.display()
                ));
            }
            (config, model, optimizer, tokenizer, state)
        }
        None => {
            let mut config: S::Config = match given {
                Some(config) => config,
                None => config::load_from(launch.config.as_ref(), &launch.overrides)?,
            };
            let state = TrainState::start(config.train().seed);
            let init = match (&launch.init, S::needs_init()) {
                (Some(path), true) => Some(initial_model(path, config.model().kernels, &autodiff)?),
                (None, true) => {
                    return Err(anyhow!(
                        "--init is required: the model to start from (a kiln checkpoint or run directory, a Hugging Face directory or a GGUF file)"
                    ));
                }
                (Some(_), false) => {
                    return Err(anyhow!("--init is not taken by this stage"));
                }
                (None, false) => None,
            };
            let (model, tokenizer) = S::start(&mut config, init, state.seed, &autodiff)?;
            let optimizer = AdamW::new(config.optim().clone());
            (config, model, optimizer, tokenizer, state)
        }
    };
    // Worker 0 writes the run; the others read only (the checkpoint they resume from).
    if launch.collective.is_writer() {
        run.create()?;
    }
    Ok(Started {
        run,
        config,
        model,
        optimizer,
        tokenizer,
        state,
        collective: launch.collective.clone(),
    })
}

/// Loads the `--init` model (any format [`convert::read`] takes) onto the autodiff `device`,
/// with `kernels` as the new stage asks.
pub fn initial_model(
    path: &Path,
    kernels: crate::kernels::Kernels,
    device: &Device,
) -> Result<LoadedModel> {
    let loaded = convert::load_model(path, device, kernels)?.loaded;
    eprintln!("starting from {} ({})", loaded.dir.display(), loaded.format);
    Ok(loaded)
}
