//! The training commands: `pretrain`, `sft`, `gatt`, `rm train`, `rs`, `ppo`. Each turns its flags into a
//! [`Launch`] and hands it to its stage.

use std::sync::Arc;

use anyhow::{Result, bail};

use kiln::device::{self, ComputeDevice};
use kiln::stages::{gatt, ppo, pretrain, reward, rs, sft};
use kiln::train::collective::{self, Collective, InProcess};
use kiln::train::run_dir;
use kiln::train::stage::Launch;
use kiln::train::supervised::RunSummary;

use super::args::{PipelineArgs, RlhfArgs, StageArgs};

/// A stage's launch from its flags, and the devices of an in-process data-parallel run.
struct Workers {
    launch: Launch,
    /// `--devices`: one worker (thread) per device; empty for one device.
    devices: Vec<ComputeDevice>,
}

/// The launch of a stage from its flags; `extra` overrides come after the user's. Under an
/// MPI launcher this process joins the job as one rank.
fn launch(args: StageArgs, extra: &[String]) -> Result<Workers> {
    let devices = match &args.devices {
        Some(list) => device::parse_list(list)?,
        None => Vec::new(),
    };
    let collective = collective::from_launcher()?;
    let device = match devices.first() {
        Some(first) => first.clone(),
        None => device::select_for_this_rank(args.device)?,
    };
    run_dir::install_interrupt_handler()?;
    let mut overrides = args.overrides;
    overrides.extend_from_slice(extra);
    if collective.world_size() > 1 && devices.len() > 1 {
        bail!(
            "--devices takes several devices in one process; under mpirun give each rank one --device"
        );
    }
    Ok(Workers {
        launch: Launch {
            config: args.config.map(kiln::config::ConfigSource::File),
            overrides,
            init: args.init,
            out_dir: args
                .out
                .ok_or_else(|| anyhow::anyhow!("--out is required: the run's output directory"))?,
            resume: args.resume,
            device,
            stop_after: None,
            collective,
        },
        devices,
    })
}

impl Workers {
    /// Runs `stage` on every worker and returns worker 0's result (the one that wrote the
    /// run) for this process to report, `None` in an MPI rank other than 0. With `--devices`,
    /// one thread per device, summing gradients on the host (on CUDA devices: through NCCL).
    fn run<T: Send>(&self, stage: impl Fn(&Launch) -> Result<T> + Sync) -> Result<Option<T>> {
        if self.devices.len() <= 1 {
            let result = in_out(&self.launch, stage)?;
            return Ok(self.launch.collective.is_writer().then_some(result));
        }
        let group = InProcess::group_on(&self.devices);
        eprintln!(
            "devices: {} ({})",
            self.devices
                .iter()
                .map(|d| d.describe())
                .collect::<Vec<_>>()
                .join(", "),
            group[0].describe()
        );
        // CPU workers split the machine's threads: each runs in its own rayon pool, which
        // burn's CPU backend then uses, instead of all contending for the global one.
        let cpu_workers = self.devices.iter().filter(|d| d.backend == "flex").count();
        let threads = (rayon::current_num_threads() / cpu_workers.max(1)).max(1);
        in_out(&self.launch, |launch| {
            let results: Vec<Result<T>> = std::thread::scope(|scope| {
                let handles: Vec<_> = group
                    .into_iter()
                    .zip(&self.devices)
                    .map(|(worker, device)| {
                        let mut launch = launch.clone();
                        launch.device = device.clone();
                        launch.collective = Arc::new(worker);
                        let stage = &stage;
                        scope.spawn(move || match launch.device.backend {
                            "flex" => rayon::ThreadPoolBuilder::new()
                                .num_threads(threads)
                                .build()
                                .map_err(|e| anyhow::anyhow!("cannot start a CPU worker: {e}"))?
                                .install(|| stage(&launch)),
                            #[cfg(feature = "cuda")]
                            "cuda" => {
                                kiln::train::step::check_nccl(
                                    &*launch.collective,
                                    &launch.device.device,
                                )?;
                                stage(&launch)
                            }
                            _ => stage(&launch),
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))
                    })
                    .collect()
            });
            // The first worker's own failure, not the others' "worker N stopped".
            let mut results = results.into_iter();
            let first = results.next().expect("two workers or more");
            match first {
                Ok(value) => {
                    results.collect::<Result<Vec<T>>>()?;
                    Ok(Some(value))
                }
                Err(e) if e.to_string().contains(collective::STOPPED) => {
                    Err(results.filter_map(Result::err).next().unwrap_or(e))
                }
                Err(e) => Err(e),
            }
        })
    }
}

