//! Run configuration: one struct per TOML section, every field documented, defaults from the
//! Llama 2 paper (see `docs/` and the pipeline reference). Unknown keys are rejected.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::kernels::Kernels;

/// Shape and numerics of a Llama 2 model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Width of the residual stream.
    pub dim: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of query heads; `dim` must be a multiple of it.
    pub n_heads: usize,
    /// Number of key/value heads (grouped-query attention); must divide `n_heads`.
    pub n_kv_heads: usize,
    /// Hidden width of the SwiGLU feed-forward network.
    pub ffn_dim: usize,
    /// Vocabulary size; must equal the tokenizer's.
    pub vocab_size: usize,
    /// Longest sequence the model is trained or sampled on (paper: 4096).
    pub max_seq_len: usize,
    /// RMSNorm epsilon (paper: 1e-5).
    pub norm_eps: f64,
    /// RoPE base frequency (paper: 10000).
    pub rope_theta: f64,
    /// Share the input embedding with the output projection (Llama 2: untied; SmolLM2: tied).
    pub tie_embeddings: bool,
    /// Standard deviation of the normal initialisation of every weight matrix.
    pub init_std: f64,
    /// `custom` (default): the fused WGSL kernels of `shaders/` on wgpu devices (other devices
    /// use the reference); `reference`: plain Burn operations everywhere. Not part of the
    /// shape.
    pub kernels: Kernels,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Preset::Tiny.model()
    }
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// Number of trainable parameters, computed from the shape alone (saturating: a shape
    /// that [`validate`](Self::validate) refuses may overflow).
    pub fn num_params(&self) -> u64 {
        self.checked_num_params().unwrap_or(u64::MAX)
    }

    /// [`num_params`](Self::num_params), `None` where the count overflows.
    pub fn checked_num_params(&self) -> Option<u64> {
        let (d, f, v, l) = (
            self.dim as u64,
            self.ffn_dim as u64,
            self.vocab_size as u64,
            self.n_layers as u64,
        );
        let kv = (self.n_kv_heads as u64).checked_mul(self.head_dim() as u64)?;
        let attention = d
            .checked_mul(d)?
            .checked_mul(2)?
            .checked_add(d.checked_mul(kv)?.checked_mul(2)?)?;
        let ffn = d.checked_mul(f)?.checked_mul(3)?;
        let per_layer = attention.checked_add(ffn)?.checked_add(d.checked_mul(2)?)?;
        let embeddings = v
            .checked_mul(d)?
            .checked_mul(if self.tie_embeddings { 1 } else { 2 })?;
        l.checked_mul(per_layer)?
            .checked_add(d)?
            .checked_add(embeddings)
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("model.dim", self.dim),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
            ("model.n_kv_heads", self.n_kv_heads),
            ("model.ffn_dim", self.ffn_dim),
            ("model.vocab_size", self.vocab_size),
            ("model.max_seq_len", self.max_seq_len),
        ];
        for (key, value) in positive {
            if value == 0 {
                bail!("{key} must be at least 1");
            }
        }
        // Checked before anything is allocated: a typo must not become a terabyte request.
        let bounded = [
            ("model.dim", self.dim, MAX_DIM),
            ("model.n_layers", self.n_layers, MAX_LAYERS),
            ("model.ffn_dim", self.ffn_dim, MAX_FFN_DIM),
            ("model.vocab_size", self.vocab_size, MAX_VOCAB_SIZE),
            ("model.max_seq_len", self.max_seq_len, MAX_SEQ_LEN),
        ];
        for (key, value, max) in bounded {
            if value > max {
                bail!("{key} is {value}, more than the largest kiln supports ({max})");
            }
        }
        match self.checked_num_params() {
            Some(n) if n <= MAX_PARAMS => {}
            _ => bail!(
                "model shape has more than {MAX_PARAMS} parameters (model.dim, model.n_layers, model.ffn_dim, model.vocab_size)"
            ),
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            bail!(
                "model.dim ({}) must be a multiple of model.n_heads ({})",
                self.dim,
                self.n_heads
            );
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            bail!(
                "model.n_kv_heads ({}) must divide model.n_heads ({})",
                self.n_kv_heads,
                self.n_heads
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("model.dim / model.n_heads must be even for RoPE");
        }
        // Weights are f32: each value must be finite as an f32 too.
        let finite = |v: f64| (v as f32).is_finite();
        if !(self.norm_eps > 0.0 && finite(self.norm_eps)) {
            bail!("model.norm_eps must be positive and finite");
        }
        if !(self.rope_theta > 1.0 && finite(self.rope_theta)) {
            bail!("model.rope_theta must be greater than 1 and finite");
        }
        if !(self.init_std > 0.0 && finite(self.init_std)) {
            bail!(
                "model.init_std must be positive and finite as an f32 (at most {:e})",
                f32::MAX
            );
        }
        Ok(())
    }
}

