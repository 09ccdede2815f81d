//! `kiln pipeline`: the whole recipe from one TOML file, resumable stage by stage.
//!
//! A recipe is an ordered list of `[[stage]]` tables. Each names its `kind`, its config (the
//! sections of the stage's own config file, inline, over an optional `config = "file"`), and
//! its inputs by reference to earlier stages: a string `"@sft"` is the SFT stage's model,
//! `"@gym-data/sft_train.jsonl"` a file of the gym-data stage. Every stage runs into
//! `OUT/<name>/`, exactly as its own command would:
//!
//! ```text
//! OUT/pipeline.toml        the recipe as given (for reading; the run does not read it back)
//! OUT/plan.json            the stages in order: names, kinds, what each reads
//! OUT/<stage>/             the stage's run (checkpoints, metrics.jsonl, config.toml, ...)
//! OUT/<stage>/eval.json    its held-out evaluation, when the recipe asks for one
//! OUT/<stage>/stage.json   written last: the stage completed, with the config it ran with
//!                          and the checksum of its output
//! OUT/report.md, OUT/report/*.png   the report (`kiln report OUT` redraws it)
//! ```
//!
//! Everything (references, every stage's config, input files that exist before the run)
//! is checked before the first stage starts. `--resume` skips completed stages after
//! checking their config and output against `stage.json`, resumes the interrupted one from
//! its own checkpoint (a stage killed before its first checkpoint starts over: its
//! directory holds nothing that took long), and runs the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::config::{self, ConfigSource, StageConfig};
use crate::device::ComputeDevice;
use crate::gym::GymSizes;
use crate::gym::eval::{EvalOptions, EvalSets, GymReport};
use crate::infer::score::{self, PairSubset, RmReport};
use crate::interop::checkpoint;
use crate::stages::{gatt, ppo, pretrain, reward, rs, sft};
use crate::train::collective::Collective;
use crate::train::stage::Launch;

pub const RECIPE_COPY: &str = "pipeline.toml";
pub const PLAN_FILE: &str = "plan.json";
pub const STAGE_FILE: &str = "stage.json";
pub const EVAL_FILE: &str = "eval.json";
/// Written when a stage starts: the config it runs with, which a resumed run must still have.
pub const STARTED_FILE: &str = "pipeline-stage.toml";

/// What a stage does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageKind {
    /// `kiln gym generate`: the task suite's train and held-out files.
    GymData,
    Pretrain,
    Sft,
    /// A reward model; `[rm] kind` says which (helpfulness or safety).
    Rm,
    Rs,
    Ppo,
    Gatt,
    /// Only the evaluation, of `checkpoint`.
    Eval,
}

impl StageKind {
    const ALL: [StageKind; 8] = [
        StageKind::GymData,
        StageKind::Pretrain,
        StageKind::Sft,
        StageKind::Rm,
        StageKind::Rs,
        StageKind::Ppo,
        StageKind::Gatt,
        StageKind::Eval,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StageKind::GymData => "gym-data",
            StageKind::Pretrain => "pretrain",
            StageKind::Sft => "sft",
            StageKind::Rm => "rm",
            StageKind::Rs => "rs",
            StageKind::Ppo => "ppo",
            StageKind::Gatt => "gatt",
            StageKind::Eval => "eval",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether it starts from a model (`init`).
    fn needs_init(self) -> bool {
        matches!(
            self,
            StageKind::Sft | StageKind::Rm | StageKind::Rs | StageKind::Ppo | StageKind::Gatt
        )
    }

    /// Whether it is evaluated when the recipe has an `[eval]` section and the stage does not
    /// say otherwise: everything that makes a chat or reward model.
    fn evaluated_by_default(self) -> bool {
        !matches!(self, StageKind::GymData | StageKind::Pretrain)
    }

    /// Its config section that holds `init` (the stages whose config stores it), if any.
    fn init_section(self) -> Option<&'static str> {
        match self {
            StageKind::Rs => Some("rs"),
            StageKind::Ppo => Some("ppo"),
            _ => None,
        }
    }
}

/// The gym-data stage's config: `[gym] seed` and the sizes of every file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GymDataConfig {
    pub gym: GymDataSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GymDataSection {
    pub seed: u64,
    #[serde(flatten)]
    pub sizes: GymSizes,
}

impl Default for GymDataConfig {
    fn default() -> Self {
        Self {
            gym: GymDataSection {
                seed: 0,
                sizes: GymSizes::default(),
            },
        }
    }
}

impl StageConfig for GymDataConfig {
    fn validate(&self) -> Result<()> {
        let s = &self.gym.sizes;
        if !(0.0..1.0).contains(&s.heldout_unsafe_fraction) {
            bail!("gym.heldout_unsafe_fraction must be in [0, 1)");
        }
        // Read before the run's directory is made: a bad directory of unsafe prompts would
        // otherwise fail the stage and leave an --out that only --resume reopens.
        crate::gym::load_unsafe_prompts(&s.unsafe_dir)
            .with_context(|| "gym.unsafe_dir".to_string())?;
        Ok(())
    }
}

/// The eval stage has no sections of its own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalOnlyConfig {}

impl StageConfig for EvalOnlyConfig {
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// The recipe's `[eval]`: the held-out evaluation after each stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSettings {
    /// The gym directory (usually `"@gym-data"`): its held-out tasks, unsafe prompts,
    /// dialogues and preference pairs.
    pub data: String,
    /// Items of each held-out set (0: all).
    pub limit: usize,
    pub batch_size: usize,
    /// Longest greedy answer, in tokens.
    pub max_answer_tokens: usize,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            data: String::new(),
            limit: 0,
            batch_size: 64,
            max_answer_tokens: 48,
        }
    }
}

