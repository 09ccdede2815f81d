//! The other commands: `gym generate`, `tokenizer train`, `info`, `plot`, `bench`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use kiln::config::{self, Config, ModelConfig};
use kiln::data::{corpus, tokenizer};
use kiln::device;
use kiln::interop::checkpoint;

use super::args::BenchCommand;

pub fn gym_generate(out: &Path, seed: u64, unsafe_prompts: PathBuf) -> Result<()> {
    let sizes = kiln::gym::GymSizes {
        unsafe_dir: unsafe_prompts,
        ..Default::default()
    };
    let summary = kiln::gym::generate(out, seed, &sizes)?;
    for (file, lines) in &summary.files {
        eprintln!("{:>7} {}", lines, out.join(file).display());
    }
    Ok(())
}

pub fn gym_check(input: &Path, selected: bool, json: bool) -> Result<()> {
    let check = kiln::gym::eval::check_answers(input, selected)?;
    if json {
        println!("{}", serde_json::to_string(&check)?);
        return Ok(());
    }
    let pct = |n: usize, of: usize| 100.0 * n as f64 / of.max(1) as f64;
    let reward = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.3}"));
    println!(
        "{:<11} {:>7} {:>7} {:>10} {:>8} {:>8}",
        "task", "answers", "exact", "gold score", "reward", "refused"
    );
    let rows = check.by_kind.iter().map(|(k, c)| (k.as_str(), c));
    for (name, c) in rows.chain([("all tasks", &check.tasks)]) {
        println!(
            "{:<11} {:>7} {:>6.1}% {:>10.3} {:>8} {:>7.1}%",
            name,
            c.answers,
            pct(c.exact, c.answers),
            c.gold_score,
            reward(c.reward),
            pct(c.refused, c.answers)
        );
    }
    if check.other > 0 {
        println!(
            "unsafe prompts: {} answers, {:.1}% refused, reward {}",
            check.other,
            pct(check.other_refused, check.other),
            reward(check.other_reward)
        );
    }
    Ok(())
}

/// `kiln gym check --input F --annotate OUT`: F's lines with the gold checker's verdict.
pub fn gym_annotate(input: &Path, out: &Path) -> Result<()> {
    if out == input {
        anyhow::bail!(
            "{}: --annotate would overwrite --input; name another file",
            out.display()
        );
    }
    let lines = kiln::gym::eval::annotate_answers(input)?;
    checkpoint::write_jsonl_atomic(out, &lines)?;
    eprintln!("{} lines checked: {}", lines.len(), out.display());
    Ok(())
}