/// The largest shapes kiln builds; larger values are typos (a 70B Llama has dim 8192, 80
/// layers, FFN 28672, a 32k vocabulary).
pub const MAX_DIM: usize = 1 << 16;
pub const MAX_LAYERS: usize = 1 << 10;
pub const MAX_FFN_DIM: usize = 1 << 18;
pub const MAX_VOCAB_SIZE: usize = 1 << 22;
pub const MAX_SEQ_LEN: usize = 1 << 20;
pub const MAX_PARAMS: u64 = 1_000_000_000_000;

/// Named model shapes. The paper's shapes are for `kiln info`; the small ones train here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// dim 128, 4 layers: the default model of the README run.
    Tiny,
    /// dim 256, 4 layers, 8 heads, 4 KV heads, FFN 704, vocab 4096, sequence 256.
    #[value(name = "bench-5m")]
    Bench5m,
    /// dim 512, 8 layers, 8 heads, 4 KV heads, FFN 1408, vocab 8192, sequence 512.
    #[value(name = "bench-32m")]
    Bench32m,
    /// SmolLM2-135M's shape: dim 576, 30 layers, 9 heads, 3 KV heads, FFN 1536, vocab
    /// 49152, tied embeddings.
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
    #[value(name = "llama2-7b")]
    Llama2_7b,
    #[value(name = "llama2-13b")]
    Llama2_13b,
    #[value(name = "llama2-70b")]
    Llama2_70b,
}

impl Preset {
    pub fn model(self) -> ModelConfig {
        let base = ModelConfig {
            dim: 128,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_dim: 352,
            vocab_size: 2048,
            max_seq_len: 256,
            norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_embeddings: false,
            init_std: 0.02,
            kernels: Kernels::Custom,
        };
        let shape =
            |dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size, max_seq_len| ModelConfig {
                dim,
                n_layers,
                n_heads,
                n_kv_heads,
                ffn_dim,
                vocab_size,
                max_seq_len,
                ..base.clone()
            };
        match self {
            Preset::Tiny => base,
            Preset::Bench5m => shape(256, 4, 8, 4, 704, 4096, 256),
            Preset::Bench32m => shape(512, 8, 8, 4, 1408, 8192, 512),
            Preset::Smollm2_135m => ModelConfig {
                tie_embeddings: true,
                ..shape(576, 30, 9, 3, 1536, 49152, 2048)
            },
            Preset::Llama2_7b => shape(4096, 32, 32, 32, 11008, 32000, 4096),
            Preset::Llama2_13b => shape(5120, 40, 40, 40, 13824, 32000, 4096),
            Preset::Llama2_70b => shape(8192, 80, 64, 8, 28672, 32000, 4096),
        }
    }

    /// Batch size the benchmarks use for this preset.
    pub fn bench_batch_size(self) -> usize {
        8
    }
}

/// Where the training text comes from and how it is cut into sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Text files or directories (every `*.txt` inside, sorted) making up the corpus.
    /// Relative paths are taken from the working directory, as a user types them.
    pub corpus: Vec<PathBuf>,
    /// HF `tokenizer.json`; its vocabulary size must equal `model.vocab_size`.
    pub tokenizer: PathBuf,
    /// Tokens per training sequence (packed across document boundaries).
    pub seq_len: usize,
    /// Fraction of each document's tokens (its tail) held out for validation.
    pub val_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            corpus: vec![PathBuf::from("data/shakespeare")],
            tokenizer: PathBuf::from("data/shakespeare/tokenizer.json"),
            seq_len: 256,
            val_fraction: 0.05,
        }
    }
}

/// AdamW, the cosine schedule and gradient clipping (paper sec. 2.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate, reached at the end of warm-up (paper: 3e-4 for 7B/13B).
    pub lr: f64,
    /// Final learning rate as a fraction of the peak (paper: 0.1).
    pub min_lr_ratio: f64,
    /// Linear warm-up steps (paper: 2000).
    pub warmup_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to weight matrices and embeddings, not to norms.
    pub weight_decay: f64,
    /// Clip the global L2 norm of all gradients to this value (paper: 1.0); 0 disables.
    pub grad_clip: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 3e-4,
            min_lr_ratio: 0.1,
            warmup_steps: 2000,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-5,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

