//! Commands that use a model without training it: `generate`, `chat`, `convert`,
//! `eval gym`, `rm score`, `rm eval`. Every model path goes through the one loader
//! ([`convert::load_model`]): a kiln checkpoint or run directory, a Hugging Face Llama
//! directory, or a GGUF file.

use std::path::Path;

use anyhow::{Result, bail};

use kiln::data::chat::{self, ChatTemplate};
use kiln::device::{self, DeviceChoice};
use kiln::infer::generate::{self, SamplingParams};
use kiln::infer::score::{self, PairSubset};
use kiln::interop::checkpoint;
use kiln::interop::convert::{self, Format};

use super::args::{ChatArgs, CurveArgs, GenerateArgs};

fn sampling_params(
    temperature: f64,
    top_p: f64,
    min_p: f64,
    max_tokens: usize,
) -> Result<SamplingParams> {
    if !(temperature >= 0.0) {
        bail!("--temperature must be non-negative");
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    if !(0.0..1.0).contains(&min_p) {
        bail!("--min-p must be in [0, 1)");
    }
    Ok(SamplingParams {
        temperature,
        top_p,
        min_p,
        max_tokens,
    })
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let params = sampling_params(a.temperature, a.top_p, a.min_p, a.max_tokens)?;
    let device = device::select(a.device)?;
    let loaded = convert::load_model(&a.model, &device.device, Default::default())?.loaded;
    eprintln!(
        "device: {} | model: {}",
        device.describe(),
        loaded.dir.display()
    );
    let mut rng = generate::seeded_rng(a.seed);
    let out = generate::complete(
        &loaded.model,
        &loaded.tokenizer,
        &[a.prompt.as_str()],
        &params,
        &mut rng,
    )?
    .remove(0);
    println!("{}{}", a.prompt, out.text);
    // The finish reason by its serde name (`eos`, `length`, ...).
    let finish = kiln::config::name_of(&out.generated.finish);
    eprintln!("finish: {finish} ({} tokens)", out.generated.tokens.len());
    Ok(())
}

pub fn chat(a: ChatArgs) -> Result<()> {
    use std::io::IsTerminal;
    let params = sampling_params(a.temperature, a.top_p, a.min_p, a.max_tokens)?;
    let device = device::select(a.device)?;
    let started = std::time::Instant::now();
    let loaded = convert::load_model(&a.model, &device.device, Default::default())?;
    let template = a.template.unwrap_or(loaded.template);
    let system = a.system.or(loaded.default_system).filter(|s| !s.is_empty());
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
        kiln::infer::chat_session::install_interrupt_handler()?;
        eprintln!(
            "Type a message and press Enter; Ctrl-C stops an answer, /reset starts over, /exit quits."
        );
    }
    let session = kiln::infer::chat_session::ChatSession {
        model: &loaded.loaded.model,
        tokenizer: &loaded.loaded.tokenizer,
        template,
        system,
        params,
        prompt_marker: interactive,
    };
    let mut rng = generate::seeded_rng(a.seed);
    session.run(std::io::stdin().lock(), &mut std::io::stdout(), &mut rng)
}