/// Runs a stage; if it fails and leaves behind an empty `--out` that did not exist before (it
/// failed on its inputs after the directory was checked and made), removes that directory.
fn in_out<T>(launch: &Launch, run: impl FnOnce(&Launch) -> Result<T>) -> Result<T> {
    let out = &launch.out_dir;
    let existed = out.exists();
    let result = run(launch);
    let empty = || std::fs::read_dir(out).is_ok_and(|mut entries| entries.next().is_none());
    if result.is_err() && !existed && empty() && launch.collective.is_writer() {
        let _ = std::fs::remove_dir(out);
    }
    result
}

fn skip_bad_lines(on: bool) -> Vec<String> {
    if on {
        vec!["data.skip_bad_lines=true".into()]
    } else {
        Vec::new()
    }
}

pub fn pretrain(args: StageArgs) -> Result<()> {
    let Some(summary) = launch(args, &[])?.run(|l| pretrain::run(l, true))? else {
        return Ok(());
    };
    report(&summary.run, "validation loss", true);
    if let Some(sample) = summary.sample {
        println!("{sample}");
    }
    Ok(())
}

pub fn sft(args: StageArgs, skip_bad: bool) -> Result<()> {
    if let Some(summary) = launch(args, &skip_bad_lines(skip_bad))?.run(sft::run)? {
        report_fine_tuning(&summary);
    }
    Ok(())
}

pub fn gatt(args: StageArgs) -> Result<()> {
    if let Some(summary) = launch(args, &[])?.run(gatt::run)? {
        report_fine_tuning(&summary);
    }
    Ok(())
}

pub fn rm_train(kind: Option<reward::RmKind>, args: StageArgs, skip_bad: bool) -> Result<()> {
    let mut extra = skip_bad_lines(skip_bad);
    if let Some(kind) = kind {
        extra.push(format!("rm.kind={}", serde_json::to_string(&kind)?));
    }
    if let Some(summary) = launch(args, &extra)?.run(reward::train)? {
        report(&summary, "validation ranking loss", false);
    }
    Ok(())
}

fn report_fine_tuning(summary: &RunSummary) {
    report(summary, "validation loss (answer tokens)", false);
}

/// The run's last validation loss and checkpoint. An interrupted run says how old its last
/// evaluation is rather than calling it final.
fn report(summary: &RunSummary, what: &str, perplexity: bool) {
    if let Some(loss) = summary.final_val_loss {
        let perplexity = if perplexity {
            format!(" (perplexity {:.1})", loss.exp())
        } else {
            String::new()
        };
        if summary.val_step == summary.step {
            eprintln!("final {what} {loss:.4}{perplexity} (step {})", summary.step);
        } else {
            eprintln!(
                "last {what} {loss:.4}{perplexity}, measured at step {}; the run stopped at step {}",
                summary.val_step, summary.step
            );
        }
    }
    eprintln!("checkpoint: {}", summary.checkpoint.display());
}

/// `section.rm_helpful` and `section.rm_safety` overrides from the flags.
fn reward_model_overrides(args: &RlhfArgs, section: &str) -> Vec<String> {
    let mut extra = Vec::new();
    for (key, path) in [
        ("rm_helpful", &args.rm_helpful),
        ("rm_safety", &args.rm_safety),
    ] {
        if let Some(path) = path {
            let value = toml::Value::String(path.display().to_string());
            extra.push(format!("{section}.{key}={value}"));
        }
    }
    extra
}