/// The training loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed into one optimizer step.
    pub grad_accum_steps: usize,
    /// Optimizer steps in the whole run; the cosine schedule ends here. 0: derived from
    /// `epochs`.
    pub max_steps: u64,
    /// Passes over the training data, used when `max_steps` is 0 (fine-tuning stages).
    pub epochs: f64,
    /// Seed of the weight initialisation and of the data order.
    pub seed: u64,
    /// Evaluate validation loss every this many steps (0: only at the end).
    pub eval_interval: u64,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_interval: u64,
    /// Checkpoints kept on disk (the newest ones); at least 1.
    pub keep_checkpoints: usize,
    /// Print a progress line every this many steps when not on a terminal.
    pub log_interval: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            grad_accum_steps: 1,
            max_steps: 1000,
            epochs: 0.0,
            seed: 1234,
            eval_interval: 100,
            eval_batches: 8,
            checkpoint_interval: 100,
            keep_checkpoints: 2,
            log_interval: 10,
        }
    }
}

/// The sample printed at the end of a run and the defaults of `kiln generate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    pub prompt: String,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            prompt: "ROMEO:\n".into(),
            max_tokens: 120,
            temperature: 0.8,
            top_p: 0.95,
            seed: 0,
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<()> {
        self.validate_section("optim")
    }

    /// [`validate`](Self::validate) for the section `section` (PPO has two: `optim` for the
    /// policy, `value_optim` for the value model), naming its keys.
    pub fn validate_section(&self, section: &str) -> Result<()> {
        let o = self;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            bail!("{section}.lr must be positive and finite");
        }
        if !(0.0..=1.0).contains(&o.min_lr_ratio) {
            bail!("{section}.min_lr_ratio must be in [0, 1]");
        }
        for (key, beta) in [("beta1", o.beta1), ("beta2", o.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                bail!("{section}.{key} must be in [0, 1)");
            }
        }
        if !(o.eps > 0.0 && o.eps.is_finite()) {
            bail!("{section}.eps must be positive and finite");
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            bail!("{section}.weight_decay must be non-negative and finite");
        }
        if !(o.grad_clip >= 0.0 && o.grad_clip.is_finite()) {
            bail!("{section}.grad_clip must be non-negative and finite (0 disables clipping)");
        }
        Ok(())
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let t = self;
        if t.batch_size == 0 {
            bail!("train.batch_size must be at least 1");
        }
        if t.grad_accum_steps == 0 {
            bail!("train.grad_accum_steps must be at least 1");
        }
        if t.max_steps == 0 && !(t.epochs > 0.0) {
            bail!("train.max_steps must be at least 1 (or train.epochs positive)");
        }
        if !(t.epochs >= 0.0) {
            bail!("train.epochs must be non-negative");
        }
        if t.eval_batches == 0 {
            bail!("train.eval_batches must be at least 1");
        }
        if t.keep_checkpoints == 0 {
            bail!("train.keep_checkpoints must be at least 1");
        }
        Ok(())
    }

    /// Optimizer steps of the run: `max_steps`, or `epochs` passes over `examples` training
    /// rows.
    pub fn total_steps(&self, examples: usize) -> u64 {
        if self.max_steps > 0 {
            return self.max_steps;
        }
        let per_step = (self.batch_size * self.grad_accum_steps) as f64;
        ((self.epochs * examples as f64) / per_step).ceil().max(1.0) as u64
    }
}

impl SampleConfig {
    pub fn validate(&self) -> Result<()> {
        let s = self;
        if !(s.temperature >= 0.0) {
            bail!("sample.temperature must be non-negative");
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            bail!("sample.top_p must be in (0, 1]");
        }
        Ok(())
    }
}

/// A whole pretraining run.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub sample: SampleConfig,
}

impl StageConfig for Config {
    fn validate(&self) -> Result<()> {
        Config::validate(self)
    }
}