/// One stage of a checked recipe, its inputs resolved to paths.
#[derive(Debug, Clone)]
pub struct PlannedStage {
    pub name: String,
    pub kind: StageKind,
    /// The config sections it runs with (references replaced by paths; `init` inside `[rs]`
    /// or `[ppo]` for the stages that store it).
    pub config: toml::Table,
    /// The model it starts from (or, for an eval stage, the model it evaluates).
    pub init: Option<PathBuf>,
    /// The earlier stages it reads.
    pub inputs: Vec<String>,
    /// The stage `init` refers to, if it is one.
    pub init_stage: Option<String>,
    pub evaluate: bool,
    /// `OUT/<name>`.
    pub dir: PathBuf,
    /// What `@name` means to later stages (its model, or its directory).
    pub output: Option<PathBuf>,
}

impl PlannedStage {
    /// Everything that makes its result: compared with a completed stage's on resume.
    fn fingerprint(&self) -> toml::Table {
        let mut table = self.config.clone();
        let init = self
            .init
            .as_ref()
            .map_or(String::new(), |p| p.display().to_string());
        table.insert("init".into(), toml::Value::String(init));
        table
    }

    fn source(&self, recipe: &Path) -> String {
        format!("{}: stage `{}`", recipe.display(), self.name)
    }
}

/// A checked recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub path: PathBuf,
    pub text: String,
    pub out: PathBuf,
    pub eval: Option<(EvalSettings, PathBuf)>,
    pub stages: Vec<PlannedStage>,
}

/// The stages in order, as `plan.json` stores them for the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanEntry {
    pub name: String,
    pub kind: StageKind,
    pub inputs: Vec<String>,
    pub init_stage: Option<String>,
    pub evaluate: bool,
}

/// A completed stage (`stage.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    pub kind: StageKind,
    /// The config it ran with ([`PlannedStage::fingerprint`]) as TOML.
    pub config: String,
    /// Output files (relative to the pipeline's directory) and their SHA-256.
    pub outputs: BTreeMap<String, String>,
    /// Wall time of the process that completed it (training and evaluation).
    pub wall_s: f64,
    pub eval_s: f64,
    pub steps: Option<u64>,
    pub final_val_loss: Option<f64>,
    /// What the stage's own command prints: RS's rounds, PPO's evaluations, the gym's files.
    pub details: serde_json::Value,
}

/// A stage's held-out evaluation (`eval.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageEval {
    Gym(GymReport),
    RewardModel(RmReport),
}

/// What `kiln pipeline` was asked to do.
#[derive(Debug, Clone)]
pub struct PipelineArgs {
    pub recipe: PathBuf,
    pub out: PathBuf,
    pub resume: bool,
    pub rerun_from: Option<String>,
    pub device: ComputeDevice,
    /// Only print what would run.
    pub plan: bool,
    /// The data-parallel workers running the recipe (an `mpirun` job): every stage trains on
    /// all of them; worker 0 writes the pipeline's own files and evaluates.
    pub collective: Arc<dyn Collective>,
}

const RESERVED: [&str; 6] = ["name", "kind", "init", "checkpoint", "config", "evaluate"];

/// Where a completed or started stage stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Completed, taking this many seconds.
    Done(f64),
    /// Started; resumes from what it saved (described).
    Resumable(String),
    /// Started but saved nothing to resume from: starts over.
    Restart,
    NotStarted,
}