pub fn convert(
    input: &Path,
    out: &Path,
    to: Option<Format>,
    gguf_weights: kiln::interop::gguf_write::GgufWeights,
) -> Result<()> {
    let started = std::time::Instant::now();
    let model = convert::read(input)?;
    let read_s = started.elapsed().as_secs_f64();
    let from = model.format;
    let to = to.unwrap_or(match from {
        Format::Kiln => Format::Hf,
        _ => Format::Kiln,
    });
    convert::write_with(&model, to, out, gguf_weights)?;
    eprintln!(
        "{} ({from}, {:.1}M parameters, {} template) -> {} ({to}) in {:.1}s (read {:.1}s)",
        input.display(),
        model.model_config.num_params() as f64 / 1e6,
        model.template.name(),
        out.display(),
        started.elapsed().as_secs_f64(),
        read_s
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn eval_gym(
    model: &Path,
    data: &Path,
    template: Option<ChatTemplate>,
    limit: usize,
    batch_size: usize,
    json: bool,
    device: DeviceChoice,
) -> Result<()> {
    use kiln::gym::eval::{EvalOptions, EvalSets, load_chat_model};
    let sets = EvalSets::read(data, limit)?;
    let device = device::select(device)?;
    let (loaded, template) = load_chat_model(model, template, &device.device)?;
    eprintln!(
        "device: {} | model: {}",
        device.describe(),
        loaded.dir.display()
    );
    let options = EvalOptions {
        template,
        batch_size,
        max_answer_tokens: 48,
    };
    let report = kiln::gym::eval::evaluate(&loaded.model, &loaded.tokenizer, &sets, &options)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
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
    if report.prompts_over_context > 0 {
        println!(
            "{} prompts filled the model's context of {} tokens and count as unanswered",
            report.prompts_over_context, loaded.model_config.max_seq_len
        );
    }
    Ok(())
}

pub fn rm_score(
    model: &Path,
    input: &Path,
    out: &Path,
    batch_size: usize,
    device: DeviceChoice,
) -> Result<()> {
    let device = device::select(device)?;
    let rm = score::load(model, &device.device)?;
    let read = chat::read_jsonl(input, false, score::parse_scoring_line)?;
    let dialogues: Vec<_> = read.records.iter().map(|(_, d)| d.clone()).collect();
    let source = |i: usize| format!("{}:{}", input.display(), read.lines[i]);
    let scores = score::score_dialogues(&rm, &dialogues, batch_size, &source)?;
    let mut text = String::new();
    for ((mut record, _), score) in read.records.into_iter().zip(scores) {
        record.insert("score".into(), serde_json::json!(score));
        record.insert(
            "score_sigmoid".into(),
            serde_json::json!(score::sigmoid(score)),
        );
        text.push_str(&serde_json::Value::Object(record).to_string());
        text.push('\n');
    }
    checkpoint::write_atomic(out, text.as_bytes())?;
    eprintln!("scored {} lines into {}", dialogues.len(), out.display());
    Ok(())
}

pub fn rm_eval(
    model: &Path,
    input: &Path,
    subset: PairSubset,
    json: bool,
    batch_size: usize,
    device: DeviceChoice,
) -> Result<()> {
    let device = device::select(device)?;
    let rm = score::load(model, &device.device)?;
    let report = score::evaluate_file(&rm, input, subset, 0, batch_size)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "{} reward model: accuracy {:.1}% on {} pairs, mean margin {:.3}",
        kiln::config::name_of(&rm.config.rm.kind),
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
    Ok(())
}

/// `kiln rs curve`: reward against K per temperature, as a table, `curve.json` and
/// `curve.png`.
pub fn rs_curve(a: CurveArgs) -> Result<()> {
    use kiln::stages::rs;
    if a.k.is_empty() || a.k.contains(&0) {
        bail!("--k: every K must be at least 1");
    }
    if a.temperatures.iter().any(|&t| !(t > 0.0 && t.is_finite())) {
        bail!("--temperatures: every temperature must be positive");
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) || a.max_answer_tokens == 0 || a.batch_prompts == 0 {
        bail!("--top-p must be in (0, 1], --max-answer-tokens and --batch-prompts at least 1");
    }
    let (json_path, png_path) = (a.out.join("curve.json"), a.out.join("curve.png"));
    for path in [&json_path, &png_path] {
        if path.exists() {
            bail!(
                "{} already exists; refusing to overwrite it",
                path.display()
            );
        }
    }
    let device = device::select(a.device)?;
    let rs::Sampling {
        policy,
        rms,
        mut prompts,
        mut encoded,
        ..
    } = rs::Sampling::load(
        &rs::SamplingSources {
            prompts: std::slice::from_ref(&a.prompts),
            policy: &a.policy,
            template: None,
            kernels: kiln::kernels::Kernels::default(),
            rm_helpful: &a.rm_helpful,
            rm_safety: &a.rm_safety,
            safety_threshold: kiln::infer::combined_reward::DEFAULT_SAFETY_THRESHOLD,
            batch_prompts: a.batch_prompts,
            max_answer_tokens: a.max_answer_tokens,
        },
        &device.device,
    )?;
    if a.limit > 0 && a.limit < prompts.len() {
        prompts.prompts.truncate(a.limit);
        prompts.safety.truncate(a.limit);
        prompts.sources.truncate(a.limit);
        encoded.truncate(a.limit);
    }
    std::fs::create_dir_all(&a.out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", a.out.display()))?;
    let mut ks = a.k.clone();
    ks.sort_unstable();
    ks.dedup();
    eprintln!(
        "reward curve: {} prompts, K up to {}, temperatures {:?} | device: {}",
        prompts.len(),
        ks.last().unwrap_or(&0),
        a.temperatures,
        device.describe()
    );
    let clock = std::time::Instant::now();
    let points = rs::reward_curve(
        &policy,
        &rms,
        &prompts,
        &encoded,
        &ks,
        &a.temperatures,
        &SamplingParams {
            temperature: 1.0,
            top_p: a.top_p,
            min_p: 0.0,
            max_tokens: a.max_answer_tokens,
        },
        a.batch_prompts,
        a.seed,
    )?;
    let answers = prompts.len() * ks.last().copied().unwrap_or(0) * a.temperatures.len();
    let seconds = clock.elapsed().as_secs_f64();
    println!(
        "{:>5} {:>4} {:>10} {:>10} {:>8} {:>9}",
        "T", "K", "max", "median", "gap", "finished"
    );
    for p in &points {
        println!(
            "{:>5.2} {:>4} {:>10.4} {:>10.4} {:>8.4} {:>8.1}%",
            p.temperature,
            p.k,
            p.max_reward,
            p.median_reward,
            p.max_reward - p.median_reward,
            100.0 * p.finished
        );
    }
    eprintln!(
        "{answers} answers sampled and scored in {seconds:.1} s ({:.1}/s)",
        answers as f64 / seconds.max(1e-9)
    );
    checkpoint::write_atomic(
        &json_path,
        serde_json::to_string_pretty(&points)?.as_bytes(),
    )?;
    let colours = [
        plotters::style::RGBColor(31, 119, 180),
        plotters::style::RGBColor(255, 127, 14),
        plotters::style::RGBColor(44, 160, 44),
        plotters::style::RGBColor(214, 39, 40),
        plotters::style::RGBColor(148, 103, 189),
        plotters::style::RGBColor(140, 86, 75),
    ];
    let mut named: Vec<(String, Vec<(f64, f64)>, plotters::style::RGBColor)> = Vec::new();
    for (i, &t) in a.temperatures.iter().enumerate() {
        let of_t: Vec<&rs::CurvePoint> = points.iter().filter(|p| p.temperature == t).collect();
        let colour = colours[i % colours.len()];
        named.push((
            format!("max, T={t}"),
            of_t.iter().map(|p| (p.k as f64, p.max_reward)).collect(),
            colour,
        ));
        named.push((
            format!("median, T={t}"),
            of_t.iter().map(|p| (p.k as f64, p.median_reward)).collect(),
            // The same hue, lighter: halfway to white.
            plotters::style::RGBColor(colour.0 / 2 + 128, colour.1 / 2 + 128, colour.2 / 2 + 128),
        ));
    }
    let series: Vec<(&str, &Vec<(f64, f64)>, plotters::style::RGBColor)> =
        named.iter().map(|(n, d, c)| (n.as_str(), d, *c)).collect();
    kiln::train::plot::line_chart(
        &png_path,
        "Reward of the best and the median of K answers",
        "K (answers per prompt)",
        "combined reward",
        &series,
    )?;
    eprintln!("wrote {} and {}", json_path.display(), png_path.display());
    Ok(())
}