impl Config {
    /// Reads a TOML file, applies `section.key=value` overrides, and validates.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        load(path, overrides)
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let d = &self.data;
        if d.corpus.is_empty() {
            bail!("data.corpus must name at least one file or directory");
        }
        if d.seq_len < 2 {
            bail!("data.seq_len must be at least 2");
        }
        if d.seq_len > self.model.max_seq_len {
            bail!(
                "data.seq_len ({}) exceeds model.max_seq_len ({})",
                d.seq_len,
                self.model.max_seq_len
            );
        }
        if !(d.val_fraction > 0.0 && d.val_fraction < 0.5) {
            bail!("data.val_fraction must be in (0, 0.5)");
        }
        self.optim.validate()?;
        self.train.validate()?;
        self.sample.validate()?;
        Ok(())
    }
}

/// The configuration of one training stage (pretraining, SFT, GAtt, ...): TOML sections whose
/// defaults are that stage's paper values.
pub trait StageConfig: Default + Serialize + DeserializeOwned {
    fn validate(&self) -> Result<()>;

    /// The `section.key` names a config file or `--set` may give: by default every field of
    /// the defaults' own serialisation.
    fn known_keys() -> toml::Table {
        toml::Table::try_from(Self::default()).expect("default config serialises")
    }
}

/// Reads a stage's TOML file over its defaults, applies `section.key=value` overrides, and
/// validates. A section given in part keeps the stage's defaults for the rest.
pub fn load<T: StageConfig>(path: Option<&Path>, overrides: &[String]) -> Result<T> {
    load_from(path.map(ConfigSource::file).as_ref(), overrides)
}

/// [`load`] from a file or from a table already read (a pipeline stage's section).
pub fn load_from<T: StageConfig>(source: Option<&ConfigSource>, overrides: &[String]) -> Result<T> {
    let defaults = toml::Table::try_from(T::default()).expect("default config serialises");
    load_over(defaults, source, overrides)
}

/// Where a stage's configuration is written: a TOML file, or a table read from a larger file
/// (a `kiln pipeline` recipe's stage), named in messages by `name`.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigSource {
    File(PathBuf),
    Table { table: toml::Table, name: String },
}

impl ConfigSource {
    pub fn file(path: &Path) -> Self {
        ConfigSource::File(path.to_path_buf())
    }

    /// The file's path or the table's name, for messages.
    pub fn name(&self) -> String {
        match self {
            ConfigSource::File(path) => path.display().to_string(),
            ConfigSource::Table { name, .. } => name.clone(),
        }
    }

    fn read(&self) -> Result<toml::Table> {
        match self {
            ConfigSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config {}", path.display()))?;
                text.parse::<toml::Table>()
                    .map_err(|e| anyhow!("{}: {}", path.display(), one_line(&e.to_string())))
            }
            ConfigSource::Table { table, .. } => Ok(table.clone()),
        }
    }
}

/// The keys a resumed run may change, and why each is safe: none of them alters a step
/// already taken or the data the saved cursor walks.
pub const RESUMABLE_KEYS: &[&str] = &[
    // Longer or shorter runs: the learning rate of the steps scheduled before is kept
    // (`train::run_dir`: steps past the first schedule run at its final rate).
    "train.max_steps",
    "train.epochs",
    "train.eval_interval",
    "train.eval_batches",
    "train.checkpoint_interval",
    "train.keep_checkpoints",
    "train.log_interval",
    // Which implementation runs the ops (not part of the shape).
    "model.kernels",
    // More rounds of rejection sampling.
    "rs.iterations",
    // More PPO iterations (the learning-rate schedule keeps its first length), and how often
    // and on how much it evaluates.
    "ppo.iterations",
    "ppo.eval_interval",
    "ppo.eval_limit",
];

/// The configuration of a resumed run: the run's saved configuration (`saved`, the TOML it
/// stored) with the given file and `--set` overrides over it. Only [`RESUMABLE_KEYS`] (and
/// the `[sample]` of pretraining) may differ from the saved values; any other difference is
/// an error naming the key and both values. `source` names the saved file in messages;
/// `stage` the command, for a run that another stage wrote.
pub fn load_resumed<T: StageConfig>(
    saved: &str,
    source: &Path,
    stage: &str,
    given: Option<&ConfigSource>,
    overrides: &[String],
) -> Result<T> {
    let saved_config: T = toml::from_str(saved).map_err(|e| {
        anyhow!(
            "--resume: {} is not a run of `kiln {stage}` ({})",
            source.display(),
            one_line(&e.to_string())
        )
    })?;
    let saved_table = toml::Table::try_from(&saved_config).expect("config serialises");
    let config: T = load_over(saved_table.clone(), given, overrides)?;
    let new_table = toml::Table::try_from(&config).expect("config serialises");
    let (old, new) = (flatten(&saved_table), flatten(&new_table));
    for (key, new_value) in &new {
        let old_value = old.get(key);
        if old_value == Some(new_value) {
            continue;
        }
        if RESUMABLE_KEYS.contains(&key.as_str()) || key.starts_with("sample.") {
            continue;
        }
        let shown = |v: Option<&toml::Value>| v.map_or("(none)".to_string(), |v| v.to_string());
        let what = if key.starts_with("model.") {
            ": another model shape"
        } else {
            ""
        };
        bail!(
            "--resume: {key} is {} in the run ({}) but {} now{what}; only {} may change on resume (start a new run with another --out to change it)",
            shown(old_value),
            source.display(),
            shown(Some(new_value)),
            RESUMABLE_KEYS.join(", ")
        );
    }
    Ok(config)
}

