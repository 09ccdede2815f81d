//! Supervised fine-tuning: the chat template and its loss mask, packing equivalence, and the
//! `kiln sft` command end to end (CPU device).

use std::process::Command;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use kiln::config::ModelConfig;
use kiln::data::chat::{ChatTemplate, Message};
use kiln::data::tokenizer::Tokenizer;
use kiln::kernels::SequenceLayout;
use kiln::model::Llama;
use kiln::stages::sft::{self, SftRows, TrainOn};

mod common;
use common::{relative_distance, repo};

fn tokenizer() -> Tokenizer {
    Tokenizer::load(&repo("data/shakespeare/tokenizer.json")).unwrap()
}

use common::rng;

fn dialogue() -> Vec<Message> {
    vec![
        Message::system("Answer in capital letters."),
        Message::user("What is 2 + 3?"),
        Message::assistant("FIVE"),
        Message::user("Reverse: a b c"),
        Message::assistant("C B A"),
    ]
}

#[test]
fn llama2_template_renders_the_reference_layout_and_trains_only_answers() {
    let tok = tokenizer();
    let encoded = ChatTemplate::Llama2.encode(&tok, &dialogue()).unwrap();
    // Meta's reference format; special tokens decoded back to their text.
    let text = tok.decode_with_special(&encoded.tokens).unwrap();
    assert_eq!(
        text,
        "<s>[INST] <<SYS>>\nAnswer in capital letters.\n<</SYS>>\n\nWhat is 2 + 3? [/INST] FIVE</s>\
         <s>[INST] Reverse: a b c [/INST] C B A</s>"
    );
    // The trained tokens are exactly the answers and the EOS closing each.
    let trained: Vec<u32> = encoded
        .tokens
        .iter()
        .zip(&encoded.trained)
        .filter(|(_, t)| **t)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(
        tok.decode_with_special(&trained).unwrap(),
        " FIVE</s> C B A</s>"
    );

    // With train_on = last (and GAtt's weight 0), earlier answers are not trained.
    let last = sft::apply_train_on(dialogue(), TrainOn::Last);
    let encoded = ChatTemplate::Llama2.encode(&tok, &last).unwrap();
    let trained: Vec<u32> = encoded
        .tokens
        .iter()
        .zip(&encoded.trained)
        .filter(|(_, t)| **t)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(tok.decode_with_special(&trained).unwrap(), " C B A</s>");

    // The generation prompt ends where the answer starts.
    let prompt = ChatTemplate::Llama2
        .encode_prompt(&tok, &dialogue()[..4])
        .unwrap();
    assert_eq!(&prompt[..], &encoded.tokens[..prompt.len()]);
    assert_eq!(prompt.last(), tok.token_id("[/INST]").as_ref());

    // ChatML needs tokens this tokenizer lacks: a clear error.
    let e = ChatTemplate::Chatml.check(&tok).unwrap_err().to_string();
    assert!(e.contains("<|im_start|>"), "{e}");
}

fn cpu() -> Device {
    Device::flex()
}

fn tiny_model(rng: &mut ChaCha8Rng) -> Llama {
    tiny_model_on(rng, &cpu())
}

fn tiny_model_on(rng: &mut ChaCha8Rng, device: &Device) -> Llama {
    let config = ModelConfig {
        dim: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        ffn_dim: 48,
        vocab_size: 2048,
        max_seq_len: 128,
        init_std: 0.1,
        ..ModelConfig::default()
    };
    Llama::new(&config, rng.random(), device)
}

/// The model's next-token logits for `inputs`, one row of `vocab` values per token.
fn host_logits(model: &Llama, inputs: &[u32]) -> Vec<Vec<f32>> {
    let t = inputs.len();
    let ids: Vec<i64> = inputs.iter().map(|&v| v as i64).collect();
    let logits = model.forward(
        Tensor::<2, Int>::from_data(TensorData::new(ids, [1, t]), &cpu()),
        None,
    );
    let vocab = logits.dims()[2];
    let values: Vec<f32> = logits.into_data().try_into_vec_as::<f32>().unwrap();
    values.chunks(vocab).map(<[f32]>::to_vec).collect()
}

