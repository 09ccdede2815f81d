//! Models in and out: a kiln checkpoint, a Hugging Face Llama directory or a GGUF file, told
//! apart by what the path holds. `kiln convert` moves a model between them; `kiln chat` and
//! `kiln generate` load any of them.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use serde::Serialize;

use crate::config::ModelConfig;
use crate::data::chat::{self, ChatTemplate};
use crate::data::tokenizer::Tokenizer;
use crate::interop::checkpoint::{self, CheckpointData, NamedTensor};
use crate::interop::gguf_write::GgufWeights;
use crate::kernels::Kernels;
use crate::model::Llama;

/// The formats kiln reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A kiln checkpoint (manifest, config.toml, model.safetensors, tokenizer.json).
    Kiln,
    /// A Hugging Face Llama directory (config.json, safetensors, tokenizer.json).
    Hf,
    /// A llama.cpp GGUF file (read only).
    Gguf,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Format::Kiln => "kiln checkpoint",
            Format::Hf => "Hugging Face",
            Format::Gguf => "GGUF",
        })
    }
}

impl Format {
    /// What `path` holds: a `.gguf` file (or any file starting with the GGUF magic), a
    /// directory with `config.json`, or else a kiln checkpoint or run directory.
    pub fn detect(path: &Path) -> Result<Self> {
        if path.is_file() {
            let mut magic = [0u8; 4];
            let read = std::fs::File::open(path)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
            if read.is_ok() && &magic == crate::interop::gguf::MAGIC {
                return Ok(Format::Gguf);
            }
            bail!(
                "{}: not a GGUF file; a model is a GGUF file, a Hugging Face directory or a kiln checkpoint",
                path.display()
            );
        }
        if !path.exists() {
            bail!("model {} not found", path.display());
        }
        if crate::interop::hf::is_hf_dir(path) {
            return Ok(Format::Hf);
        }
        Ok(Format::Kiln)
    }
}

/// A whole model held on the host: shape, weights under kiln's (Hugging Face's) names,
/// tokenizer and chat layout.
#[derive(Clone)]
pub struct ForeignModel {
    /// What it was read as, and from where: the GGUF file, the Hugging Face directory or the
    /// kiln checkpoint directory.
    pub format: Format,
    pub path: PathBuf,
    pub model_config: ModelConfig,
    pub tensors: Vec<NamedTensor>,
    pub tokenizer_json: String,
    pub template: ChatTemplate,
    /// The system prompt the model's own chat template inserts when a dialogue has none.
    pub default_system: Option<String>,
}

impl ForeignModel {
    /// Chat settings come from the model's Jinja `chat_template` when it has one, else from
    /// its tokenizer (ChatML markers present or not).
    pub fn new(
        format: Format,
        path: &Path,
        model_config: ModelConfig,
        tensors: Vec<NamedTensor>,
        tokenizer_json: String,
        chat_template: Option<&str>,
    ) -> Self {
        let template = chat_template
            .and_then(ChatTemplate::from_jinja)
            .unwrap_or_else(|| {
                if tokenizer_json.contains("\"<|im_start|>\"") {
                    ChatTemplate::Chatml
                } else {
                    ChatTemplate::Llama2
                }
            });
        Self {
            format,
            path: path.to_path_buf(),
            model_config,
            tensors,
            tokenizer_json,
            template,
            default_system: chat_template.and_then(chat::default_system_prompt),
        }
    }
}

/// The `[model]` and `[chat]` sections an imported checkpoint's config.toml holds.
#[derive(Serialize)]
struct ImportedConfig<'a> {
    model: &'a ModelConfig,
    data: DataSection,
    chat: ChatSection<'a>,
}

#[derive(Serialize)]
struct DataSection {
    template: ChatTemplate,
}

#[derive(Serialize)]
struct ChatSection<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    default_system: Option<&'a str>,
    /// Where the weights came from.
    imported_from: String,
}

/// The default system prompt stored in a kiln checkpoint's config (`chat.default_system`).
fn checkpoint_default_system(config_toml: &str) -> Option<String> {
    let table: toml::Table = config_toml.parse().ok()?;
    table
        .get("chat")?
        .get("default_system")?
        .as_str()
        .map(str::to_string)
}

/// Reads a model in any format onto the host.
pub fn read(path: &Path) -> Result<ForeignModel> {
    let model = read_unchecked(path)?;
    // Sizes read from a foreign file are checked before anything of that size is allocated
    // (the RoPE table, the weights).
    model.model_config.validate().map_err(|e| {
        anyhow!(
            "{}: {e} (read from the model's own configuration)",
            model.path.display()
        )
    })?;
    Ok(model)
}

