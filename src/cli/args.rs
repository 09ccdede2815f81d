//! The command line's clap types: one struct per command's flags, `StageArgs` shared by
//! every training stage.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use kiln::config::Preset;
use kiln::device::DeviceChoice;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train Llama 2 models on any GPU or on the CPU"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The flags every training stage takes.
#[derive(Args, Debug, Clone)]
pub struct StageArgs {
    /// TOML config; fields left out take the stage's defaults (the paper's). On --resume
    /// optional: the run's own config is used, and only the keys `docs/architecture.md` lists
    /// (train.max_steps, intervals, ...) may change.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one config field, e.g. `--set optim.lr=1e-3` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The model to start from (stages after pretraining): a kiln checkpoint or run
    /// directory, a Hugging Face Llama directory, or a GGUF file.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Output directory: checkpoints, metrics.jsonl, config.toml. (An `Option` only so that
    /// `kiln rs curve` parses without it; clap requires it of every stage.)
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Train data-parallel on several devices of this machine, one replica each, gradients
    /// summed on the host: a comma-separated list of `cpu`, `wgpu` (the default adapter),
    /// `wgpu:N` (the N-th GPU) and `cuda:N` (docs/distributed.md).
    #[arg(long, conflicts_with = "device", value_name = "LIST")]
    pub devices: Option<String>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Pretrain a model on text files (next-token prediction).
    Pretrain(#[command(flatten)] StageArgs),
    /// Supervised fine-tuning on chat data, the loss on answers only (Llama 2 sec. 3.1).
    Sft {
        #[command(flatten)]
        stage: StageArgs,
        /// Skip malformed JSONL lines (their count is printed) instead of stopping.
        #[arg(long)]
        skip_bad_lines: bool,
    },
    /// Ghost Attention (Llama 2 sec. 3.3): sample multi-turn answers with the instruction at
    /// every turn, then fine-tune with it only in the first turn.
    Gatt(#[command(flatten)] StageArgs),
    /// Rejection-sampling fine-tuning (Llama 2 sec. 3.2.3): sample K answers per prompt,
    /// keep the best by the combined reward, fine-tune on the pool of every round's best.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Rs {
        #[command(flatten)]
        args: RlhfArgs,
        #[command(subcommand)]
        command: Option<RsCommand>,
    },
    /// PPO (Llama 2 sec. 3.2.3): the policy against the safety-gated, whitened reward with a
    /// per-token KL penalty to the initial policy; a value model from the helpfulness RM.
    Ppo(#[command(flatten)] RlhfArgs),
    /// The whole recipe from one TOML file: its stages in order, each into OUT/<stage>/,
    /// evaluated as the recipe says, resumable stage by stage; OUT/report.md shows what each
    /// stage did.
    Pipeline(PipelineArgs),
    /// Redraw the report of a `kiln pipeline` run (OUT/report.md and OUT/report/*.png).
    Report {
        /// The pipeline's output directory.
        out: PathBuf,
    },
    /// Reward models (Llama 2 sec. 3.2.2): train, score, evaluate.
    Rm {
        #[command(subcommand)]
        command: RmCommand,
    },
    /// The verifiable chat task suite.
    Gym {
        #[command(subcommand)]
        command: GymCommand,
    },
    /// Evaluations.
    Eval {
        #[command(subcommand)]
        command: EvalCommand,
    },
    /// Sample text from a model.
    Generate(GenerateArgs),
    /// Talk to a chat model in the terminal; answers stream as they are generated.
    Chat(ChatArgs),
    /// Convert a model between a kiln checkpoint, a Hugging Face Llama directory and a
    /// llama.cpp GGUF file.
    Convert {
        /// A kiln checkpoint (or run directory), a Hugging Face Llama directory, or a GGUF file.
        input: PathBuf,
        /// The new directory to write (it must not exist yet, or be empty), or for `--to gguf`
        /// the new file.
        #[arg(long)]
        out: PathBuf,
        /// Output format; default: `hf` for a kiln checkpoint, `kiln` for anything else.
        #[arg(long, value_enum)]
        to: Option<kiln::interop::convert::Format>,
        /// Weight type of a GGUF file (llama.cpp's `--outtype`); norms stay F32.
        #[arg(long, value_enum, default_value = "f16")]
        gguf_weights: kiln::interop::gguf_write::GgufWeights,
    },
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        command: TokenizerCommand,
    },
    /// Parameter count and memory estimate of a preset or config.
    Info {
        #[arg(long, value_enum, conflicts_with = "config")]
        preset: Option<Preset>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write loss and learning-rate curves of a run as PNG files.
    Plot {
        /// The run's output directory (holding metrics.jsonl).
        out: PathBuf,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Args, Debug, Clone)]
pub struct PipelineArgs {
    /// The recipe: `[[stage]]` tables in order (configs/quick.toml, configs/gym.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory: one subdirectory per stage, the report.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out: completed stages are checked and skipped, the interrupted
    /// one resumes from its checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Rerun this stage and every stage after it (their earlier runs are moved to
    /// OUT/replaced/).
    #[arg(long, value_name = "STAGE")]
    pub rerun_from: Option<String>,
    /// Print the stages, what each reads and where each stands; run nothing.
    #[arg(long)]
    pub plan: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// A kiln checkpoint (or run directory: its newest checkpoint), a Hugging Face Llama
    /// directory, or a GGUF file.
    #[arg(long, visible_alias = "checkpoint")]
    pub model: PathBuf,
    /// The text to continue (plain text, no chat template; `kiln chat` applies one).
    #[arg(long)]
    pub prompt: String,
    /// Sampling temperature; 0 is greedy decoding (the most likely token every step).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Nucleus sampling: draw from the smallest set of tokens holding this much probability.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    /// Drop tokens less than this times as likely as the most likely one (llama.cpp's
    /// min-p; 0: off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f64,
    /// New tokens at most (fewer if the model's context fills up first).
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// Seed of the sampling generator: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
}

#[derive(Args)]
pub struct ChatArgs {
    /// A kiln checkpoint (or run directory), a Hugging Face Llama directory, or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// System prompt; default: the one the model's chat template inserts, if any.
    #[arg(long)]
    pub system: Option<String>,
    /// Chat template; default: the model's own.
    #[arg(long, value_enum)]
    pub template: Option<kiln::data::chat::ChatTemplate>,
    /// Sampling temperature; 0 is greedy decoding (reproducible answers, as in the README).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Nucleus sampling: draw from the smallest set of tokens holding this much probability.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Drop tokens less than this times as likely as the most likely one (llama.cpp's
    /// min-p; 0: off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f64,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Seed of the sampling generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
}

/// `kiln rs` and `kiln ppo`: the stage flags and the two reward models.
#[derive(Args, Debug, Clone)]
pub struct RlhfArgs {
    #[command(flatten)]
    pub stage: StageArgs,
    /// The helpfulness reward model (a run of `kiln rm train --kind helpfulness`).
    #[arg(long)]
    pub rm_helpful: Option<PathBuf>,
    /// The safety reward model (a run of `kiln rm train --kind safety`).
    #[arg(long)]
    pub rm_safety: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum RsCommand {
    /// Mean max- and median-reward against K at several temperatures (the paper's Figures 7
    /// and 8): a table, `curve.png` and `curve.json`.
    Curve(CurveArgs),
}

#[derive(Args)]
pub struct CurveArgs {
    /// The policy: a kiln checkpoint or run directory, a Hugging Face directory or GGUF.
    #[arg(long)]
    pub policy: PathBuf,
    /// The helpfulness reward model (a run of `kiln rm train --kind helpfulness`).
    #[arg(long)]
    pub rm_helpful: PathBuf,
    /// The safety reward model (a run of `kiln rm train --kind safety`).
    #[arg(long)]
    pub rm_safety: PathBuf,
    /// JSONL prompts (`{"prompt", "safety"}`).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Use the first N prompts (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Answers per prompt to take the max and median over (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    pub k: Vec<usize>,
    /// Sampling temperatures, one curve each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0.6,0.8,1.0,1.2,1.4")]
    pub temperatures: Vec<f64>,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 128)]
    pub max_answer_tokens: usize,
    /// Prompts per generation batch (each with max(K) answers).
    #[arg(long, default_value_t = 4)]
    pub batch_prompts: usize,
    /// Seed of the sampling generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory for curve.png and curve.json (created; existing files are not replaced).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Train data-parallel on several devices of this machine, one replica each, gradients
    /// summed on the host: a comma-separated list of `cpu`, `wgpu` (the default adapter),
    /// `wgpu:N` (the N-th GPU) and `cuda:N` (docs/distributed.md).
    #[arg(long, conflicts_with = "device", value_name = "LIST")]
    pub devices: Option<String>,
}

#[derive(Subcommand)]
pub enum GymCommand {
    /// Write the train and held-out files (SFT, preferences, prompts, evaluation sets).
    Generate {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Directory of the unsafe prompts (JSONL).
        #[arg(long, default_value = "data/gym/donotanswer")]
        unsafe_prompts: PathBuf,
    },
    /// The gold score of answers to gym prompts, by task kind, and refusals: for the answers
    /// rejection sampling sampled or selected (`samples.jsonl`, `pool.jsonl`) or any JSONL
    /// of `{"prompt", "answer"}` lines (a `reward` field is averaged beside the gold score).
    Check {
        #[arg(long)]
        input: PathBuf,
        /// Only lines with `"selected": true` (a pool's trained answers).
        #[arg(long)]
        selected: bool,
        /// Another answers file on the same prompts (e.g. the starting model's): prints the
        /// change from it to --input prompt by prompt, with its paired standard error.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Write every line of --input with the checker's verdict added (`gold_kind`,
        /// `gold_answer`, `exact`, `gold_score`; `refused` for other prompts) to this file.
        #[arg(long, conflicts_with_all = ["baseline", "selected", "json"])]
        annotate: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Preference pairs from a policy's own answers (`kiln rs` samples, `kiln ppo` rollouts,
    /// several per prompt), labelled by the checker: per prompt, its most frequent right
    /// answer over each of its most frequent wrong ones; a refusal over a compliant answer to
    /// an unsafe prompt. For retraining the reward models on the newest policy's answers.
    Pairs {
        /// Answer files (repeat --input for several: a prompt in several files counts once).
        #[arg(long, required = true)]
        input: Vec<PathBuf>,
        /// The pairs (`{"prompt", "chosen", "rejected", "rating", "safety"}` lines).
        #[arg(long)]
        out: PathBuf,
        /// Wrong answers paired per prompt, most frequent first.
        #[arg(long, default_value_t = 2)]
        per_prompt: usize,
    },
}

#[derive(Subcommand)]
pub enum RmCommand {
    /// Train a helpfulness or safety reward model from a chat model.
    Train {
        /// Which reward model (required for a new run; a resumed run keeps its own).
        #[arg(long, value_enum, required_unless_present = "resume")]
        kind: Option<kiln::stages::reward::RmKind>,
        #[command(flatten)]
        stage: StageArgs,
        #[arg(long)]
        skip_bad_lines: bool,
    },
    /// Add `score` and `score_sigmoid` to each `{"prompt", "response"}` line of a JSONL file.
    Score {
        /// A reward model: a kiln checkpoint or run directory of `kiln rm train`.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Accuracy per rating level, mean margin and (safety) unsafe-response flagging on a
    /// preference file.
    Eval {
        /// A reward model: a kiln checkpoint or run directory of `kiln rm train`.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
        /// Which pairs of the file: `all`, `helpfulness` (safety false) or `safety`.
        #[arg(long, value_enum, default_value = "all")]
        pairs: kiln::infer::score::PairSubset,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
}

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Task accuracy, refusal rates and instruction compliance per turn on the gym's held-out
    /// sets (greedy decoding).
    Gym {
        /// A kiln checkpoint or run directory, a Hugging Face Llama directory, or a GGUF file.
        #[arg(long, visible_alias = "model")]
        checkpoint: PathBuf,
        /// The directory `kiln gym generate` wrote.
        #[arg(long, default_value = "runs/gym/data")]
        data: PathBuf,
        /// Chat template; default: the model's own (a kiln checkpoint's fine-tuning template).
        #[arg(long, value_enum)]
        template: Option<kiln::data::chat::ChatTemplate>,
        /// Use at most this many items of each held-out set (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
}

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE (digits split, Llama 2 chat tokens registered).
    Train {
        /// Text files or directories of `*.txt` files.
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        #[arg(long)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training steps per second of a preset on random tokens; prints one JSON line.
    Train {
        #[arg(long, value_enum)]
        preset: Preset,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceChoice,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// `custom` (WGSL kernels, wgpu only) or `reference` (plain Burn ops).
        #[arg(long, value_enum, default_value = "custom")]
        kernels: kiln::kernels::Kernels,
    },
    /// Generation tokens/s of a model with the KV cache, per batch size; one JSON line each.
    Generate {
        /// A kiln checkpoint, a Hugging Face Llama directory or a GGUF file.
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceChoice,
        /// Batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batch: Vec<usize>,
        #[arg(long, default_value_t = 64)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        #[arg(long, value_enum, default_value = "custom")]
        kernels: kiln::kernels::Kernels,
    },
    /// Reward-model scoring of K answers per prompt: the prompt run once into a shared KV
    /// cache against full right-padded rows (answers/s, one JSON line).
    Score {
        #[arg(long, value_enum)]
        preset: Preset,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceChoice,
        #[arg(long, default_value_t = 8)]
        prompts: usize,
        #[arg(long, default_value_t = 8)]
        k: usize,
        #[arg(long, default_value_t = 64)]
        prompt_tokens: usize,
        /// Answers have 1 to this many tokens.
        #[arg(long, default_value_t = 32)]
        answer_tokens: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// PPO iterations on random-weight models (policy, reference, value model, one reward
    /// model, as TRL's PPO has): seconds per iteration, prompts/s and the split (one JSON line).
    Ppo {
        /// `tiny` is the gym model's shape; `smollm2-135m` SmolLM2-135M's.
        #[arg(long, value_enum)]
        preset: Preset,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceChoice,
        /// Prompts per iteration.
        #[arg(long, default_value_t = 64)]
        rollout: usize,
        #[arg(long, default_value_t = 16)]
        mini_batch: usize,
        #[arg(long, default_value_t = 32)]
        prompt_tokens: usize,
        /// Every answer has exactly this many tokens.
        #[arg(long, default_value_t = 32)]
        answer_tokens: usize,
        /// Timed iterations (the median is reported).
        #[arg(long, default_value_t = 5)]
        iterations: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
    /// The custom WGSL kernels against the reference ops, forward + backward, side by side.
    Kernels {
        #[arg(long, value_enum, default_value = "wgpu")]
        device: DeviceChoice,
        /// Timed runs per kernel and variant; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Small shapes (a smoke test), not the benchmark shapes.
        #[arg(long)]
        quick: bool,
        /// One JSON object per kernel and shape instead of a table.
        #[arg(long)]
        json: bool,
        /// Only these kernels (e.g. `--kernel rms_norm --kernel swiglu`); default: all.
        #[arg(long = "kernel", value_parser = clap::builder::PossibleValuesParser::new(kiln::bench::KERNEL_NAMES))]
        kernels: Vec<String>,
    },
}