/// Reads and checks a recipe: names, kinds, references, and every stage's config (as its own
/// command would check it). Nothing is written.
pub fn read_recipe(path: &Path, out: &Path) -> Result<Recipe> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read recipe {}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        anyhow!("{}: {}", path.display(), config::one_line(&e.to_string()))
    })?;
    let shown = path.display();
    for key in table.keys() {
        if key != "stage" && key != "eval" {
            bail!("{shown}: unknown key `{key}` (a recipe has [eval] and [[stage]] tables)");
        }
    }
    let entries = match table.get("stage") {
        Some(toml::Value::Array(entries)) if !entries.is_empty() => entries.clone(),
        Some(_) => bail!("{shown}: `stage` must be a list of [[stage]] tables"),
        None => bail!("{shown}: no [[stage]] tables: a recipe lists its stages in order"),
    };
    // Names and kinds first: references are checked against the whole list.
    let mut names: Vec<String> = Vec::new();
    let mut kinds = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let entry = entry
            .as_table()
            .ok_or_else(|| anyhow!("{shown}: stage {} is not a table", i + 1))?;
        let name = match entry.get("name") {
            Some(toml::Value::String(s)) => s.clone(),
            _ => bail!("{shown}: stage {} has no `name` (a string)", i + 1),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || matches!(name.as_str(), "report" | "replaced")
        {
            bail!(
                "{shown}: stage name `{name}`: use letters, digits, '-' and '_' (it names the stage's directory; `report` and `replaced` are taken)"
            );
        }
        if names.contains(&name) {
            bail!("{shown}: two stages are named `{name}`");
        }
        let kind = match entry.get("kind") {
            Some(toml::Value::String(k)) => StageKind::parse(k).ok_or_else(|| {
                anyhow!(
                    "{shown}: stage `{name}`: unknown kind `{k}` (one of {})",
                    StageKind::ALL.map(|k| k.name()).join(", ")
                )
            })?,
            _ => bail!("{shown}: stage `{name}` has no `kind` (a string)"),
        };
        names.push(name);
        kinds.push(kind);
    }
    let refs: Vec<BTreeSet<String>> = entries
        .iter()
        .map(|e| {
            let mut found = BTreeSet::new();
            collect_refs(
                &toml::Value::Table(e.as_table().cloned().unwrap_or_default()),
                &mut found,
            );
            found
        })
        .collect();

    let mut stages: Vec<PlannedStage> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let entry = entry.as_table().expect("checked above");
        let (name, kind) = (names[i].clone(), kinds[i]);
        let source = format!("{shown}: stage `{name}`");
        let resolver = Resolver {
            names: &names,
            refs: &refs,
            index: i,
            earlier: &stages,
        };
        let mut inputs = BTreeSet::new();
        for key in entry.keys() {
            if !RESERVED.contains(&key.as_str()) && !entry[key].is_table() {
                bail!(
                    "{source}: unknown key `{key}` (a stage has {} and config sections)",
                    RESERVED.join(", ")
                );
            }
        }
        let string_field = |key: &str| -> Result<Option<String>> {
            match entry.get(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => bail!("{source}: `{key}` must be a string"),
            }
        };
        let model_key = if kind == StageKind::Eval {
            "checkpoint"
        } else {
            "init"
        };
        let other_key = if kind == StageKind::Eval {
            "init"
        } else {
            "checkpoint"
        };
        if entry.contains_key(other_key) {
            bail!(
                "{source}: a {} stage takes `{model_key}`, not `{other_key}`",
                kind.name()
            );
        }
        let init_raw = string_field(model_key)?;
        let mut init_stage = None;
        let init = match &init_raw {
            Some(raw) => {
                let (path, stage) = resolver.resolve(raw, model_key, &source)?;
                if let Some(stage) = stage {
                    inputs.insert(stage.clone());
                    init_stage = Some(stage);
                }
                check_exists(&path, raw, model_key, &source)?;
                Some(path)
            }
            None => None,
        };
        if init.is_none() && (kind.needs_init() || kind == StageKind::Eval) {
            bail!(
                "{source}: `{model_key}` is required: the model to {} (\"@stage\" or a path)",
                if kind == StageKind::Eval {
                    "evaluate"
                } else {
                    "start from"
                }
            );
        }
        if init.is_some() && matches!(kind, StageKind::GymData | StageKind::Pretrain) {
            bail!("{source}: a {} stage takes no `init`", kind.name());
        }
        // The config: the base file's sections, then the inline ones over them.
        let mut config = match string_field("config")? {
            Some(file) => {
                let file = PathBuf::from(file);
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("{source}: cannot read config {}", file.display()))?;
                text.parse::<toml::Table>().map_err(|e| {
                    anyhow!(
                        "{source}: {}: {}",
                        file.display(),
                        config::one_line(&e.to_string())
                    )
                })?
            }
            None => toml::Table::new(),
        };
        for (key, value) in entry {
            if let toml::Value::Table(given) = value {
                match config.get_mut(key) {
                    Some(toml::Value::Table(base)) => base.extend(given.clone()),
                    _ => {
                        config.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        let mut config = resolver.resolve_table(config, &source, &mut inputs)?;
        if let (Some(section), Some(init)) = (kind.init_section(), &init) {
            let section = config
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let section = section
                .as_table_mut()
                .ok_or_else(|| anyhow!("{source}: [{}] must be a table", kind.name()))?;
            if section.contains_key("init") {
                bail!(
                    "{source}: give the starting model once, as the stage's `init` (not {}.init)",
                    kind.name()
                );
            }
            section.insert(
                "init".into(),
                toml::Value::String(init.display().to_string()),
            );
        }
        let dir = out.join(&name);
        let output = check_config(kind, &config, &dir, &source)?;
        let evaluate = match entry.get("evaluate") {
            None => kind.evaluated_by_default() && table.contains_key("eval"),
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => bail!("{source}: `evaluate` must be true or false"),
        };
        if evaluate && matches!(kind, StageKind::GymData) {
            bail!("{source}: evaluate: a gym-data stage makes no model to evaluate");
        }
        if kind == StageKind::Eval && !table.contains_key("eval") {
            bail!("{source}: an eval stage needs the recipe's [eval] section (its data)");
        }
        stages.push(PlannedStage {
            name,
            kind,
            config,
            init: if kind.init_section().is_some() {
                None
            } else {
                init
            },
            inputs: inputs.into_iter().collect(),
            init_stage,
            evaluate: evaluate || kind == StageKind::Eval,
            dir,
            output,
        });
    }
    let eval = match table.get("eval") {
        None => None,
        Some(value) => {
            let settings: EvalSettings =
                value.clone().try_into().map_err(|e: toml::de::Error| {
                    anyhow!("{shown}: [eval]: {}", config::one_line(&e.to_string()))
                })?;
            if settings.batch_size == 0 || settings.max_answer_tokens == 0 {
                bail!("{shown}: eval.batch_size and eval.max_answer_tokens must be at least 1");
            }
            if settings.data.is_empty() {
                bail!("{shown}: eval.data is required: the gym directory (\"@gym-data\")");
            }
            let resolver = Resolver {
                names: &names,
                refs: &refs,
                index: names.len(),
                earlier: &stages,
            };
            let source = format!("{shown}: [eval]");
            let (data, stage) = resolver.resolve(&settings.data, "data", &source)?;
            // The evaluation data must exist before the first evaluation.
            if let Some(stage) = stage {
                let at = names.iter().position(|n| *n == stage).expect("resolved");
                if let Some(first) = stages.iter().position(|s| s.evaluate)
                    && first <= at
                {
                    bail!(
                        "{source}: data refers to `@{stage}`, which runs after stage `{}` is evaluated",
                        stages[first].name
                    );
                }
            } else {
                check_exists(&data, &settings.data, "data", &source)?;
            }
            Some((settings, data))
        }
    };
    Ok(Recipe {
        path: path.to_path_buf(),
        text,
        out: out.to_path_buf(),
        eval,
        stages,
    })
}

/// References of `@name` form in a stage's entry (for cycle detection).
fn collect_refs(value: &toml::Value, found: &mut BTreeSet<String>) {
    match value {
        toml::Value::String(s) => {
            if let Some(name) = reference_name(s) {
                found.insert(name.to_string());
            }
        }
        toml::Value::Array(items) => items.iter().for_each(|v| collect_refs(v, found)),
        toml::Value::Table(t) => t.values().for_each(|v| collect_refs(v, found)),
        _ => {}
    }
}

/// `"@name"` or `"@name/path"` -> `name`.
fn reference_name(s: &str) -> Option<&str> {
    let rest = s.strip_prefix('@')?;
    Some(rest.split_once('/').map_or(rest, |(name, _)| name))
}

struct Resolver<'a> {
    names: &'a [String],
    refs: &'a [BTreeSet<String>],
    /// The stage being resolved (its position in `names`).
    index: usize,
    earlier: &'a [PlannedStage],
}

impl Resolver<'_> {
    /// A string value: a reference becomes the path it stands for; anything else is kept.
    /// Returns the path and the stage it refers to.
    fn resolve(&self, raw: &str, key: &str, source: &str) -> Result<(PathBuf, Option<String>)> {
        let Some(name) = reference_name(raw) else {
            return Ok((PathBuf::from(raw), None));
        };
        let rest = raw[1 + name.len()..].trim_start_matches('/');
        let Some(at) = self.names.iter().position(|n| n == name) else {
            bail!("{source}: {key} refers to `@{name}`: no stage has that name");
        };
        if at == self.index {
            bail!("{source}: {key} refers to `@{name}`, the stage itself");
        }
        if at > self.index {
            if let Some(cycle) = self.cycle(at) {
                bail!(
                    "{source}: {key}: a cycle of references: {}",
                    cycle.join(" -> ")
                );
            }
            bail!(
                "{source}: {key} refers to `@{name}`, which comes later (stages run in the order listed and read only earlier ones)"
            );
        }
        let stage = &self.earlier[at];
        let Some(output) = &stage.output else {
            bail!(
                "{source}: {key} refers to `@{name}`, an {} stage, which makes nothing to read",
                stage.kind.name()
            );
        };
        let path = if rest.is_empty() {
            output.clone()
        } else {
            stage.dir.join(rest)
        };
        Ok((path, Some(name.to_string())))
    }

    /// The chain from this stage through `start` back to this stage, if references close one.
    fn cycle(&self, start: usize) -> Option<Vec<String>> {
        let me = &self.names[self.index];
        let mut path = vec![me.clone(), self.names[start].clone()];
        let mut seen = BTreeSet::new();
        fn walk(
            r: &Resolver,
            at: usize,
            me: &str,
            path: &mut Vec<String>,
            seen: &mut BTreeSet<usize>,
        ) -> bool {
            if !seen.insert(at) {
                return false;
            }
            for next in &r.refs[at] {
                if next == me {
                    path.push(me.to_string());
                    return true;
                }
                if let Some(j) = r.names.iter().position(|n| n == next) {
                    path.push(next.clone());
                    if walk(r, j, me, path, seen) {
                        return true;
                    }
                    path.pop();
                }
            }
            false
        }
        walk(self, start, me, &mut path, &mut seen).then_some(path)
    }

    /// Every string in a stage's config sections, references resolved.
    fn resolve_table(
        &self,
        table: toml::Table,
        source: &str,
        inputs: &mut BTreeSet<String>,
    ) -> Result<toml::Table> {
        let mut out = toml::Table::new();
        for (section, value) in table {
            let toml::Value::Table(keys) = value else {
                bail!("{source}: [{section}] must be a table");
            };
            let mut resolved = toml::Table::new();
            for (key, value) in keys {
                let full = format!("{section}.{key}");
                let value = self.resolve_value(value, &full, source, inputs)?;
                resolved.insert(key, value);
            }
            out.insert(section, toml::Value::Table(resolved));
        }
        Ok(out)
    }

    fn resolve_value(
        &self,
        value: toml::Value,
        key: &str,
        source: &str,
        inputs: &mut BTreeSet<String>,
    ) -> Result<toml::Value> {
        Ok(match value {
            toml::Value::String(s) => {
                let (path, stage) = self.resolve(&s, key, source)?;
                match stage {
                    Some(stage) => {
                        inputs.insert(stage);
                        toml::Value::String(path.display().to_string())
                    }
                    None => {
                        if PATH_KEYS.contains(&key) {
                            check_exists(&path, &s, key, source)?;
                        }
                        toml::Value::String(s)
                    }
                }
            }
            toml::Value::Array(items) => toml::Value::Array(
                items
                    .into_iter()
                    .map(|v| self.resolve_value(v, key, source, inputs))
                    .collect::<Result<_>>()?,
            ),
            other => other,
        })
    }
}