fn read_unchecked(path: &Path) -> Result<ForeignModel> {
    match Format::detect(path)? {
        Format::Gguf => crate::interop::gguf::GgufFile::read(path)?.to_llama(),
        Format::Hf => crate::interop::hf::read(path),
        Format::Kiln => {
            let dir = checkpoint::resolve(path)?;
            let saved = checkpoint::load_weights(&dir)?;
            Ok(ForeignModel {
                format: Format::Kiln,
                model_config: saved.model_config(&dir)?,
                template: ChatTemplate::of_checkpoint(&dir)?,
                default_system: checkpoint_default_system(&saved.config_toml),
                tensors: saved.model,
                tokenizer_json: saved.tokenizer_json,
                path: dir,
            })
        }
    }
}

impl ForeignModel {
    /// What holds the weights, for error messages: the GGUF file, the Hugging Face directory,
    /// the kiln checkpoint's model.safetensors.
    pub fn weights_path(&self) -> PathBuf {
        match self.format {
            Format::Kiln => self.path.join(checkpoint::MODEL_FILE),
            _ => self.path.clone(),
        }
    }

    /// The tokenizer, which must fit the model's vocabulary.
    fn tokenizer(&self) -> Result<Tokenizer> {
        let source = self.weights_path();
        let tokenizer = Tokenizer::from_json(&self.tokenizer_json)
            .map_err(|e| anyhow!("{}: {e}", source.display()))?;
        if tokenizer.vocab_size() > self.model_config.vocab_size {
            bail!(
                "{}: the tokenizer's ids go up to {}, past the model's vocabulary of {}",
                source.display(),
                tokenizer.vocab_size() - 1,
                self.model_config.vocab_size
            );
        }
        Ok(tokenizer)
    }
}

/// Writes `model` in `format` at `out`, which must not exist yet (or be an empty directory);
/// nothing is left at `out` if it fails. The weights must be exactly those of a Llama of the
/// model's shape. GGUF is written with F16 weights ([`write_with`] chooses).
pub fn write(model: &ForeignModel, format: Format, out: &Path) -> Result<()> {
    write_with(model, format, out, GgufWeights::F16)
}

/// [`write`], with the weight type a GGUF file gets.
pub fn write_with(
    model: &ForeignModel,
    format: Format,
    out: &Path,
    gguf_weights: GgufWeights,
) -> Result<()> {
    checkpoint::check_shapes(
        &model.tensors,
        &Llama::param_shapes(&model.model_config),
        &model.weights_path(),
    )?;
    model.tokenizer()?;
    match format {
        Format::Hf => crate::interop::hf::write(model, out),
        Format::Kiln => {
            let config = ImportedConfig {
                model: &model.model_config,
                data: DataSection {
                    template: model.template,
                },
                chat: ChatSection {
                    default_system: model.default_system.as_deref(),
                    imported_from: model.path.display().to_string(),
                },
            };
            let data = CheckpointData {
                step: 0,
                config_toml: toml::to_string(&config)?,
                model: model.tensors.clone(),
                optimizer: Vec::new(),
                state_json: "{}".into(),
                tokenizer_json: model.tokenizer_json.clone(),
                extra: Vec::new(),
            };
            checkpoint::save_to(out, &data)
        }
        Format::Gguf => {
            if out.exists() {
                bail!(
                    "{} already exists; kiln writes a GGUF file only to a new path",
                    out.display()
                );
            }
            let bytes = crate::interop::gguf_write::llama_gguf(model, gguf_weights.ggml_type())?;
            checkpoint::write_atomic(out, &bytes)
        }
    }
}

/// A model ready for inference (or to start a stage from), with the configuration and
/// tokenizer it came with.
pub struct LoadedModel {
    /// The checkpoint directory, Hugging Face directory or GGUF file it was read from.
    pub dir: PathBuf,
    pub format: Format,
    pub model: Llama,
    pub model_config: ModelConfig,
    pub tokenizer: Tokenizer,
}

/// A model of any format, ready for inference on `device`, with its chat settings.
pub struct ChatModel {
    pub loaded: LoadedModel,
    pub template: ChatTemplate,
    pub default_system: Option<String>,
}

/// Loads a kiln checkpoint, Hugging Face directory or GGUF file onto `device`.
pub fn load_model(
    path: &Path,
    device: &burn::tensor::Device,
    kernels: Kernels,
) -> Result<ChatModel> {
    load_read_model(read(path)?, device, kernels)
}

/// [`load_model`] for a model already read by [`read`]. The import checks every weight's
/// name and shape.
pub fn load_read_model(
    foreign: ForeignModel,
    device: &burn::tensor::Device,
    kernels: Kernels,
) -> Result<ChatModel> {
    let tokenizer = foreign.tokenizer()?;
    let model_config = ModelConfig {
        kernels,
        ..foreign.model_config.clone()
    };
    let source = foreign.weights_path();
    let model = crate::interop::params::import(
        Llama::for_import(&model_config, device),
        foreign.tensors,
        &source,
    )?;
    let dir = foreign.path;
    Ok(ChatModel {
        loaded: LoadedModel {
            dir,
            format: foreign.format,
            model,
            model_config,
            tokenizer,
        },
        template: foreign.template,
        default_system: foreign.default_system,
    })
}