/// Cross-entropy of each logit row against its target, in f64.
fn host_cross_entropy(logits: &[Vec<f32>], targets: &[u32]) -> Vec<f64> {
    logits
        .iter()
        .zip(targets)
        .map(|(row, &target)| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            lse - row[target as usize] as f64
        })
        .collect()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

#[test]
fn answer_only_loss_equals_the_host_mean_over_answer_tokens() {
    let mut rng = rng();
    let tok = tokenizer();
    let model = tiny_model(&mut rng);
    let encoded = ChatTemplate::Llama2.encode(&tok, &dialogue()).unwrap();
    let pad_id = 2;
    let rows = SftRows::new(std::slice::from_ref(&encoded), 64, false, pad_id);
    let n = encoded.tokens.len() - 1;
    let (inputs, targets, trained) = (
        &encoded.tokens[..n],
        &encoded.tokens[1..],
        &encoded.trained[1..],
    );
    let logits = host_logits(&model, inputs);
    let losses = host_cross_entropy(&logits, targets);
    let answer_losses: Vec<f64> = losses
        .iter()
        .zip(trained)
        .filter(|(_, t)| **t)
        .map(|(l, _)| *l)
        .collect();
    let expected = mean(&answer_losses);
    let got = rows.batch(&[0], &cpu()).loss(&model).into_scalar::<f32>();
    // f32 model against an f64 host sum: relative 1e-5.
    assert!(
        (got as f64 - expected).abs() <= 1e-5 * expected,
        "{got} vs {expected}"
    );

    // Prompt tokens do not count. Retarget every prompt position at its least likely token:
    // a loss that counted them would rise (the host's mean over all tokens does, checked), the
    // answer-only loss stays bit for bit the same. (Comparing the answer mean with the mean
    // over all tokens instead fails whenever the two happen to lie close.)
    let retargeted: Vec<u32> = logits
        .iter()
        .zip(targets.iter().zip(trained))
        .map(|(row, (&target, &is_answer))| {
            if is_answer {
                target
            } else {
                let least = (0..row.len()).min_by(|&a, &b| row[a].total_cmp(&row[b]));
                least.unwrap() as u32
            }
        })
        .collect();
    let all_tokens = mean(&losses);
    let all_tokens_retargeted = mean(&host_cross_entropy(&logits, &retargeted));
    assert!(
        all_tokens_retargeted > all_tokens + 0.1,
        "{all_tokens_retargeted} vs {all_tokens}"
    );
    let mut batch = rows.batch(&[0], &cpu());
    let padded: Vec<i64> = (0..rows.seq_len)
        .map(|i| retargeted.get(i).copied().unwrap_or(pad_id) as i64)
        .collect();
    batch.targets = Tensor::from_data(TensorData::new(padded, [1, rows.seq_len]), &cpu());
    let retargeted_loss = batch.loss(&model).into_scalar::<f32>();
    assert_eq!(
        retargeted_loss.to_bits(),
        got.to_bits(),
        "{retargeted_loss} vs {got}"
    );
}

