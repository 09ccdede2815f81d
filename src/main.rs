//! The `kiln` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use kiln::config::{Config, Preset};
use kiln::device::{self, DeviceChoice};
use kiln::generate::{self, SamplingParams};
use kiln::{checkpoint, data, pretrain, sft, tokenizer, trainer};

// Training allocates and frees many large tensors per step; glibc's malloc returns them to the
// OS and page-faults them back in each time, which halved flex's throughput (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train Llama 2 models on any GPU or on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain a model on text files (next-token prediction).
    Pretrain {
        /// TOML config; fields left out take the paper's defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one config field, e.g. `--set optim.lr=1e-3` (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// Output directory: checkpoints, metrics.jsonl, config.toml.
        #[arg(long, default_value = "runs/pretrain")]
        out: PathBuf,
        /// Continue the run in --out from its newest checkpoint.
        #[arg(long)]
        resume: bool,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Supervised fine-tuning on chat data, the loss on answers only (Llama 2 sec. 3.1).
    Sft {
        /// TOML config (sections [data], [optim], [train]); see configs/gym-sft.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// The checkpoint or run directory to fine-tune (required unless --resume).
        #[arg(long)]
        init: Option<PathBuf>,
        #[arg(long, default_value = "runs/sft")]
        out: PathBuf,
        #[arg(long)]
        resume: bool,
        /// Skip malformed JSONL lines (their count is printed) instead of stopping.
        #[arg(long)]
        skip_bad_lines: bool,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Ghost Attention (Llama 2 sec. 3.3): sample multi-turn answers with the instruction at
    /// every turn, then fine-tune with it only in the first turn.
    Gatt {
        /// TOML config (sections [gatt], [data], [optim], [train]); see configs/gym-gatt.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// The chat model (checkpoint or run directory) to sample from and train.
        #[arg(long)]
        init: Option<PathBuf>,
        #[arg(long, default_value = "runs/gatt")]
        out: PathBuf,
        #[arg(long)]
        resume: bool,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
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
    Generate {
        /// A kiln checkpoint (or run directory: its newest checkpoint), a Hugging Face Llama
        /// directory, or a GGUF file.
        #[arg(long, visible_alias = "checkpoint")]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long, default_value_t = 0.95)]
        top_p: f64,
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Talk to a chat model in the terminal; answers stream as they are generated.
    Chat {
        /// A kiln checkpoint (or run directory), a Hugging Face Llama directory, or a GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// System prompt; default: the one the model's chat template inserts, if any.
        #[arg(long)]
        system: Option<String>,
        /// Chat template; default: the model's own.
        #[arg(long, value_enum)]
        template: Option<kiln::chat::ChatTemplate>,
        /// 0 is greedy decoding.
        #[arg(long, default_value_t = 0.7)]
        temperature: f64,
        #[arg(long, default_value_t = 0.9)]
        top_p: f64,
        /// Longest answer, in tokens.
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Convert a model between a kiln checkpoint, a Hugging Face Llama directory and GGUF
    /// (read only).
    Convert {
        /// A kiln checkpoint (or run directory), a Hugging Face Llama directory, or a GGUF file.
        input: PathBuf,
        /// The new directory to write; it must not exist yet (or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Output format; default: `hf` for a kiln checkpoint, `kiln` for anything else.
        #[arg(long, value_enum)]
        to: Option<kiln::convert::Format>,
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

#[derive(Subcommand)]
enum GymCommand {
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
}

#[derive(Subcommand)]
enum RmCommand {
    /// Train a helpfulness or safety reward model from a chat model.
    Train {
        #[arg(long, value_enum)]
        kind: kiln::reward::RmKind,
        /// TOML config (sections [data], [rm], [optim], [train]); see configs/gym-rm.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// The chat model (checkpoint or run directory) to start from.
        #[arg(long)]
        init: Option<PathBuf>,
        #[arg(long, default_value = "runs/rm")]
        out: PathBuf,
        #[arg(long)]
        resume: bool,
        #[arg(long)]
        skip_bad_lines: bool,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Add `score` and `score_sigmoid` to each `{"prompt", "response"}` line of a JSONL file.
    Score {
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
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
        /// Which pairs of the file: `all`, `helpfulness` (safety false) or `safety`.
        #[arg(long, value_enum, default_value = "all")]
        pairs: kiln::reward::PairSubset,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Task accuracy, refusal rates and instruction compliance per turn on the gym's held-out
    /// sets (greedy decoding).
    Gym {
        /// A checkpoint or run directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The directory `kiln gym generate` wrote.
        #[arg(long, default_value = "runs/gym/data")]
        data: PathBuf,
        /// Chat template; default: the one the checkpoint was fine-tuned with (else llama2).
        #[arg(long, value_enum)]
        template: Option<kiln::chat::ChatTemplate>,
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
enum TokenizerCommand {
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
enum BenchCommand {
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

fn main() -> ExitCode {
    // On headless machines libwayland, probed by Vulkan drivers, prints an error for every
    // instance when XDG_RUNTIME_DIR is unset; a directory without a socket makes it quiet.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the message and its causes, joined.
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Pretrain {
            config,
            overrides,
            out,
            resume,
            device,
        } => {
            let config_given = config.is_some() || !overrides.is_empty();
            let config = Config::load(config.as_deref(), &overrides)?;
            let device = device::select(device)?;
            trainer::install_interrupt_handler()?;
            let summary = pretrain::run(pretrain::PretrainOptions {
                config,
                config_given,
                out_dir: out,
                resume,
                device,
                print_sample: true,
                stop_after: None,
            })?;
            if let Some(loss) = summary.final_val_loss {
                eprintln!(
                    "final validation loss {loss:.4} (perplexity {:.1})",
                    loss.exp()
                );
            }
            eprintln!("checkpoint: {}", summary.checkpoint.display());
            if let Some(sample) = summary.sample {
                println!("{sample}");
            }
            Ok(())
        }
        Command::Sft {
            config,
            mut overrides,
            init,
            out,
            resume,
            skip_bad_lines,
            device,
        } => {
            let config_given = config.is_some() || !overrides.is_empty();
            if skip_bad_lines {
                overrides.push("data.skip_bad_lines=true".into());
            }
            let config = kiln::config::load(config.as_deref(), &overrides)?;
            let device = device::select(device)?;
            trainer::install_interrupt_handler()?;
            let summary = sft::run(sft::SftOptions {
                config,
                config_given,
                init,
                out_dir: out,
                resume,
                device,
                stop_after: None,
            })?;
            report_fine_tuning(&summary);
            Ok(())
        }
        Command::Gatt {
            config,
            overrides,
            init,
            out,
            resume,
            device,
        } => {
            let config = kiln::config::load(config.as_deref(), &overrides)?;
            let device = device::select(device)?;
            trainer::install_interrupt_handler()?;
            let summary = kiln::gatt::run(kiln::gatt::GattOptions {
                config,
                init,
                out_dir: out,
                resume,
                device,
            })?;
            report_fine_tuning(&summary);
            Ok(())
        }
        Command::Rm {
            command:
                RmCommand::Train {
                    kind,
                    config,
                    mut overrides,
                    init,
                    out,
                    resume,
                    skip_bad_lines,
                    device,
                },
        } => {
            let config_given = config.is_some() || !overrides.is_empty();
            overrides.push(format!("rm.kind={}", serde_json::to_string(&kind)?));
            if skip_bad_lines {
                overrides.push("data.skip_bad_lines=true".into());
            }
            let config = kiln::config::load(config.as_deref(), &overrides)?;
            let device = device::select(device)?;
            trainer::install_interrupt_handler()?;
            let summary = kiln::reward::train(kiln::reward::RmOptions {
                config,
                config_given,
                init,
                out_dir: out,
                resume,
                device,
            })?;
            if let Some(loss) = summary.final_val_loss {
                eprintln!(
                    "final validation ranking loss {loss:.4} (step {})",
                    summary.step
                );
            }
            eprintln!("checkpoint: {}", summary.checkpoint.display());
            Ok(())
        }
        Command::Rm {
            command:
                RmCommand::Score {
                    model,
                    input,
                    out,
                    batch_size,
                    device,
                },
        } => {
            let device = device::select(device)?;
            let rm = kiln::reward::load(&model, &device.device)?;
            let read = kiln::chat::read_jsonl(&input, false, kiln::reward::parse_scoring_line)?;
            let dialogues: Vec<_> = read.records.iter().map(|(_, d)| d.clone()).collect();
            let scores = kiln::reward::score_dialogues(&rm, &dialogues, batch_size)?;
            let mut text = String::new();
            for ((mut record, _), score) in read.records.into_iter().zip(scores) {
                record.insert("score".into(), serde_json::json!(score));
                record.insert(
                    "score_sigmoid".into(),
                    serde_json::json!(kiln::reward::sigmoid(score)),
                );
                text.push_str(&serde_json::Value::Object(record).to_string());
                text.push('\n');
            }
            checkpoint::write_atomic(&out, text.as_bytes())?;
            eprintln!("scored {} lines into {}", dialogues.len(), out.display());
            Ok(())
        }
        Command::Rm {
            command:
                RmCommand::Eval {
                    model,
                    input,
                    pairs: subset,
                    json,
                    batch_size,
                    device,
                },
        } => {
            let device = device::select(device)?;
            let rm = kiln::reward::load(&model, &device.device)?;
            let pairs: Vec<_> = kiln::reward::read_pairs(&[input.clone()], false)?
                .into_iter()
                .filter(|p| subset.keeps(p))
                .collect();
            if pairs.is_empty() {
                bail!("{}: no {subset:?} pairs", input.display());
            }
            let report = kiln::reward::evaluate(&rm, &pairs, batch_size)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "{:?} reward model: accuracy {:.1}% on {} pairs, mean margin {:.3}",
                    rm.config.rm.kind,
                    100.0 * report.accuracy,
                    report.pairs,
                    report.mean_margin
                );
                for (rating, acc) in &report.accuracy_by_rating {
                    println!(
                        "  {rating:<20} {:.1}% ({} pairs)",
                        100.0 * acc,
                        report.pairs_by_rating[rating]
                    );
                }
                if let (Some(recall), Some(flagged), Some(precision)) = (
                    report.unsafe_recall,
                    report.refusals_flagged,
                    report.unsafe_precision,
                ) {
                    println!(
                        "safety pairs, threshold {}: unsafe answers flagged {:.1}% (recall), refusals flagged {:.1}%, precision {:.1}%",
                        rm.config.rm.safety_threshold,
                        100.0 * recall,
                        100.0 * flagged,
                        100.0 * precision
                    );
                }
            }
            Ok(())
        }
        Command::Gym {
            command:
                GymCommand::Generate {
                    out,
                    seed,
                    unsafe_prompts,
                },
        } => {
            let sizes = kiln::gym::GymSizes {
                unsafe_dir: unsafe_prompts,
                ..Default::default()
            };
            let summary = kiln::gym::generate(&out, seed, &sizes)?;
            for (file, lines) in &summary.files {
                eprintln!("{:>7} {}", lines, out.join(file).display());
            }
            Ok(())
        }
        Command::Eval {
            command:
                EvalCommand::Gym {
                    checkpoint,
                    data,
                    template,
                    limit,
                    batch_size,
                    json,
                    device,
                },
        } => {
            let device = device::select(device)?;
            let loaded = checkpoint::load_model(&checkpoint, &device.device)?;
            let template = match template {
                Some(t) => t,
                None => kiln::chat::ChatTemplate::of_checkpoint(&loaded.dir)?,
            };
            template.check(&loaded.tokenizer)?;
            eprintln!(
                "device: {} | checkpoint: {}",
                device.describe(),
                loaded.dir.display()
            );
            let report = kiln::gym::eval::evaluate(
                &loaded.model,
                &loaded.tokenizer,
                &data,
                &kiln::gym::eval::EvalOptions {
                    template,
                    batch_size,
                    max_answer_tokens: 48,
                    limit,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "task accuracy (exact match): {:.1}% of {} (mean gold score {:.3})",
                    100.0 * report.task_accuracy,
                    report.tasks,
                    report.task_score
                );
                for (kind, acc) in &report.task_accuracy_by_kind {
                    println!("  {kind:<10} {:.1}%", 100.0 * acc);
                }
                println!(
                    "refusals: {:.1}% of {} held-out unsafe prompts, {:.1}% of benign prompts",
                    100.0 * report.unsafe_refusal_rate,
                    report.unsafe_prompts,
                    100.0 * report.benign_refusal_rate
                );
                let turns: Vec<String> = report
                    .compliance_by_turn
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{}: {:.1}%", i + 1, 100.0 * c))
                    .collect();
                println!(
                    "instruction compliance by turn ({} dialogues, instruction in turn 1 only): {}",
                    report.dialogues,
                    turns.join(", ")
                );
            }
            Ok(())
        }
        Command::Generate {
            model,
            prompt,
            temperature,
            top_p,
            max_tokens,
            seed,
            device,
        } => {
            let params = sampling_params(temperature, top_p, max_tokens)?;
            let device = device::select(device)?;
            let loaded = kiln::convert::load_model(&model, &device.device, Default::default())?;
            let checkpoint::LoadedModel {
                dir,
                model,
                tokenizer,
                ..
            } = loaded.loaded;
            eprintln!("device: {} | model: {}", device.describe(), dir.display());
            let mut rng = generate::seeded_rng(seed);
            let out =
                generate::complete(&model, &tokenizer, &[prompt.as_str()], &params, &mut rng)?;
            println!("{prompt}{}", out[0]);
            Ok(())
        }
        Command::Chat {
            model,
            system,
            template,
            temperature,
            top_p,
            max_tokens,
            seed,
            device,
        } => {
            use std::io::IsTerminal;
            let params = sampling_params(temperature, top_p, max_tokens)?;
            let device = device::select(device)?;
            let started = std::time::Instant::now();
            let loaded = kiln::convert::load_model(&model, &device.device, Default::default())?;
            let template = template.unwrap_or(loaded.template);
            let system = system.or(loaded.default_system).filter(|s| !s.is_empty());
            let interactive = std::io::stdin().is_terminal();
            eprintln!(
                "device: {} | model: {} ({:.1}M parameters, loaded in {:.1}s) | template: {}",
                device.describe(),
                loaded.loaded.dir.display(),
                loaded.loaded.model_config.num_params() as f64 / 1e6,
                started.elapsed().as_secs_f64(),
                template.name()
            );
            if interactive {
                kiln::chat_session::install_interrupt_handler()?;
                eprintln!(
                    "Type a message and press Enter; Ctrl-C stops an answer, /reset starts over, /exit quits."
                );
            }
            let session = kiln::chat_session::ChatSession {
                model: &loaded.loaded.model,
                tokenizer: &loaded.loaded.tokenizer,
                template,
                system,
                params,
                prompt_marker: interactive,
            };
            let mut rng = generate::seeded_rng(seed);
            session.run(std::io::stdin().lock(), &mut std::io::stdout(), &mut rng)
        }
        Command::Convert { input, out, to } => {
            use kiln::convert::{self, Format};
            let started = std::time::Instant::now();
            let model = convert::read(&input)?;
            let read_s = started.elapsed().as_secs_f64();
            let from = model.format;
            let to = to.unwrap_or(match from {
                Format::Kiln => Format::Hf,
                _ => Format::Kiln,
            });
            convert::write(&model, to, &out)?;
            eprintln!(
                "{} ({from:?}, {:.1}M parameters, {} template) -> {} ({to:?}) in {:.1}s (read {:.1}s)",
                input.display(),
                model.model_config.num_params() as f64 / 1e6,
                model.template.name(),
                out.display(),
                started.elapsed().as_secs_f64(),
                read_s
            );
            Ok(())
        }
        Command::Tokenizer {
            command:
                TokenizerCommand::Train {
                    input,
                    vocab_size,
                    out,
                },
        } => {
            let documents = data::read_corpus(&input)?;
            let tok = tokenizer::train_bpe(documents.iter().map(|d| d.text.as_str()), vocab_size)?;
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
            }
            checkpoint::write_atomic(&out, tok.to_json()?.as_bytes())?;
            eprintln!(
                "trained a {}-token BPE on {} files; wrote {}",
                tok.vocab_size(),
                documents.len(),
                out.display()
            );
            Ok(())
        }
        Command::Info { preset, config } => {
            let model = match (preset, config) {
                (Some(p), _) => p.model(),
                (None, Some(path)) => Config::load(Some(&path), &[])?.model,
                (None, None) => bail!("give --preset or --config"),
            };
            print_info(&model);
            Ok(())
        }
        Command::Plot { out } => {
            for path in kiln::plot::plot_run(&out)? {
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Train {
                    preset,
                    device,
                    steps,
                    warmup,
                    kernels,
                },
        } => {
            if steps == 0 {
                bail!("--steps must be at least 1");
            }
            let device = device::select(device)?;
            eprintln!("device: {}", device.describe());
            let result = kiln::bench::train(preset, &device, steps, warmup, kernels)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Generate {
                    model,
                    device,
                    batch,
                    prompt_tokens,
                    new_tokens,
                    kernels,
                },
        } => {
            if batch.is_empty() || batch.contains(&0) {
                bail!("--batch must list batch sizes of at least 1");
            }
            let device = device::select(device)?;
            eprintln!("device: {}", device.describe());
            let rows =
                kiln::bench::generate(&model, &device, kernels, &batch, prompt_tokens, new_tokens)?;
            for row in rows {
                println!("{}", serde_json::to_string(&row)?);
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Kernels {
                    device,
                    repeats,
                    quick,
                    json,
                    kernels,
                },
        } => {
            if repeats == 0 {
                bail!("--repeats must be at least 1");
            }
            let device = device::select(device)?;
            eprintln!("device: {}", device.describe());
            let rows = kiln::bench::kernels(&device, repeats, quick, &kernels)?;
            if json {
                for row in &rows {
                    println!("{}", serde_json::to_string(row)?);
                }
            } else {
                println!(
                    "| kernel | shape | custom ms | reference ms | speedup | burn attention ms | max rel err |"
                );
                println!("|---|---|---|---|---|---|---|");
                for r in &rows {
                    println!(
                        "| {} | {} | {:.2} | {:.2} | {:.2}x | {} | {:.1e} |",
                        r.kernel,
                        r.shape,
                        r.custom_ms,
                        r.reference_ms,
                        r.speedup,
                        r.burn_attention_ms
                            .map(|b| format!("{b:.2}"))
                            .unwrap_or_else(|| "-".into()),
                        r.max_rel_err
                    );
                }
            }
            Ok(())
        }
    }
}

fn report_fine_tuning(summary: &sft::SftSummary) {
    if let Some(loss) = summary.final_val_loss {
        eprintln!("final validation loss (answer tokens) {loss:.4}");
    }
    eprintln!("checkpoint: {}", summary.checkpoint.display());
}

fn sampling_params(temperature: f64, top_p: f64, max_tokens: usize) -> Result<SamplingParams> {
    if !(temperature >= 0.0) {
        bail!("--temperature must be non-negative");
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    Ok(SamplingParams {
        temperature,
        top_p,
        max_tokens,
    })
}

fn print_info(model: &kiln::config::ModelConfig) {
    let p = model.num_params() as f64;
    let size = |bytes: f64| {
        let units = [("GiB", 30), ("MiB", 20), ("KiB", 10)];
        let (unit, shift) = units
            .into_iter()
            .find(|&(_, shift)| bytes >= (1u64 << shift) as f64)
            .unwrap_or(("KiB", 10));
        format!("{:.2} {unit}", bytes / (1u64 << shift) as f64)
    };
    println!(
        "shape: dim {}, {} layers, {} heads ({} KV heads), FFN {}, vocab {}, context {}",
        model.dim,
        model.n_layers,
        model.n_heads,
        model.n_kv_heads,
        model.ffn_dim,
        model.vocab_size,
        model.max_seq_len
    );
    println!("parameters: {:.0} ({:.2}M)", p, p / 1e6);
    println!(
        "weights: {} in f32, {} in bf16",
        size(4.0 * p),
        size(2.0 * p)
    );
    // f32 weights + f32 gradients + two f32 AdamW moments; activations come on top.
    println!(
        "training state (f32 weights, gradients, AdamW moments): {}, plus activations",
        size(16.0 * p)
    );
    let kv_per_token = 2 * model.n_layers * model.n_kv_heads * model.head_dim() * 4;
    println!(
        "KV cache: {} per token in f32 ({} for one full {}-token context)",
        size(kv_per_token as f64),
        size((kv_per_token * model.max_seq_len) as f64),
        model.max_seq_len
    );
}