/// Config keys that name input files: a path given (not a reference) must exist before the
/// run starts, so a typo fails at once rather than after the stages before it.
const PATH_KEYS: &[&str] = &[
    "data.corpus",
    "data.tokenizer",
    "data.train",
    "data.val",
    "gatt.dialogues",
    "gatt.instructions",
    "rs.prompts",
    "rs.rm_helpful",
    "rs.rm_safety",
    "ppo.prompts",
    "ppo.eval_prompts",
    "ppo.rm_helpful",
    "ppo.rm_safety",
    "ppo.value_init",
    "gym.unsafe_dir",
];

fn check_exists(path: &Path, raw: &str, key: &str, source: &str) -> Result<()> {
    if !raw.is_empty() && !raw.starts_with('@') && !path.exists() {
        bail!("{source}: {key}: {} does not exist", path.display());
    }
    Ok(())
}

/// Checks a stage's config as its command would, and returns what `@name` stands for.
fn check_config(
    kind: StageKind,
    config: &toml::Table,
    dir: &Path,
    source: &str,
) -> Result<Option<PathBuf>> {
    let given = ConfigSource::Table {
        table: config.clone(),
        name: source.to_string(),
    };
    fn load<T: StageConfig>(given: &ConfigSource, source: &str) -> Result<T> {
        // Messages of a key the stage does not know already name the recipe and stage.
        config::load_from(Some(given), &[]).map_err(|e| {
            let message = format!("{e:#}");
            if message.starts_with(source) {
                anyhow!(message)
            } else {
                anyhow!("{source}: {message}")
            }
        })
    }
    let run_dir = Some(dir.to_path_buf());
    Ok(match kind {
        StageKind::GymData => load::<GymDataConfig>(&given, source).map(|_| run_dir)?,
        StageKind::Pretrain => load::<config::Config>(&given, source).map(|_| run_dir)?,
        StageKind::Sft => load::<sft::SftConfig>(&given, source).map(|_| run_dir)?,
        StageKind::Gatt => load::<gatt::GattConfig>(&given, source).map(|_| run_dir)?,
        StageKind::Rm => load::<reward::RmConfig>(&given, source).map(|_| run_dir)?,
        StageKind::Ppo => load::<ppo::PpoConfig>(&given, source).map(|_| run_dir)?,
        // The policy of the last round.
        StageKind::Rs => {
            let c = load::<rs::RsConfig>(&given, source)?;
            Some(dir.join(format!("round-{}", c.rs.iterations)))
        }
        StageKind::Eval => load::<EvalOnlyConfig>(&given, source).map(|_| None)?,
    })
}