#[test]
fn packed_rows_give_each_sample_the_loss_it_has_alone() {
    let mut rng = rng();
    let tok = tokenizer();
    let model = tiny_model(&mut rng);
    let words = ["a", "b", "c", "d", "e", "f", "g"];
    let samples: Vec<_> = (0..5)
        .map(|_| {
            let mut messages = Vec::new();
            for _ in 0..rng.random_range(1..=2) {
                let text = |rng: &mut ChaCha8Rng, n: usize| {
                    (0..n)
                        .map(|_| words[rng.random_range(0..words.len())])
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                let (u, a) = (rng.random_range(2..8), rng.random_range(1..6));
                messages.push(Message::user(text(&mut rng, u)));
                messages.push(Message::assistant(text(&mut rng, a)));
            }
            ChatTemplate::Llama2.encode(&tok, &messages).unwrap()
        })
        .collect();
    let seq_len = 100;
    let packed = SftRows::new(&samples, seq_len, true, 2);
    let alone = SftRows::new(&samples, seq_len, false, 2);
    assert_eq!(alone.len(), samples.len());
    assert!(packed.len() < samples.len(), "samples share rows");
    let ids = |v: &Vec<u32>| {
        Tensor::<2, Int>::from_data(
            TensorData::new(v.iter().map(|&x| x as i64).collect(), [1, seq_len]),
            &cpu(),
        )
    };
    // Per-sample loss in the packed rows: weights restricted to one segment.
    let mut packed_losses = Vec::new();
    for row in 0..packed.len() {
        let segments = &packed.segments[row];
        let count = segments.iter().max().unwrap() + 1;
        for s in 0..count {
            let weights: Vec<f32> = segments
                .iter()
                .zip(&packed.weights[row])
                .map(|(&g, &w)| if g == s { w } else { 0.0 })
                .collect();
            if weights.iter().sum::<f32>() == 0.0 {
                continue; // the padding segment
            }
            let loss = model.masked_loss(
                ids(&packed.inputs[row]),
                ids(&packed.targets[row]),
                Tensor::from_data(TensorData::new(weights, [1, seq_len]), &cpu()),
                &SequenceLayout::packed(1, seq_len, segments.clone()),
            );
            packed_losses.push(loss.into_scalar::<f32>() as f64);
        }
    }
    let alone_losses: Vec<f64> = (0..alone.len())
        .map(|i| alone.batch(&[i], &cpu()).loss(&model).into_scalar::<f32>() as f64)
        .collect();
    assert_eq!(packed_losses.len(), alone_losses.len());
    for (p, a) in packed_losses.iter().zip(&alone_losses) {
        // Same math in another order of summation: f32 relative 1e-5.
        assert!((p - a).abs() <= 1e-5 * a, "packed {p} vs alone {a}");
    }
    // Without segments (plain causal rows) the second sample of a row would attend to the
    // first: its logits move, so the check above can fail. (Its mean loss alone can move by
    // less than any tolerance by chance: it failed 3 of 300 seeds at 1e-4.)
    let row = 0;
    let tokens = ids(&packed.inputs[row]);
    let logits = |layout: SequenceLayout| -> Vec<f32> {
        let hidden = model.hidden_states_with_layout(tokens.clone(), &layout, None);
        model
            .logits(hidden)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    };
    let segments = &packed.segments[row];
    let apart = logits(SequenceLayout::packed(1, seq_len, segments.clone()));
    let together = logits(SequenceLayout::causal(1, seq_len));
    let vocab = apart.len() / seq_len;
    let moved = (0..seq_len)
        .filter(|&t| segments[t] == 1)
        .flat_map(|t| t * vocab..(t + 1) * vocab)
        .map(|i| (apart[i] - together[i]).abs())
        .fold(0.0f32, f32::max);
    assert!(
        moved > 1e-3,
        "the second sample's logits moved by only {moved}"
    );
}

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn sft_command_fine_tunes_resumes_and_rejects_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = repo("data/shakespeare/macbeth.txt");
    let pre = dir.path().join("pre");
    let mut args: Vec<String> = vec!["pretrain".into(), "--device".into(), "cpu".into()];
    args.extend(["--out".into(), pre.display().to_string()]);
    for o in common::tiny_model(&corpus)
        .into_iter()
        .chain(["train.max_steps=2".into(), "model.max_seq_len=64".into()])
    {
        args.extend(["--set".into(), o]);
    }
    let out = kiln(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (train, val) = common::write_sft_data(dir.path());
    let sft_dir = dir.path().join("sft");
    let sft_args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["sft", "--device", "cpu", "--init"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(pre.display().to_string());
        a.extend(["--out".into(), sft_dir.display().to_string()]);
        for s in [
            format!("data.train=[\"{train}\"]"),
            format!("data.val=[\"{val}\"]"),
            "data.seq_len=64".into(),
            "train.batch_size=4".into(),
            "train.epochs=0.5".into(),
            "optim.lr=1e-3".into(),
        ] {
            a.extend(["--set".into(), s]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |extra: &[&str]| {
        let a = sft_args(extra);
        kiln(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("120 dialogues"), "{stderr}");
    let ckpt = kiln::interop::checkpoint::resolve(&sft_dir).unwrap();
    let manifest = kiln::interop::checkpoint::read_manifest(&ckpt).unwrap();
    // 0.5 epoch of rows, batch 4: at least one step, and `kiln generate` loads the result.
    assert!(manifest.step >= 1);
    let ckpt_s = ckpt.display().to_string();
    let out = kiln(&common::generate_args(&ckpt_s, "hi"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A second run into the same directory needs --resume; with it, nothing is left to do.
    let out = run(&[]);
    assert!(!out.status.success());
    let out = run(&["--resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A malformed line stops the run before training, naming file and line...
    let bad = dir.path().join("bad.jsonl");
    let mut text = std::fs::read_to_string(&train).unwrap();
    text.push_str("\n{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n");
    std::fs::write(&bad, text).unwrap();
    let bad_out = dir.path().join("bad-run");
    let args = |skip: bool| {
        let mut a: Vec<String> = vec![
            "sft".into(),
            "--device".into(),
            "cpu".into(),
            "--init".into(),
            pre.display().to_string(),
            "--out".into(),
            bad_out.display().to_string(),
            "--set".into(),
            format!("data.train=[\"{}\"]", bad.display()),
            "--set".into(),
            "train.max_steps=1".into(),
            "--set".into(),
            "train.batch_size=2".into(),
            "--set".into(),
            "data.seq_len=64".into(),
        ];
        if skip {
            a.push("--skip-bad-lines".into());
        }
        a
    };
    let a = args(false);
    let out = kiln(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.jsonl:121: the last message must be an assistant message"),
        "{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(!bad_out.join("checkpoints").exists());
    // ...and with --skip-bad-lines it is counted and skipped.
    let a = args(true);
    let out = kiln(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("skipped 1 malformed line(s)"), "{stderr}");
}

#[test]
fn accumulated_micro_batches_weigh_every_answer_token_equally() {
    use kiln::stages::sft::AnswerLoss;
    use kiln::train::step::Accumulated;
    use kiln::train::supervised::Objective;
    let mut rng = rng();
    let tok = tokenizer();
    let model = tiny_model_on(&mut rng, &cpu().autodiff());
    // 16 samples whose answers grow from 1 to about 40 words: the first micro-batch of four
    // has short answers, the last long ones.
    let words = ["a", "b", "c", "d", "e", "f", "g"];
    let samples: Vec<_> = (0..16)
        .map(|i| {
            let answer_words = 1 + i * 5 / 2 + rng.random_range(0..2);
            let text = |rng: &mut ChaCha8Rng, n: usize| {
                (0..n)
                    .map(|_| words[rng.random_range(0..words.len())])
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let messages = vec![
                Message::user(text(&mut rng, 5)),
                Message::assistant(text(&mut rng, answer_words)),
            ];
            ChatTemplate::Llama2.encode(&tok, &messages).unwrap()
        })
        .collect();
    let rows = SftRows::new(&samples, 128, false, 2);
    assert_eq!(rows.len(), 16);
    let objective = AnswerLoss {
        train: rows.clone(),
        val: rows,
        batch_size: 4,
        eval_batches: 1,
    };
    let all: Vec<usize> = (0..16).collect();
    let mut one_batch = Accumulated::default();
    one_batch.add(&model, objective.loss(&model, &all));
    let mut four = Accumulated::default();
    let mut means_of_micro_batches = Vec::new();
    for chunk in all.chunks(4) {
        four.add(&model, objective.loss(&model, chunk));
        let mut alone = Accumulated::default();
        alone.add(&model, objective.loss(&model, chunk));
        means_of_micro_batches.push(alone.mean_gradients(&model));
    }
    let whole = one_batch.mean_gradients(&model);
    let split = four.mean_gradients(&model);
    assert!(!whole.is_empty());
    let err = relative_distance(&split, &whole);
    eprintln!("4 micro-batches of 4 against 1 batch of 16: relative L2 {err:.2e}");
    // f32 sums in another grouping: relative 1e-5.
    assert!(err < 1e-5, "gradients differ: {err}");
    assert!((one_batch.mean_loss() - four.mean_loss()).abs() < 1e-5 * one_batch.mean_loss());
    // The mean of the micro-batches' mean gradients (the old step) is measurably different.
    let mut mean_of_means = means_of_micro_batches[0].clone();
    for (i, t) in mean_of_means.iter_mut().enumerate() {
        for (j, v) in t.values.iter_mut().enumerate() {
            *v = means_of_micro_batches
                .iter()
                .map(|m| m[i].values[j])
                .sum::<f32>()
                / 4.0;
        }
    }
    let skew = relative_distance(&mean_of_means, &whole);
    eprintln!("mean of micro-batch means against the token mean: relative L2 {skew:.2e}");
    assert!(
        skew > 1e-2,
        "uneven answers should skew the mean of means: {skew}"
    );
}

/// The Shakespeare tokenizer with ChatML's two markers added as special tokens.
fn chatml_tokenizer() -> Tokenizer {
    let text = std::fs::read_to_string(repo("data/shakespeare/tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let added = json["added_tokens"].as_array_mut().unwrap();
    for (id, content) in [(2048, "<|im_start|>"), (2049, "<|im_end|>")] {
        added.push(serde_json::json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    Tokenizer::from_json(&json.to_string()).unwrap()
}

/// Random message text: words, digits, punctuation, an apostrophe, inner newlines, and
/// leading or trailing spaces (which the Llama 2 layout trims and ChatML keeps).
fn random_text(rng: &mut ChaCha8Rng) -> String {
    const PIECES: [&str; 14] = [
        "What",
        "is",
        "37",
        "+",
        "12?",
        "it's",
        "Ünïcode",
        "HAMLET:",
        "\n",
        "a b",
        "(x)",
        "--",
        "9",
        "well.",
    ];
    let mut text = String::new();
    if rng.random_bool(0.2) {
        text.push(' ');
    }
    for i in 0..rng.random_range(1..6) {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(PIECES[rng.random_range(0..PIECES.len())]);
    }
    if rng.random_bool(0.2) {
        text.push(' ');
    }
    text
}

/// The Jinja `chat_template` of a Hugging Face export, rendered by a Jinja engine and
/// tokenized as transformers does (special tokens split out), gives exactly the tokens kiln
/// trains on and prompts with: random dialogues, both templates, with and without a system
/// message and a default system prompt (`kiln chat` inserts the default when there is none).
#[test]
fn exported_jinja_template_renders_the_tokens_kiln_trains_on() {
    let mut rng = rng();
    for (template, tok, bos, eos) in [
        (ChatTemplate::Llama2, tokenizer(), "<s>", "</s>"),
        (
            ChatTemplate::Chatml,
            chatml_tokenizer(),
            "<|endoftext|>",
            "<|im_end|>",
        ),
    ] {
        for case in 0..60 {
            let default_system = (case % 3 == 0).then(|| random_text(&mut rng));
            let mut messages = Vec::new();
            if rng.random_bool(0.4) {
                messages.push(Message::system(random_text(&mut rng)));
            }
            for _ in 0..rng.random_range(1..4) {
                messages.push(Message::user(random_text(&mut rng)));
                messages.push(Message::assistant(random_text(&mut rng)));
            }
            let prompt_only = rng.random_bool(0.5);
            if prompt_only {
                messages.pop();
            }
            // What kiln renders: the default system prompt first when there is none.
            let mut with_system = messages.clone();
            if let Some(system) = &default_system
                && messages[0].role != kiln::data::chat::Role::System
            {
                with_system.insert(0, Message::system(system.clone()));
            }
            let expected = if prompt_only {
                template.encode_prompt(&tok, &with_system).unwrap()
            } else {
                template.encode(&tok, &with_system).unwrap().tokens
            };
            let jinja = template.jinja(default_system.as_deref());
            let mut env = minijinja::Environment::new();
            env.add_template("chat", &jinja).unwrap();
            let roles = |m: &Message| match m.role {
                kiln::data::chat::Role::System => "system",
                kiln::data::chat::Role::User => "user",
                kiln::data::chat::Role::Assistant => "assistant",
            };
            let listed: Vec<_> = messages
                .iter()
                .map(|m| minijinja::context! { role => roles(m), content => m.content.clone() })
                .collect();
            let rendered = env
                .get_template("chat")
                .unwrap()
                .render(minijinja::context! {
                    messages => listed,
                    bos_token => bos,
                    eos_token => eos,
                    add_generation_prompt => prompt_only,
                })
                .unwrap();
            assert_eq!(
                tok.encode(&rendered).unwrap(),
                expected,
                "{} template, default system {default_system:?}, rendered {rendered:?}",
                template.name()
            );
        }
    }
}