/// `section.key` -> value, for the two-level tables configs are.
pub fn flatten(table: &toml::Table) -> std::collections::BTreeMap<String, toml::Value> {
    let mut out = std::collections::BTreeMap::new();
    for (section, value) in table {
        match value {
            toml::Value::Table(keys) => {
                for (key, v) in keys {
                    out.insert(format!("{section}.{key}"), v.clone());
                }
            }
            v => {
                out.insert(section.clone(), v.clone());
            }
        }
    }
    out
}

/// [`load`] over the given base table (the stage's defaults, or a resumed run's own
/// configuration).
fn load_over<T: StageConfig>(
    base: toml::Table,
    given: Option<&ConfigSource>,
    overrides: &[String],
) -> Result<T> {
    let mut table = match given {
        Some(given) => given.read()?,
        None => toml::Table::new(),
    };
    let source = given.map_or("config".to_string(), |g| g.name());
    let known = T::known_keys();
    // Reject unknown keys in the file with the key's full name before serde does, so the
    // message names `section.key` rather than only the field.
    check_known_keys(&known, &table, &source)?;
    for item in overrides {
        apply_override(&known, &mut table, item)?;
    }
    let mut merged = base;
    for (section, values) in table {
        match (merged.get_mut(&section), values) {
            (Some(toml::Value::Table(defaults)), toml::Value::Table(given)) => {
                defaults.extend(given)
            }
            (_, values) => {
                merged.insert(section, values);
            }
        }
    }
    // A float key given as inf or nan passes range checks written as comparisons the wrong
    // way round, and diverges a run at its first step: refuse it by name.
    for (key, value) in flatten(&merged) {
        if let toml::Value::Float(x) = value
            && !x.is_finite()
        {
            bail!("{source}: {key} must be a finite number, not {x}");
        }
    }
    let config: T = toml::Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| anyhow!("{source}: {}", one_line(&e.to_string())))?;
    config.validate()?;
    Ok(config)
}