pub fn rs(args: RlhfArgs) -> Result<()> {
    let extra = reward_model_overrides(&args, "rs");
    let Some(summary) = launch(args.stage, &extra)?.run(rs::run)? else {
        return Ok(());
    };
    if summary.interrupted {
        eprintln!("interrupted: continue with --resume");
    }
    if !summary.rounds.is_empty() {
        println!(
            "{:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9} {:>9}",
            "round", "mean", "median", "max", "selected", "pool", "safety", "samples/s", "val loss"
        );
    }
    for r in &summary.rounds {
        println!(
            "{:>5} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8} {:>6.1}% {:>9.1} {:>9}",
            r.round,
            r.reward_mean,
            r.reward_median,
            r.reward_max,
            r.selected_reward,
            r.pool_size,
            100.0 * r.safety_branch_share,
            r.samples_per_s,
            r.final_val_loss.map_or("-".into(), |l| format!("{l:.4}"))
        );
    }
    if let Some(last) = summary.rounds.last() {
        eprintln!("policy: {}", last.checkpoint.display());
    }
    Ok(())
}

pub fn ppo(args: RlhfArgs) -> Result<()> {
    let extra = reward_model_overrides(&args, "ppo");
    let Some(summary) = launch(args.stage, &extra)?.run(ppo::run)? else {
        return Ok(());
    };
    if summary.interrupted {
        eprintln!("interrupted: continue with --resume");
    }
    if let Some(last) = &summary.last {
        println!(
            "iteration {} | reward {:.4} | kl/token {:.4} | gold {} | {:.2} prompts/s",
            last.iteration,
            last.reward,
            last.kl_per_token,
            last.gold.map_or("-".into(), |g| format!("{g:.4}")),
            last.prompts_per_s
        );
    }
    if !summary.evals.is_empty() {
        println!(
            "{:>9} {:>8} {:>8} {:>8} {:>8}",
            "iteration", "reward", "gold", "unsafe", "benign"
        );
    }
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    for e in &summary.evals {
        println!(
            "{:>9} {:>8.4} {:>8} {:>8} {:>8}{}",
            e.iteration,
            e.eval_reward,
            opt(e.eval_gold),
            opt(e.eval_unsafe_refused),
            opt(e.eval_benign_refused),
            if e.best { "  best" } else { "" }
        );
    }
    if let Some(gib) = summary.peak_rss_gib {
        eprintln!("peak memory {gib:.2} GiB");
    }
    eprintln!("policy: {}", summary.checkpoint.display());
    if let Some(best) = &summary.best {
        eprintln!("best held-out checkpoint: {}", best.display());
    }
    Ok(())
}

pub fn pipeline(args: PipelineArgs) -> Result<()> {
    use kiln::stages::pipeline;
    let device = device::select_for_this_rank(args.device)?;
    let args = pipeline::PipelineArgs {
        recipe: args.config,
        out: args.out,
        resume: args.resume,
        rerun_from: args.rerun_from,
        device,
        plan: args.plan,
        collective: collective::from_launcher()?,
    };
    if args.plan {
        println!("{}", pipeline::plan(&args)?);
        return Ok(());
    }
    run_dir::install_interrupt_handler()?;
    let collective = &args.collective;
    collective.say(&format!("device: {}", args.device.describe()));
    if collective.world_size() > 1 {
        collective.say(&format!("data-parallel: {}", collective.describe()));
    }
    let summary = pipeline::run(&args)?;
    if !collective.is_writer() {
        return Ok(());
    }
    println!("{}", summary.table);
    let report = args.out.join(kiln::stages::report::REPORT_FILE);
    match summary.interrupted {
        Some(stage) => eprintln!(
            "interrupted in stage `{stage}`: continue with --resume (report so far: {})",
            report.display()
        ),
        None => eprintln!("report: {}", report.display()),
    }
    Ok(())
}
