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

use super::args::{ChatArgs, GenerateArgs};

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

pub fn generate(a: GenerateArgs) -> Result<()> {
    let params = sampling_params(a.temperature, a.top_p, a.max_tokens)?;
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
    let finish = format!("{:?}", out.generated.finish).to_lowercase();
    eprintln!("finish: {finish} ({} tokens)", out.generated.tokens.len());
    Ok(())
}

pub fn chat(a: ChatArgs) -> Result<()> {
    use std::io::IsTerminal;
    let params = sampling_params(a.temperature, a.top_p, a.max_tokens)?;
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

pub fn convert(input: &Path, out: &Path, to: Option<Format>) -> Result<()> {
    let started = std::time::Instant::now();
    let model = convert::read(input)?;
    let read_s = started.elapsed().as_secs_f64();
    let from = model.format;
    let to = to.unwrap_or(match from {
        Format::Kiln => Format::Hf,
        _ => Format::Kiln,
    });
    convert::write(&model, to, out)?;
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
    let device = device::select(device)?;
    let loaded = convert::load_model(model, &device.device, Default::default())?;
    let template = template.unwrap_or(loaded.template);
    let loaded = loaded.loaded;
    template.check(&loaded.tokenizer)?;
    eprintln!(
        "device: {} | model: {}",
        device.describe(),
        loaded.dir.display()
    );
    let report = kiln::gym::eval::evaluate(
        &loaded.model,
        &loaded.tokenizer,
        data,
        &kiln::gym::eval::EvalOptions {
            template,
            batch_size,
            max_answer_tokens: 48,
            limit,
        },
    )?;
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
    let read = chat::read_jsonl(input, false, chat::parse_preference)?;
    let (pairs, lines): (Vec<_>, Vec<_>) = read
        .records
        .into_iter()
        .zip(read.lines)
        .filter(|(p, _)| subset.keeps(p))
        .unzip();
    if pairs.is_empty() {
        bail!("{}: no {subset:?} pairs", input.display());
    }
    let source = |i: usize| format!("{}:{}", input.display(), lines[i]);
    let report = score::evaluate(&rm, &pairs, batch_size, &source)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
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
    Ok(())
}