/// Where each stage of `recipe` stands in its output directory.
pub fn progress(recipe: &Recipe) -> Result<Vec<Progress>> {
    recipe.stages.iter().map(stage_progress).collect()
}

fn stage_progress(stage: &PlannedStage) -> Result<Progress> {
    let record_path = stage.dir.join(STAGE_FILE);
    if record_path.is_file() {
        return Ok(Progress::Done(
            read_json::<StageRecord>(&record_path)?.wall_s,
        ));
    }
    if !stage.dir.exists() {
        return Ok(Progress::NotStarted);
    }
    Ok(match stage.kind {
        StageKind::Rs if stage.dir.join(crate::train::run_dir::CONFIG_FILE).is_file() => {
            Progress::Resumable("its rounds so far".into())
        }
        StageKind::Pretrain | StageKind::Sft | StageKind::Gatt | StageKind::Rm | StageKind::Ppo => {
            match checkpoint::list(&stage.dir.join("checkpoints"))?.pop() {
                Some((step, _)) => Progress::Resumable(format!("step {step}")),
                None => Progress::Restart,
            }
        }
        _ => Progress::Restart,
    })
}

/// Reads a JSON file the run wrote (`plan.json`, `stage.json`, `eval.json`).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Checks that `out` can take this recipe's run: a fresh run needs an empty place; a resumed
/// one its own recipe's run, with every completed stage's config and output unchanged (unless
/// it is to be rerun).
fn check_out(recipe: &Recipe, args: &PipelineArgs) -> Result<()> {
    let out = &recipe.out;
    let continuing = args.resume || args.rerun_from.is_some();
    let occupied = out.exists()
        && std::fs::read_dir(out)
            .with_context(|| format!("cannot read {}", out.display()))?
            .next()
            .is_some();
    if !continuing {
        if occupied {
            bail!(
                "{} already holds a run: pass --resume to continue it, or choose another --out",
                out.display()
            );
        }
        return Ok(());
    }
    if !out.join(PLAN_FILE).is_file() {
        bail!(
            "--resume: {} holds no pipeline run ({} is missing)",
            out.display(),
            out.join(PLAN_FILE).display()
        );
    }
    let earlier: Vec<PlanEntry> = read_json(&out.join(PLAN_FILE))?;
    for old in &earlier {
        let now = recipe.stages.iter().find(|s| s.name == old.name);
        let started = out.join(&old.name).exists();
        match now {
            Some(now) if now.kind != old.kind && started => bail!(
                "{}: stage `{}` is {} here but {} in the run in {}: another recipe's run (choose another --out)",
                recipe.path.display(),
                old.name,
                now.kind.name(),
                old.kind.name(),
                out.display()
            ),
            None if started => bail!(
                "{} holds stage `{}`, which {} does not have: another recipe's run (choose another --out)",
                out.display(),
                old.name,
                recipe.path.display()
            ),
            _ => {}
        }
    }
    let rerun_at = match &args.rerun_from {
        Some(name) => Some(
            recipe
                .stages
                .iter()
                .position(|s| &s.name == name)
                .ok_or_else(|| {
                    anyhow!(
                        "--rerun-from {name}: {} has no such stage",
                        recipe.path.display()
                    )
                })?,
        ),
        None => None,
    };
    for (i, stage) in recipe.stages.iter().enumerate() {
        if rerun_at.is_some_and(|at| i >= at) {
            continue;
        }
        let record_path = stage.dir.join(STAGE_FILE);
        let started_path = stage.dir.join(STARTED_FILE);
        if !record_path.is_file() {
            // An interrupted stage resumes with the config it started with.
            if started_path.is_file() {
                let then = std::fs::read_to_string(&started_path)
                    .with_context(|| format!("cannot read {}", started_path.display()))?;
                same_config(recipe, stage, &then, &started_path, "the interrupted stage")?;
            }
            continue;
        }
        let record = read_json::<StageRecord>(&record_path)?;
        same_config(
            recipe,
            stage,
            &record.config,
            &record_path,
            "the completed stage",
        )?;
        for (file, sum) in &record.outputs {
            let path = out.join(file);
            let bytes = std::fs::read(&path).with_context(|| {
                format!(
                    "stage `{}` completed but its output {} cannot be read: pass --rerun-from {} to redo it",
                    stage.name,
                    path.display(),
                    stage.name
                )
            })?;
            if &checkpoint::sha256_hex(&bytes) != sum {
                bail!(
                    "stage `{}`: {} changed since the stage completed: pass --rerun-from {} to redo it",
                    stage.name,
                    path.display(),
                    stage.name
                );
            }
        }
    }
    Ok(())
}

