//! The `kiln` command line: parses, dispatches to `cli/`, and prints errors on one line.

mod cli;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use cli::args::{Cli, Command, EvalCommand, GymCommand, RmCommand, RsCommand, TokenizerCommand};
use cli::{models, tools, train};

// Training allocates and frees many large tensors per step; glibc's malloc returns them to the
// OS and page-faults them back in each time, which halved flex's throughput (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (index 15 of `mi_option_e` in mimalloc v2 and v3; the
/// -sys crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // mimalloc returns freed memory to the OS 10 ms after it is freed, and the next step's
    // tensors page-fault it back in, zeroed by the kernel: 20% of a CPU training step went to
    // clearing pages (perf, bench-5m). A training process reuses the same sizes every step, so
    // it keeps its freed memory instead (docs/benchmarks.md).
    // SAFETY: sets a plain integer option; mimalloc reads it at its next purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
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
        Command::Pretrain(stage) => train::pretrain(stage),
        Command::Sft {
            stage,
            skip_bad_lines,
        } => train::sft(stage, skip_bad_lines),
        Command::Gatt(stage) => train::gatt(stage),
        Command::Rs { args, command } => match command {
            None => train::rs(args),
            Some(RsCommand::Curve(args)) => models::rs_curve(args),
        },
        Command::Ppo(args) => train::ppo(args),
        Command::Pipeline(args) => train::pipeline(args),
        Command::Report { out } => tools::report(&out),
        Command::Rm { command } => match command {
            RmCommand::Train {
                kind,
                stage,
                skip_bad_lines,
            } => train::rm_train(kind, stage, skip_bad_lines),
            RmCommand::Score {
                model,
                input,
                out,
                batch_size,
                device,
            } => models::rm_score(&model, &input, &out, batch_size, device),
            RmCommand::Eval {
                model,
                input,
                pairs,
                json,
                batch_size,
                device,
            } => models::rm_eval(&model, &input, pairs, json, batch_size, device),
        },
        Command::Gym { command } => match command {
            GymCommand::Generate {
                out,
                seed,
                unsafe_prompts,
            } => tools::gym_generate(&out, seed, unsafe_prompts),
            GymCommand::Check {
                input,
                annotate: Some(out),
                ..
            } => tools::gym_annotate(&input, &out),
            GymCommand::Check {
                input,
                selected,
                baseline: None,
                json,
                ..
            } => tools::gym_check(&input, selected, json),
            GymCommand::Check {
                input,
                selected,
                baseline: Some(baseline),
                json,
                ..
            } => tools::gym_compare(&baseline, &input, selected, json),
            GymCommand::Pairs {
                input,
                out,
                per_prompt,
            } => tools::gym_pairs(&input, &out, per_prompt),
        },
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
        } => models::eval_gym(
            &checkpoint,
            &data,
            template,
            limit,
            batch_size,
            json,
            device,
        ),
        Command::Generate(args) => models::generate(args),
        Command::Chat(args) => models::chat(args),
        Command::Convert {
            input,
            out,
            to,
            gguf_weights,
        } => models::convert(&input, &out, to, gguf_weights),
        Command::Tokenizer {
            command:
                TokenizerCommand::Train {
                    input,
                    vocab_size,
                    out,
                },
        } => tools::tokenizer_train(&input, vocab_size, &out),
        Command::Info { preset, config } => tools::info(preset, config),
        Command::Plot { out } => tools::plot(&out),
        Command::Bench { command } => tools::bench(command),
    }
}