/// `kiln gym pairs`: the checker's preference pairs from a policy's answers.
pub fn gym_pairs(input: &[PathBuf], out: &Path, per_prompt: usize) -> Result<()> {
    if input.iter().any(|i| i == out) {
        bail!(
            "{}: --out would overwrite an --input; name another file",
            out.display()
        );
    }
    let made = kiln::gym::policy_pairs::pairs_from_answers(input, per_prompt)?;
    if made.pairs.is_empty() {
        bail!(
            "{}: no prompt has both an answer the checker accepts and one it rejects; nothing written",
            input
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    checkpoint::write_jsonl_atomic(out, &made.pairs)?;
    eprintln!(
        "{} answers to {} prompts: {} prompts with a right and a wrong answer, {} task pairs and {} safety pairs -> {}",
        made.answers,
        made.prompts,
        made.prompts_with_pairs,
        made.task_pairs(),
        made.safety_pairs(),
        out.display()
    );
    Ok(())
}

/// `kiln gym check --baseline A --input B`: B's change from A, prompt by prompt.
pub fn gym_compare(baseline: &Path, input: &Path, selected: bool, json: bool) -> Result<()> {
    let cmp = kiln::gym::eval::compare_answers(baseline, input, selected)?;
    if json {
        println!("{}", serde_json::to_string(&cmp)?);
        return Ok(());
    }
    println!(
        "{} against {} (means over prompts; SE of the paired difference)",
        input.display(),
        baseline.display()
    );
    println!(
        "{:<11} {:>7} {:>8} {:>8} {:>14} {:>8} {:>8} {:>16}",
        "task", "prompts", "exact A", "exact B", "change (SE)", "gold A", "gold B", "change (SE)"
    );
    let rows = cmp.by_kind.iter().map(|(k, c)| (k.as_str(), c));
    for (name, c) in rows.chain([("all tasks", &cmp.tasks)]) {
        let (e, g) = (&c.exact, &c.gold_score);
        println!(
            "{:<11} {:>7} {:>7.1}% {:>7.1}% {:>+8.2} ({:.2}) {:>8.3} {:>8.3} {:>+9.4} ({:.4})",
            name,
            e.prompts,
            100.0 * e.baseline,
            100.0 * e.candidate,
            100.0 * e.difference,
            100.0 * e.standard_error,
            g.baseline,
            g.candidate,
            g.difference,
            g.standard_error
        );
    }
    let u = &cmp.unsafe_refused;
    if u.prompts > 0 {
        println!(
            "unsafe prompts: {}, refused {:.1}% -> {:.1}% ({:+.2} points, SE {:.2})",
            u.prompts,
            100.0 * u.baseline,
            100.0 * u.candidate,
            100.0 * u.difference,
            100.0 * u.standard_error
        );
    }
    Ok(())
}

pub fn tokenizer_train(input: &[PathBuf], vocab_size: usize, out: &Path) -> Result<()> {
    let documents = corpus::read_corpus(input)?;
    let tok = tokenizer::train_bpe(documents.iter().map(|d| d.text.as_str()), vocab_size)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
    }
    checkpoint::write_atomic(out, tok.to_json()?.as_bytes())?;
    eprintln!(
        "trained a {}-token BPE on {} files; wrote {}",
        tok.vocab_size(),
        documents.len(),
        out.display()
    );
    Ok(())
}

pub fn plot(out: &Path) -> Result<()> {
    for path in kiln::train::plot::plot_run(out)? {
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

pub fn report(out: &Path) -> Result<()> {
    let path = kiln::stages::report::write(out)?;
    print!("{}", kiln::stages::report::table_text(out)?);
    eprintln!("report: {}", path.display());
    Ok(())
}

pub fn info(preset: Option<config::Preset>, config: Option<PathBuf>) -> Result<()> {
    let model = match (preset, config) {
        (Some(p), _) => p.model(),
        (None, Some(path)) => config::load::<Config>(Some(&path), &[])?.model,
        (None, None) => bail!("give --preset or --config"),
    };
    print_info(&model);
    Ok(())
}

fn print_info(model: &ModelConfig) {
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

pub fn bench(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Train {
            preset,
            device,
            steps,
            warmup,
            kernels,
        } => {
            if steps == 0 {
                bail!("--steps must be at least 1");
            }
            // Under mpirun, the ranks share each step's batch (docs/distributed.md).
            let collective = kiln::train::collective::from_launcher()?;
            let device = device::select_for_this_rank(device)?;
            collective.say(&format!(
                "device: {} | {}",
                device.describe(),
                collective.describe()
            ));
            let result = kiln::bench::train(preset, &device, steps, warmup, kernels, &*collective)?;
            if collective.is_writer() {
                println!("{}", serde_json::to_string(&result)?);
            }
        }
        BenchCommand::Generate {
            model,
            device,
            batch,
            prompt_tokens,
            new_tokens,
            kernels,
        } => {
            kiln::bench::check_generate_sizes(&batch, prompt_tokens, new_tokens)?;
            let device = device::select(device)?;
            let rows =
                kiln::bench::generate(&model, &device, kernels, &batch, prompt_tokens, new_tokens)?;
            eprintln!("device: {}", device.describe());
            for row in rows {
                println!("{}", serde_json::to_string(&row)?);
            }
        }
        BenchCommand::Score {
            preset,
            device,
            prompts,
            k,
            prompt_tokens,
            answer_tokens,
            repeats,
        } => {
            let device = device::select(device)?;
            let row = kiln::bench::score(
                &preset.model(),
                &device,
                prompts,
                k,
                prompt_tokens,
                answer_tokens,
                repeats,
            )?;
            println!("{}", serde_json::to_string(&row)?);
        }
        BenchCommand::Ppo {
            preset,
            device,
            rollout,
            mini_batch,
            prompt_tokens,
            answer_tokens,
            iterations,
            warmup,
        } => {
            // Under mpirun, the ranks share each iteration (docs/distributed.md).
            let collective = kiln::train::collective::from_launcher()?;
            let device = device::select_for_this_rank(device)?;
            let row = kiln::stages::ppo::benchmark(
                &preset.model(),
                &device,
                rollout,
                mini_batch,
                prompt_tokens,
                answer_tokens,
                iterations,
                warmup,
                &*collective,
            )?;
            if collective.is_writer() {
                println!("{}", serde_json::to_string(&row)?);
            }
        }
        BenchCommand::Kernels {
            device,
            repeats,
            quick,
            json,
            kernels,
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
                return Ok(());
            }
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
    }
    Ok(())
}