/// Fails, naming the stage and the first differing key, if `stage`'s config now differs from
/// `then` (the TOML stored in `path`, of the `what`).
fn same_config(
    recipe: &Recipe,
    stage: &PlannedStage,
    then: &str,
    path: &Path,
    what: &str,
) -> Result<()> {
    let then: toml::Table = then.parse().map_err(|e: toml::de::Error| {
        anyhow!("{}: {}", path.display(), config::one_line(&e.to_string()))
    })?;
    let (then, now) = (
        config::flatten(&then),
        config::flatten(&stage.fingerprint()),
    );
    let keys: BTreeSet<&String> = then.keys().chain(now.keys()).collect();
    for key in keys {
        if then.get(key) != now.get(key) {
            let shown = |v: Option<&toml::Value>| v.map_or("(none)".into(), |v| v.to_string());
            bail!(
                "{}: {key} is {} in {what} ({}) but {} now: pass --rerun-from {} to rerun it and every stage after it",
                stage.source(&recipe.path),
                shown(then.get(key)),
                path.display(),
                shown(now.get(key)),
                stage.name
            );
        }
    }
    Ok(())
}

/// The output files whose checksums `stage.json` records: the gym's files, or the manifest
/// of the stage's model checkpoint (which holds the checksums of the rest).
fn output_files(recipe: &Recipe, stage: &PlannedStage) -> Result<BTreeMap<String, String>> {
    let mut files = Vec::new();
    match (stage.kind, &stage.output) {
        (StageKind::GymData, _) => {
            for entry in std::fs::read_dir(&stage.dir)? {
                let path = entry?.path();
                if path.is_file() && !path.ends_with(STARTED_FILE) {
                    files.push(path);
                }
            }
        }
        (_, Some(output)) => {
            files.push(checkpoint::resolve(output)?.join(checkpoint::MANIFEST_FILE))
        }
        (_, None) => {}
    }
    files
        .into_iter()
        .map(|path| {
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let relative = path.strip_prefix(&recipe.out).unwrap_or(&path);
            Ok((
                relative.display().to_string(),
                checkpoint::sha256_hex(&bytes),
            ))
        })
        .collect()
}

/// How a stage's training ended.
struct Trained {
    interrupted: bool,
    steps: Option<u64>,
    final_val_loss: Option<f64>,
    details: serde_json::Value,
}