/// How a config value is written in a config file (`"small"`, `"all"`), for messages: what
/// the user would type, never a Rust variant name.
pub fn name_of<T: Serialize>(value: &T) -> String {
    match toml::Value::try_from(value) {
        Ok(toml::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

/// A multi-line message (a TOML parser's) on one line.
pub fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn check_known_keys(known: &toml::Table, table: &toml::Table, source: &str) -> Result<()> {
    for (section, value) in table {
        let Some(known_section) = known.get(section).and_then(|v| v.as_table()) else {
            let sections: Vec<&String> = known.keys().collect();
            bail!(
                "{source}: unknown section [{section}]{}",
                nearest(section, sections.iter().map(|s| s.as_str()))
                    .map_or(String::new(), |s| format!(" (did you mean [{s}]?)"))
            );
        };
        let Some(keys) = value.as_table() else {
            bail!("{source}: [{section}] must be a table");
        };
        for key in keys.keys() {
            if !known_section.contains_key(key) {
                bail!(
                    "{source}: unknown key {section}.{key}{}",
                    did_you_mean(known, &format!("{section}.{key}"))
                );
            }
        }
    }
    Ok(())
}

/// " (did you mean `section.key`?)" when a known key is a likely typo of `name`, else "".
fn did_you_mean(known: &toml::Table, name: &str) -> String {
    let keys: Vec<String> = flatten(known).into_keys().collect();
    nearest(name, keys.iter().map(String::as_str))
        .map_or(String::new(), |k| format!(" (did you mean {k}?)"))
}

/// The candidate closest to `name` by edit distance, if it is close enough to be a typo.
fn nearest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (strsim::levenshtein(name, c), c))
        .filter(|&(d, c)| d > 0 && d <= 2.max(c.len() / 4))
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Applies one `--set section.key=value`; the value is read as TOML, or as a string.
fn apply_override(known: &toml::Table, table: &mut toml::Table, item: &str) -> Result<()> {
    let (path, raw) = item
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {item}: expected section.key=value"))?;
    let (section, key) = path
        .trim()
        .split_once('.')
        .ok_or_else(|| anyhow!("--set {item}: expected section.key=value"))?;
    let known_value = known
        .get(section)
        .and_then(|s| s.as_table())
        .and_then(|s| s.get(key))
        .ok_or_else(|| {
            anyhow!(
                "--set: unknown key {section}.{key}{}",
                did_you_mean(known, &format!("{section}.{key}"))
            )
        })?;
    let raw = raw.trim();
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    // A word where a number or switch belongs is the `--set`'s mistake, not a config file's.
    let expected = match known_value {
        toml::Value::Float(_) | toml::Value::Integer(_) => Some("a number"),
        toml::Value::Boolean(_) => Some("true or false"),
        _ => None,
    };
    if let (Some(expected), toml::Value::String(_)) = (expected, &value) {
        bail!("--set {item}: {section}.{key} takes {expected}, not {raw:?}");
    }
    // Integers written where a float is expected are fine ("optim.lr=1").
    let value = match (known_value, value) {
        (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
        (toml::Value::Array(_), toml::Value::String(s)) => {
            toml::Value::Array(vec![toml::Value::String(s)])
        }
        (_, v) => v,
    };
    table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| anyhow!("--set {item}: [{section}] is not a table"))?
        .insert(key.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_defaults() {
        let o = OptimConfig::default();
        assert_eq!(
            (o.beta1, o.beta2, o.eps, o.weight_decay),
            (0.9, 0.95, 1e-5, 0.1)
        );
        assert_eq!(
            (o.grad_clip, o.min_lr_ratio, o.warmup_steps),
            (1.0, 0.1, 2000)
        );
    }

    #[test]
    fn overrides_apply_and_unknown_keys_are_named() {
        let c = Config::load(None, &["optim.lr=1".into(), "train.batch_size=3".into()]).unwrap();
        assert_eq!(c.optim.lr, 1.0);
        assert_eq!(c.train.batch_size, 3);
        let e = Config::load(None, &["optim.lrr=1".into()]).unwrap_err();
        assert!(e.to_string().contains("optim.lrr"), "{e}");
        assert!(e.to_string().contains("did you mean optim.lr?"), "{e}");
        let e = Config::load(None, &["train.max_step=1".into()]).unwrap_err();
        assert!(
            e.to_string().contains("did you mean train.max_steps?"),
            "{e}"
        );
        let e = Config::load(None, &["optim.zzzzzz=1".into()]).unwrap_err();
        assert!(!e.to_string().contains("did you mean"), "{e}");
        // A word for a number blames the --set, naming the key.
        let e = Config::load(None, &["optim.lr=abc".into()]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--set optim.lr=abc: optim.lr takes a number"),
            "{e}"
        );
        let e = Config::load(None, &["train.batch_size=0".into()]).unwrap_err();
        assert!(e.to_string().contains("train.batch_size"), "{e}");
        let e = Config::load(None, &["train.batch_size=\"x\"".into()]).unwrap_err();
        assert!(e.to_string().contains("batch_size"), "{e}");
    }

    #[test]
    fn non_finite_floats_are_refused_by_key() {
        for (set, key) in [
            ("optim.lr=inf", "optim.lr"),
            ("optim.min_lr_ratio=nan", "optim.min_lr_ratio"),
            ("model.init_std=-inf", "model.init_std"),
        ] {
            let e = Config::load(None, &[set.into()]).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("finite"), "{set}: {e}");
        }
    }

    #[test]
    fn paper_shapes_have_their_parameter_counts() {
        // Llama 2 7B has 6.74e9 parameters, 13B 13.0e9, 70B 69.0e9.
        let billions = |p: Preset| p.model().num_params() as f64 / 1e9;
        assert!((billions(Preset::Llama2_7b) - 6.74).abs() < 0.01);
        assert!((billions(Preset::Llama2_13b) - 13.02).abs() < 0.01);
        assert!((billions(Preset::Llama2_70b) - 68.98).abs() < 0.01);
    }
}