fn train_stage(
    recipe: &Recipe,
    stage: &PlannedStage,
    resume: bool,
    args: &PipelineArgs,
) -> Result<Trained> {
    let collective = &args.collective;
    let writer = collective.is_writer();
    // A resumed stage reads the configuration its run stored (a stage may fix values when it
    // starts, such as the reward models' warm-up); the pipeline checked that its own is
    // unchanged (`STARTED_FILE`).
    let given = ConfigSource::Table {
        table: stage.config.clone(),
        name: stage.source(&recipe.path),
    };
    if !resume && writer {
        std::fs::create_dir_all(&stage.dir)
            .with_context(|| format!("cannot create {}", stage.dir.display()))?;
        checkpoint::write_atomic(
            &stage.dir.join(STARTED_FILE),
            toml::to_string(&stage.fingerprint())?.as_bytes(),
        )?;
    }
    let launch = Launch {
        config: (!resume).then(|| given.clone()),
        overrides: Vec::new(),
        init: stage.init.clone(),
        out_dir: stage.dir.clone(),
        resume,
        device: args.device.clone(),
        stop_after: None,
        collective: collective.clone(),
    };
    let supervised = |s: crate::train::supervised::RunSummary| Trained {
        interrupted: s.interrupted,
        steps: Some(s.step),
        final_val_loss: s.final_val_loss,
        details: serde_json::Value::Null,
    };
    Ok(match stage.kind {
        StageKind::GymData => {
            let c: GymDataConfig = config::load_from(Some(&given), &[])?;
            let details = match writer {
                true => {
                    let summary = crate::gym::generate(&stage.dir, c.gym.seed, &c.gym.sizes)?;
                    serde_json::to_value(&summary.files)?
                }
                false => serde_json::Value::Null,
            };
            Trained {
                interrupted: false,
                steps: None,
                final_val_loss: None,
                details,
            }
        }
        StageKind::Pretrain => supervised(pretrain::run(&launch, false)?.run),
        StageKind::Sft => supervised(sft::run(&launch)?),
        StageKind::Gatt => supervised(gatt::run(&launch)?),
        StageKind::Rm => supervised(reward::train(&launch)?),
        StageKind::Rs => {
            let s = rs::run(&launch)?;
            let last = s.rounds.last();
            Trained {
                interrupted: s.interrupted,
                steps: Some(s.rounds.len() as u64),
                final_val_loss: last.and_then(|r| r.final_val_loss),
                details: serde_json::to_value(&s.rounds)?,
            }
        }
        StageKind::Ppo => {
            let s = ppo::run(&launch)?;
            Trained {
                interrupted: s.interrupted,
                steps: Some(s.iterations),
                final_val_loss: None,
                details: serde_json::json!({ "last": s.last, "evals": s.evals }),
            }
        }
        StageKind::Eval => Trained {
            interrupted: false,
            steps: None,
            final_val_loss: None,
            details: serde_json::Value::Null,
        },
    })
}

/// The held-out evaluation of a stage's model.
fn evaluate(recipe: &Recipe, stage: &PlannedStage, device: &ComputeDevice) -> Result<StageEval> {
    let (settings, data) = recipe
        .eval
        .as_ref()
        .ok_or_else(|| anyhow!("{}: [eval] is missing", recipe.path.display()))?;
    let model = match stage.kind {
        StageKind::Eval => stage.init.clone(),
        _ => stage.output.clone(),
    }
    .ok_or_else(|| anyhow!("stage `{}` has no model to evaluate", stage.name))?;
    if stage.kind == StageKind::Rm {
        let rm = score::load(&model, &device.device)?;
        let subset = match rm.config.rm.kind {
            reward::RmKind::Helpfulness => PairSubset::Helpfulness,
            reward::RmKind::Safety => PairSubset::All,
        };
        let input = data.join("pref_heldout.jsonl");
        return Ok(StageEval::RewardModel(score::evaluate_file(
            &rm,
            &input,
            subset,
            settings.limit,
            settings.batch_size,
        )?));
    }
    let sets = EvalSets::read(data, settings.limit)?;
    let (loaded, template) = crate::gym::eval::load_chat_model(&model, None, &device.device)?;
    let options = EvalOptions {
        template,
        batch_size: settings.batch_size,
        max_answer_tokens: settings.max_answer_tokens,
    };
    Ok(StageEval::Gym(crate::gym::eval::evaluate(
        &loaded.model,
        &loaded.tokenizer,
        &sets,
        &options,
    )?))
}

/// How a pipeline run ended.
pub struct PipelineSummary {
    pub interrupted: Option<String>,
    pub table: String,
}

/// `--plan`: the stages, what each reads, and where each stands.
pub fn plan(args: &PipelineArgs) -> Result<String> {
    let recipe = read_recipe(&args.recipe, &args.out)?;
    let states = progress(&recipe)?;
    let mut lines = Vec::new();
    let rerun_at = args
        .rerun_from
        .as_ref()
        .and_then(|n| recipe.stages.iter().position(|s| &s.name == n));
    for (i, (stage, state)) in recipe.stages.iter().zip(&states).enumerate() {
        let reads = if stage.inputs.is_empty() {
            String::new()
        } else {
            format!(" <- {}", stage.inputs.join(", "))
        };
        let status = match state {
            _ if rerun_at.is_some_and(|at| i >= at) && *state != Progress::NotStarted => {
                "rerun (--rerun-from)".to_string()
            }
            Progress::Done(wall_s) => format!("done ({})", duration(*wall_s)),
            Progress::Resumable(from) => format!("resumes from {from}"),
            Progress::Restart => "starts over (interrupted before its first checkpoint)".into(),
            Progress::NotStarted => "to run".into(),
        };
        let eval = if stage.evaluate { " + eval" } else { "" };
        lines.push(format!(
            "{:>2}. {:<14} {:<9}{reads}{eval}: {status}",
            i + 1,
            stage.name,
            stage.kind.name()
        ));
    }
    Ok(lines.join("\n"))
}

pub fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", seconds)
    }
}

/// Runs (or resumes) a recipe. Everything is checked before the first stage starts.
pub fn run(args: &PipelineArgs) -> Result<PipelineSummary> {
    let recipe = read_recipe(&args.recipe, &args.out)?;
    check_out(&recipe, args)?;
    // Data-parallel workers: every one has checked the run before worker 0 changes it, and
    // worker 0 alone writes the pipeline's own files; a barrier after each change.
    let collective = &*args.collective;
    let writer = collective.is_writer();
    collective.barrier()?;
    if writer {
        prepare_out(&recipe, args)?;
    }
    collective.barrier()?;
    let states = progress(&recipe)?;
    let total = recipe.stages.len();
    let say = |line: &str| collective.say(line);
    for (i, (stage, state)) in recipe.stages.iter().zip(states).enumerate() {
        let header = format!("[{}/{total}] {} ({})", i + 1, stage.name, stage.kind.name());
        let resume = match state {
            Progress::Done(_) => {
                say(&format!("{header}: done, skipped"));
                continue;
            }
            Progress::Resumable(from) => {
                say(&format!("{header}: resuming from {from}"));
                true
            }
            Progress::Restart => {
                say(&format!(
                    "{header}: starting over (interrupted before its first checkpoint)"
                ));
                if writer {
                    std::fs::remove_dir_all(&stage.dir)
                        .with_context(|| format!("cannot clear {}", stage.dir.display()))?;
                }
                false
            }
            Progress::NotStarted => {
                say(&header);
                false
            }
        };
        // Ctrl-C during a step that does not check for it (an evaluation, the gym's files)
        // stops the run before the next stage, on every worker.
        if collective
            .any(crate::train::run_dir::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst))?
        {
            return summary(&recipe, Some(&stage.name), writer);
        }
        let started = Instant::now();
        let trained = train_stage(&recipe, stage, resume, args)
            .with_context(|| format!("stage `{}`", stage.name))?;
        if trained.interrupted {
            return summary(&recipe, Some(&stage.name), writer);
        }
        if !writer {
            // Worker 0 evaluates and records the stage; the next stage starts together.
            collective.barrier()?;
            continue;
        }
        let eval_started = Instant::now();
        if stage.evaluate {
            eprintln!("{header}: evaluating on the held-out sets");
            let eval = evaluate(&recipe, stage, &args.device)
                .with_context(|| format!("stage `{}`: evaluation", stage.name))?;
            std::fs::create_dir_all(&stage.dir)?;
            checkpoint::write_atomic(
                &stage.dir.join(EVAL_FILE),
                serde_json::to_string_pretty(&eval)?.as_bytes(),
            )?;
        }
        let record = StageRecord {
            name: stage.name.clone(),
            kind: stage.kind,
            config: toml::to_string(&stage.fingerprint())?,
            outputs: output_files(&recipe, stage)?,
            wall_s: started.elapsed().as_secs_f64(),
            eval_s: eval_started.elapsed().as_secs_f64(),
            steps: trained.steps,
            final_val_loss: trained.final_val_loss,
            details: trained.details,
        };
        std::fs::create_dir_all(&stage.dir)?;
        checkpoint::write_atomic(
            &stage.dir.join(STAGE_FILE),
            serde_json::to_string_pretty(&record)?.as_bytes(),
        )?;
        eprintln!("{header}: done in {}", duration(record.wall_s));
        crate::stages::report::write(&recipe.out)?;
        collective.barrier()?;
    }
    summary(&recipe, None, writer)
}

/// The run's directory before its stages: created, `--rerun-from`'s stages moved aside, the
/// recipe's copy and plan written.
fn prepare_out(recipe: &Recipe, args: &PipelineArgs) -> Result<()> {
    std::fs::create_dir_all(&recipe.out)
        .with_context(|| format!("cannot create {}", recipe.out.display()))?;
    if let Some(name) = &args.rerun_from {
        let at = recipe
            .stages
            .iter()
            .position(|s| &s.name == name)
            .expect("checked");
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = recipe.out.join("replaced").join(stamp.to_string());
        for stage in &recipe.stages[at..] {
            if stage.dir.exists() {
                std::fs::create_dir_all(&aside)?;
                let to = aside.join(&stage.name);
                std::fs::rename(&stage.dir, &to).with_context(|| {
                    format!("cannot move {} to {}", stage.dir.display(), to.display())
                })?;
                eprintln!(
                    "--rerun-from {name}: moved {} to {}",
                    stage.dir.display(),
                    to.display()
                );
            }
        }
    }
    let copy = recipe.out.join(RECIPE_COPY);
    if std::fs::read_to_string(&copy).ok().as_deref() != Some(recipe.text.as_str()) {
        checkpoint::write_atomic(&copy, recipe.text.as_bytes())?;
    }
    let plan: Vec<PlanEntry> = recipe
        .stages
        .iter()
        .map(|s| PlanEntry {
            name: s.name.clone(),
            kind: s.kind,
            inputs: s.inputs.clone(),
            init_stage: s.init_stage.clone(),
            evaluate: s.evaluate,
        })
        .collect();
    checkpoint::write_atomic(
        &recipe.out.join(PLAN_FILE),
        serde_json::to_string_pretty(&plan)?.as_bytes(),
    )?;
    Ok(())
}

/// The table to print, at the end or where the run was interrupted (the report, written
/// after each completed stage, is redrawn then to show where it stopped).
fn summary(recipe: &Recipe, interrupted: Option<&str>, writer: bool) -> Result<PipelineSummary> {
    if !writer {
        return Ok(PipelineSummary {
            interrupted: interrupted.map(String::from),
            table: String::new(),
        });
    }
    if interrupted.is_some() {
        crate::stages::report::write(&recipe.out)?;
    }
    Ok(PipelineSummary {
        interrupted: interrupted.map(String::from),
        table: crate::stages::report::table_text(&recipe.out)?,
    })
}
