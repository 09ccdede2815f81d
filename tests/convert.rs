//! Models in and out: Hugging Face directories both ways, GGUF dequantisation of every
//! supported type against hand-built blocks, a GGUF llama model rebuilt exactly, bad files
//! refused without partial output, `kiln convert`/`chat`/`generate` on any model path, and the
//! real SmolLM2-135M-Instruct (when `scripts/fetch-smollm2.sh` has fetched it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use burn::tensor::{Int, Tensor, TensorData};
use half::{bf16, f16};
use kiln::config::ModelConfig;
use kiln::data::chat::{ChatTemplate, Message};
use kiln::interop::checkpoint::NamedTensor;
use kiln::interop::convert::{self, ForeignModel, Format};
use kiln::interop::gguf::{GgmlType, GgufFile, Value};
use kiln::interop::gguf_write::{self as gguf_writer, TensorToWrite};
use kiln::model::Llama;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

mod common;
use common::repo;

use common::rng;

fn cpu() -> burn::tensor::Device {
    kiln::device::ComputeDevice::cpu().device
}

fn shakespeare_tokenizer() -> String {
    std::fs::read_to_string(repo("data/shakespeare/tokenizer.json")).unwrap()
}

/// A small Llama of random shape (GQA ratio, tied or not) and random weights.
fn random_model(rng: &mut ChaCha8Rng) -> (Llama, ForeignModel) {
    let n_heads = 4;
    let config = ModelConfig {
        dim: 32,
        n_layers: 2,
        n_heads,
        n_kv_heads: [1, 2, 4][rng.random_range(0..3)],
        ffn_dim: 32 * rng.random_range(1..4),
        vocab_size: 2048,
        max_seq_len: 64,
        norm_eps: 1e-5,
        rope_theta: [10000.0, 100000.0][rng.random_range(0..2)],
        tie_embeddings: rng.random_bool(0.5),
        init_std: 0.2,
        kernels: kiln::kernels::Kernels::Reference,
    };
    let model = Llama::new(&config, rng.random(), &cpu());
    // Norm weights start at one: make them random too, so a mix-up would show.
    let tensors = kiln::interop::params::export(&model)
        .into_iter()
        .map(|mut t| {
            if t.shape.len() == 1 {
                t.values
                    .iter_mut()
                    .for_each(|v| *v = rng.random_range(0.5..1.5));
            }
            t
        })
        .collect::<Vec<_>>();
    let model = kiln::interop::params::import(model, tensors.clone(), Path::new("test")).unwrap();
    let listed: Vec<(String, Vec<usize>)> = kiln::interop::params::list(&model)
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect();
    assert_eq!(
        Llama::param_shapes(&config),
        listed,
        "names, shapes and order"
    );
    let foreign = ForeignModel {
        format: Format::Kiln,
        path: PathBuf::from("test"),
        model_config: config,
        tensors,
        tokenizer_json: shakespeare_tokenizer(),
        template: ChatTemplate::Llama2,
        default_system: None,
    };
    (model, foreign)
}

fn by_name(tensors: &[NamedTensor]) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    tensors
        .iter()
        .map(|t| (t.name.clone(), (t.shape.clone(), t.values.clone())))
        .collect()
}

fn logits(model: &Llama, tokens: &[i64]) -> Vec<f32> {
    let input = Tensor::<2, Int>::from_data(
        TensorData::new(tokens.to_vec(), [1, tokens.len()]),
        &model.device(),
    );
    model
        .forward(input, None)
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap()
}

/// The shape fields a file format carries (not kiln's own `init_std` and `kernels`).
fn shape_of(
    c: &ModelConfig,
) -> (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    u64,
    u64,
    bool,
) {
    (
        c.dim,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.ffn_dim,
        c.vocab_size,
        c.max_seq_len,
        c.norm_eps.to_bits(),
        c.rope_theta.to_bits(),
        c.tie_embeddings,
    )
}

/// The same shape and the same weights, bit for bit.
fn assert_same_model(read: &ForeignModel, original: &ForeignModel, what: &str) {
    assert_eq!(
        shape_of(&read.model_config),
        shape_of(&original.model_config),
        "{what}"
    );
    assert_eq!(by_name(&read.tensors), by_name(&original.tensors), "{what}");
}

fn kiln_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap()
}

fn kiln_ok(args: &[&str]) -> Output {
    let out = kiln_cli(args);
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `kiln` fails with a one-line error containing every one of `needles`.
fn kiln_fails(args: &[&str], needles: &[&str]) {
    let out = kiln_cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kiln {args:?} succeeded");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
}

/// Nothing was written: neither `out` nor a temporary directory beside it.
fn assert_nothing_written(out: &Path) {
    assert!(!out.exists(), "{} was written", out.display());
    let parent = out.parent().unwrap();
    for entry in std::fs::read_dir(parent).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".partial-"), "temporary {name} left behind");
    }
}

#[test]
fn kiln_to_hf_to_kiln_is_identical() {
    let mut rng = rng();
    let (model, foreign) = random_model(&mut rng);
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    convert::write(&foreign, Format::Hf, &hf).unwrap();
    // Hugging Face's layout: a tied head is left out, as transformers' save_pretrained does.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(
        config["num_key_value_heads"],
        foreign.model_config.n_kv_heads
    );
    assert_eq!(
        config["tie_word_embeddings"],
        foreign.model_config.tie_embeddings
    );
    let weights = std::fs::read(hf.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&weights).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    assert_eq!(
        meta.tensors().contains_key("lm_head.weight"),
        !foreign.model_config.tie_embeddings
    );
    assert!(
        meta.tensors()
            .contains_key("model.layers.1.self_attn.k_proj.weight")
    );

    let back = convert::read(&hf).unwrap();
    assert_same_model(&back, &foreign, "HF export read back");
    assert_eq!(back.template, ChatTemplate::Llama2);

    // A ChatML model's default system prompt travels in the exported chat template
    // (transformers' apply_chat_template inserts it, as `kiln chat` does).
    let system = "You are a helpful test model, by kiln";
    // ChatML's markers in place of the Llama 2 system markers (same ids).
    let chatml_json = foreign
        .tokenizer_json
        .replace("\"<<SYS>>\"", "\"<|im_start|>\"")
        .replace("\"<</SYS>>\"", "\"<|im_end|>\"");
    let chat = ForeignModel {
        template: ChatTemplate::Chatml,
        default_system: Some(system.into()),
        tokenizer_json: chatml_json,
        ..foreign.clone()
    };
    let chat_hf = dir.path().join("chat-hf");
    convert::write(&chat, Format::Hf, &chat_hf).unwrap();
    let chat_back = convert::read(&chat_hf).unwrap();
    assert_eq!(chat_back.template, ChatTemplate::Chatml);
    assert_eq!(chat_back.default_system.as_deref(), Some(system));

    // On to a kiln checkpoint, which loads as the model we started from.
    let kiln_dir = dir.path().join("kiln");
    convert::write(&back, Format::Kiln, &kiln_dir).unwrap();
    let loaded = convert::load_model(&kiln_dir, &cpu(), kiln::kernels::Kernels::Reference).unwrap();
    assert_eq!(
        by_name(&kiln::interop::params::export(&loaded.loaded.model)),
        by_name(&foreign.tensors)
    );
    let tokens: Vec<i64> = (0..17).map(|_| rng.random_range(0..2048)).collect();
    assert_eq!(
        logits(&loaded.loaded.model, &tokens),
        logits(&model, &tokens)
    );
    // And the Hugging Face directory itself loads too.
    let from_hf = convert::load_model(&hf, &cpu(), kiln::kernels::Kernels::Reference).unwrap();
    assert_eq!(
        logits(&from_hf.loaded.model, &tokens),
        logits(&model, &tokens)
    );
}

#[test]
fn hf_import_reads_shards_in_f16_and_bf16() {
    let mut rng = rng();
    let (_, foreign) = random_model(&mut rng);
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    convert::write(&foreign, Format::Hf, &hf).unwrap();
    std::fs::remove_file(hf.join("model.safetensors")).unwrap();
    // Half of the tensors in an f16 shard, half in a bf16 one, listed by the index.
    let mut expected = BTreeMap::new();
    let mut shards: [Vec<(String, Vec<usize>, Vec<u8>)>; 2] = [Vec::new(), Vec::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, t) in foreign.tensors.iter().enumerate() {
        let shard = i % 2;
        let (bytes, values): (Vec<u8>, Vec<f32>) = if shard == 0 {
            let h: Vec<f16> = t.values.iter().map(|&v| f16::from_f32(v)).collect();
            (
                h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                h.iter().map(|v| v.to_f32()).collect(),
            )
        } else {
            let h: Vec<bf16> = t.values.iter().map(|&v| bf16::from_f32(v)).collect();
            (
                h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                h.iter().map(|v| v.to_f32()).collect(),
            )
        };
        expected.insert(t.name.clone(), (t.shape.clone(), values));
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        weight_map.insert(t.name.clone(), file.into());
        shards[shard].push((t.name.clone(), t.shape.clone(), bytes));
    }
    for (shard, tensors) in shards.iter().enumerate() {
        let dtype = [safetensors::Dtype::F16, safetensors::Dtype::BF16][shard];
        let views: Vec<_> = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                let view =
                    safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes).unwrap();
                (name.clone(), view)
            })
            .collect();
        let file = hf.join(format!("model-0000{}-of-00002.safetensors", shard + 1));
        std::fs::write(file, safetensors::serialize(views, None).unwrap()).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(hf.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let back = convert::read(&hf).unwrap();
    assert_eq!(by_name(&back.tensors), expected);
    assert!(
        expected
            .values()
            .zip(by_name(&foreign.tensors).values())
            .any(|(a, b)| a.1 != b.1),
        "halving the precision changed something, so the comparison can fail"
    );
}

/// One tensor of `ty`, built from random blocks by hand (not by kiln's quantisers), and the
/// values it must dequantise to, computed in f64 from the block fields.
fn hand_made(ty: GgmlType, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> (Vec<u8>, Vec<f64>) {
    let n = rows * cols;
    let mut bytes = Vec::new();
    let mut values = Vec::with_capacity(n);
    let scale = |rng: &mut ChaCha8Rng| f16::from_f32(rng.random_range(-0.1f32..0.1));
    match ty {
        GgmlType::F32 => {
            for _ in 0..n {
                let v: f32 = rng.random_range(-3.0..3.0);
                bytes.extend(v.to_le_bytes());
                values.push(v as f64);
            }
        }
        GgmlType::F16 => {
            for _ in 0..n {
                let v = f16::from_f32(rng.random_range(-3.0..3.0));
                bytes.extend(v.to_le_bytes());
                values.push(v.to_f64());
            }
        }
        GgmlType::BF16 => {
            for _ in 0..n {
                let v = bf16::from_f32(rng.random_range(-3.0..3.0));
                bytes.extend(v.to_le_bytes());
                values.push(v.to_f64());
            }
        }
        GgmlType::Q8_0 => {
            for _ in 0..n / 32 {
                let d = scale(rng);
                bytes.extend(d.to_le_bytes());
                for _ in 0..32 {
                    let q: i8 = rng.random();
                    bytes.push(q as u8);
                    values.push(d.to_f64() * q as f64);
                }
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            for _ in 0..n / 32 {
                let (d, m) = (scale(rng), scale(rng));
                bytes.extend(d.to_le_bytes());
                if ty == GgmlType::Q4_1 {
                    bytes.extend(m.to_le_bytes());
                }
                let q: Vec<u8> = (0..32).map(|_| rng.random_range(0..16)).collect();
                // ggml packs value j in the low nibble of byte j, value j + 16 in its high one.
                bytes.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
                values.extend(q.iter().map(|&q| match ty {
                    GgmlType::Q4_0 => d.to_f64() * (q as f64 - 8.0),
                    _ => d.to_f64() * q as f64 + m.to_f64(),
                }));
            }
        }
        _ => unreachable!(),
    }
    (bytes, values)
}

const SUPPORTED: [GgmlType; 6] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
];

#[test]
fn gguf_dequantises_every_supported_type() {
    let mut rng = rng();
    let (rows, cols) = (3, 96);
    let mut tensors = Vec::new();
    let mut expected = Vec::new();
    for ty in SUPPORTED {
        let (bytes, values) = hand_made(ty, rows, cols, &mut rng);
        tensors.push(TensorToWrite {
            name: ty.name(),
            shape: vec![rows, cols],
            ggml_type: ty,
            bytes,
        });
        expected.push(values);
    }
    let metadata = vec![("general.name".to_string(), Value::String("test".into()))];
    let file = GgufFile::parse(gguf_writer::write(&metadata, &tensors), "test.gguf").unwrap();
    assert_eq!(file.version, 3);
    for (ty, want) in SUPPORTED.iter().zip(&expected) {
        let info = file.tensor(&ty.name()).unwrap();
        assert_eq!(info.shape(), vec![rows, cols]);
        let got = file.dequantize(info).unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            // f32 products of f16 fields: relative 1e-6.
            assert!(
                (*g as f64 - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{} element {i}: {g} vs {w}",
                ty.name()
            );
        }
    }

    // A known block: Q4_0 with d = 0.5 and byte 0 = 0x10 gives x0 = (0 - 8) / 2, x16 = (1 - 8) / 2.
    let mut block = f16::from_f32(0.5).to_le_bytes().to_vec();
    block.extend([0x10u8; 16]);
    let tensor = TensorToWrite {
        name: "q".into(),
        shape: vec![32],
        ggml_type: GgmlType::Q4_0,
        bytes: block,
    };
    let file = GgufFile::parse(gguf_writer::write(&[], &[tensor]), "known.gguf").unwrap();
    let values = file.dequantize(file.tensor("q").unwrap()).unwrap();
    assert_eq!(values[0], -4.0);
    assert_eq!(values[15], -4.0);
    assert_eq!(values[16], -3.5);
    assert_eq!(values[31], -3.5);
}

#[test]
fn gguf_quantisers_round_trip_within_half_a_step() {
    let mut rng = rng();
    let values: Vec<f32> = (0..32 * 20).map(|_| rng.random_range(-2.0..2.0)).collect();
    for ty in SUPPORTED {
        let tensor = TensorToWrite {
            name: "t".into(),
            shape: vec![20, 32],
            ggml_type: ty,
            bytes: gguf_writer::quantize(ty, &values).unwrap(),
        };
        let file = GgufFile::parse(gguf_writer::write(&[], &[tensor]), "t.gguf").unwrap();
        let back = file.dequantize(file.tensor("t").unwrap()).unwrap();
        for (block, (orig, got)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
            let (lo, hi) = orig
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let amax = lo.abs().max(hi.abs());
            // One quantisation step of each format (Q4_0 may clamp its far end by a step).
            let step = match ty {
                GgmlType::F32 => 0.0,
                GgmlType::F16 => amax / 1024.0,
                GgmlType::BF16 => amax / 128.0,
                GgmlType::Q8_0 => amax / 127.0 / 2.0,
                GgmlType::Q4_0 => amax / 8.0,
                _ => (hi - lo) / 15.0 / 2.0,
            };
            for (o, g) in orig.iter().zip(got) {
                assert!(
                    (o - g).abs() <= step * 1.01 + 1e-3 * amax * (ty != GgmlType::F32) as u8 as f32,
                    "{} block {block}: {o} -> {g} (step {step})",
                    ty.name()
                );
            }
        }
    }
}

/// llama.cpp's `permute` for Q/K weights, written as its NumPy reshape:
/// `w.reshape(heads, 2, head_dim / 2, cols).swapaxes(1, 2).reshape(w.shape)`.
fn llama_cpp_permute(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let head_dim = values.len() / cols / heads;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(values.len());
    for h in 0..heads {
        for i in 0..half {
            for s in 0..2 {
                let row = h * head_dim + s * half + i;
                out.extend_from_slice(&values[row * cols..(row + 1) * cols]);
            }
        }
    }
    out
}

/// A GGUF of `foreign` as `kiln convert --to gguf` writes it, with weights of type `ty`.
fn write_llama_gguf(foreign: &ForeignModel, ty: GgmlType) -> Vec<u8> {
    gguf_writer::llama_gguf(foreign, ty).unwrap()
}

/// kiln's Q/K row permutation for GGUF equals llama.cpp's NumPy reshape, and reading undoes
/// it (random shapes and values).
#[test]
fn rope_row_permutation_matches_llama_cpp() {
    let mut rng = rng();
    for _ in 0..20 {
        let heads = rng.random_range(1..5);
        let head_dim = 2 * rng.random_range(1..5);
        let cols = rng.random_range(1..7);
        let values: Vec<f32> = (0..heads * head_dim * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let permuted = kiln::interop::gguf::permute_rope_rows(&values, heads, cols);
        assert_eq!(permuted, llama_cpp_permute(&values, heads, cols));
        assert_eq!(
            kiln::interop::gguf::unpermute_rope_rows(&permuted, heads, cols),
            values
        );
    }
}

#[test]
fn gguf_llama_model_imports_exactly() {
    let mut rng = rng();
    let (model, foreign) = random_model(&mut rng);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, write_llama_gguf(&foreign, GgmlType::F32)).unwrap();

    let imported = convert::read(&path).unwrap();
    assert_same_model(&imported, &foreign, "GGUF import (Q/K rows back in order)");
    let loaded = convert::load_model(&path, &cpu(), kiln::kernels::Kernels::Reference).unwrap();
    let tokens: Vec<i64> = (0..13).map(|_| rng.random_range(0..2048)).collect();
    assert_eq!(
        logits(&loaded.loaded.model, &tokens),
        logits(&model, &tokens)
    );
    // The tokenizer rebuilt from the metadata encodes as the original does.
    let original = kiln::data::tokenizer::Tokenizer::from_json(&foreign.tokenizer_json).unwrap();
    let text = "KING LEAR.\nBlow, winds, and crack your cheeks! 1606 [INST] rage, blow! </s>";
    assert_eq!(
        loaded.loaded.tokenizer.encode(text).unwrap(),
        original.encode(text).unwrap()
    );

    // `kiln convert` and `kiln generate` take the GGUF file as it is.
    let out = dir.path().join("kiln");
    kiln_ok(&[
        "convert",
        path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let again = convert::read(&out).unwrap();
    assert_eq!(by_name(&again.tensors), by_name(&foreign.tensors));
    let generated = kiln_ok(&[
        "generate",
        "--device",
        "cpu",
        "--model",
        path.to_str().unwrap(),
        "--prompt",
        "KING",
        "--max-tokens",
        "5",
    ]);
    assert!(String::from_utf8_lossy(&generated.stdout).starts_with("KING"));
}

#[test]
fn quantised_gguf_model_stays_close_to_the_original() {
    let mut rng = rng();
    let (model, foreign) = random_model(&mut rng);
    let tokens: Vec<i64> = (0..9).map(|_| rng.random_range(0..2048)).collect();
    let reference = logits(&model, &tokens);
    let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
    let mut errors = Vec::new();
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4_0] {
        let bytes = write_llama_gguf(&foreign, ty);
        let file = GgufFile::parse(bytes, "q.gguf").unwrap();
        let loaded = kiln::interop::params::import(
            Llama::new(&foreign.model_config, 0, &cpu()),
            file.to_llama().unwrap().tensors,
            Path::new("q.gguf"),
        )
        .unwrap();
        let got = logits(&loaded, &tokens);
        // Relative RMS error of the logits.
        let diff = norm(&mut got.iter().zip(&reference).map(|(a, b)| a - b));
        errors.push(diff / norm(&mut reference.iter().copied()));
    }
    eprintln!("relative logit error, Q8_0 / Q4_1 / Q4_0: {errors:?}");
    // 8-bit is far closer than 4-bit (seen: 0.016-0.036 against 0.24-0.51 over 8 seeds), and
    // neither is exact nor lost.
    assert!(errors[0] < 0.1 && errors[0] > 0.0, "{errors:?}");
    assert!(errors[0] * 3.0 < errors[1].min(errors[2]), "{errors:?}");
    assert!(errors[1] < 0.8 && errors[2] < 0.8, "{errors:?}");
}

#[test]
fn bad_model_files_fail_clearly_and_write_nothing() {
    let mut rng = rng();
    let (_, foreign) = random_model(&mut rng);
    let dir = tempfile::tempdir().unwrap();
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    let hf = dir.path().join("hf");
    convert::write(&foreign, Format::Hf, &hf).unwrap();
    let out = dir.path().join("out");

    // A truncated safetensors file.
    let broken = dir.path().join("truncated");
    copy_dir(&hf, &broken);
    let weights = std::fs::read(hf.join("model.safetensors")).unwrap();
    std::fs::write(
        broken.join("model.safetensors"),
        &weights[..weights.len() * 2 / 3],
    )
    .unwrap();
    kiln_fails(
        &["convert", &arg(&broken), "--out", &arg(&out)],
        &["model.safetensors"],
    );
    assert_nothing_written(&out);

    // A config without a required key, and one whose shape the weights do not have.
    let edit_config = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let d = dir.path().join(name);
        copy_dir(&hf, &d);
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        edit(&mut c);
        std::fs::write(d.join("config.json"), c.to_string()).unwrap();
        d
    };
    let missing = edit_config("missing", &|c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    kiln_fails(
        &["convert", &arg(&missing), "--out", &arg(&out)],
        &["config.json", "missing key hidden_size"],
    );
    let wider = edit_config("wider", &|c| {
        c["intermediate_size"] = (foreign.model_config.ffn_dim + 32).into()
    });
    kiln_fails(
        &["convert", &arg(&wider), "--out", &arg(&out)],
        &["wider: tensor model.layers.0.mlp.", "shape"],
    );
    kiln_fails(
        &["chat", "--device", "cpu", "--model", &arg(&wider)],
        &["shape"],
    );
    assert_nothing_written(&out);

    // A truncated GGUF file, and one with a quantisation type kiln does not read.
    let gguf_bytes = write_llama_gguf(&foreign, GgmlType::Q8_0);
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &gguf_bytes[..gguf_bytes.len() - 100]).unwrap();
    kiln_fails(
        &["convert", &arg(&truncated), "--out", &arg(&out)],
        &["truncated.gguf", "truncated"],
    );
    let header_cut = dir.path().join("header.gguf");
    std::fs::write(&header_cut, &gguf_bytes[..1000]).unwrap();
    kiln_fails(
        &["convert", &arg(&header_cut), "--out", &arg(&out)],
        &["header.gguf", "truncated"],
    );
    let q4k = TensorToWrite {
        name: "token_embd.weight".into(),
        shape: vec![4, 256],
        ggml_type: GgmlType(12),
        bytes: vec![0; 4 * 144],
    };
    let mut metadata = vec![(
        "general.architecture".to_string(),
        Value::String("llama".into()),
    )];
    for (key, v) in [
        ("llama.block_count", 0u32),
        ("llama.context_length", 16),
        ("llama.embedding_length", 256),
        ("llama.feed_forward_length", 16),
        ("llama.attention.head_count", 4),
    ] {
        metadata.push((key.to_string(), Value::U32(v)));
    }
    metadata.push((
        "llama.attention.layer_norm_rms_epsilon".into(),
        Value::F32(1e-5),
    ));
    let unknown = dir.path().join("q4k.gguf");
    std::fs::write(&unknown, gguf_writer::write(&metadata, &[q4k])).unwrap();
    kiln_fails(
        &["convert", &arg(&unknown), "--out", &arg(&out)],
        &["q4k.gguf", "Q4_K", "token_embd.weight"],
    );
    assert_nothing_written(&out);

    // Issue 14, item 13: a tensor with a dimension of 0.
    let zero = TensorToWrite {
        name: "blk.0.attn_q.weight".into(),
        shape: vec![8, 0],
        ggml_type: GgmlType::F32,
        bytes: Vec::new(),
    };
    let zerodim = dir.path().join("zerodim.gguf");
    std::fs::write(&zerodim, gguf_writer::write(&metadata, &[zero])).unwrap();
    kiln_fails(
        &["convert", &arg(&zerodim), "--out", &arg(&out)],
        &["zerodim.gguf", "blk.0.attn_q.weight", "dimension of 0"],
    );
    // Item 10: a Hugging Face directory whose tokenizer has an id past the vocabulary.
    let sparse = dir.path().join("sparse");
    copy_dir(&hf, &sparse);
    std::fs::write(
        sparse.join("tokenizer.json"),
        common::sparse_tokenizer_json(),
    )
    .unwrap();
    kiln_fails(
        &[
            "generate",
            "--device",
            "cpu",
            "--model",
            &arg(&sparse),
            "--prompt",
            "Stop!",
        ],
        &["sparse", "99999", "vocabulary of 2048"],
    );
    assert_nothing_written(&out);

    // An existing output directory is never overwritten.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    kiln_fails(&["convert", &arg(&hf), "--out", &arg(&out)], &["not empty"]);
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// `kiln chat` on the CPU with `input` on its standard input.
fn chat(args: &[&str], model: &Path, input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["chat", "--device", "cpu"])
        .args(args)
        .arg("--model")
        .arg(model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn chat_streams_answers_and_keeps_the_dialogue() {
    let mut rng = rng();
    let (_, foreign) = random_model(&mut rng);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("kiln");
    convert::write(&foreign, Format::Kiln, &ckpt).unwrap();
    let out = chat(
        &["--max-tokens", "4"],
        &ckpt,
        "Hello there\n\n/reset\nAnd again\n/exit\nnever read\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("template: llama2"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // An answer (random text, possibly empty), the reset, another answer, then /exit.
    let (first, second) = stdout
        .split_once("(conversation cleared)\n")
        .expect(&stdout);
    assert!(
        first.ends_with('\n') && second.ends_with('\n'),
        "{stdout:?}"
    );
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let loaded = convert::load_model(&path, &cpu(), kiln::kernels::Kernels::Reference).unwrap();
    let c = &loaded.loaded.model_config;
    assert_eq!(
        (
            c.dim,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.ffn_dim,
            c.vocab_size,
            c.tie_embeddings
        ),
        (576, 30, 9, 3, 1536, 49152, true)
    );
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(loaded.template, ChatTemplate::Chatml);
    let system = loaded.default_system.clone().unwrap();
    assert!(system.contains("SmolLM"), "{system}");
    let params = kiln::infer::generate::SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        min_p: 0.0,
        max_tokens: 30,
    };
    let dialogue = vec![
        Message::system(system),
        Message::user("What is the capital of France?"),
    ];
    let answers = kiln::infer::generate::complete_chat(
        &loaded.loaded.model,
        &loaded.loaded.tokenizer,
        loaded.template,
        &[dialogue],
        &params,
        1,
        &mut kiln::infer::generate::seeded_rng(0),
    )
    .unwrap();
    let answers: Vec<String> = answers.into_iter().map(|a| a.text).collect();
    eprintln!("SmolLM2: {}", answers[0]);
    assert!(answers[0].contains("Paris"), "{}", answers[0]);

    // The same through `kiln chat`, greedy, streaming to stdout.
    // A second turn goes on from the first turn's KV cache; it must answer as a fresh pass
    // over the whole dialogue does.
    let out = chat(
        &["--temperature", "0", "--max-tokens", "30"],
        &path,
        "What is the capital of France?\nAnd of Italy?\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let turns: Vec<&str> = stdout.trim().lines().collect();
    assert_eq!(turns[0], answers[0], "the CLI answers as the library does");
    let second = kiln::infer::generate::complete_chat(
        &loaded.loaded.model,
        &loaded.loaded.tokenizer,
        loaded.template,
        &[vec![
            Message::system(loaded.default_system.clone().unwrap()),
            Message::user("What is the capital of France?"),
            Message::assistant(answers[0].clone()),
            Message::user("And of Italy?"),
        ]],
        &params,
        1,
        &mut kiln::infer::generate::seeded_rng(0),
    )
    .unwrap();
    eprintln!("SmolLM2, second turn: {}", second[0].text);
    assert_eq!(turns[1..].join("\n"), second[0].text);
}

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the others are
/// shifted past 255.
fn bytes_to_unicode() -> Vec<char> {
    let mut map = vec!['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap()
        };
    }
    map
}

/// A deliberately naive byte-level BPE from a GGUF's vocabulary and merges, as llama.cpp's
/// `smollm` pre-tokenizer splits text (each digit alone, then GPT-2's pattern): repeatedly
/// merge the adjacent pair of lowest merge rank.
fn reference_bpe(file: &GgufFile, text: &str) -> Vec<u32> {
    let strings = |key: &str| match file.get(key).unwrap() {
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect::<Vec<_>>(),
        _ => panic!(),
    };
    let tokens = strings("tokenizer.ggml.tokens");
    let ids: BTreeMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let merges = strings("tokenizer.ggml.merges");
    let rank: BTreeMap<(String, String), usize> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (a, b) = m.split_once(' ').unwrap();
            ((a.to_string(), b.to_string()), i)
        })
        .collect();
    let digits = fancy_regex::Regex::new(r"\p{N}").unwrap();
    let gpt2 = fancy_regex::Regex::new(
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    )
    .unwrap();
    let byte_chars = bytes_to_unicode();
    // Split around each digit, keeping the digits.
    let mut pieces = Vec::new();
    let mut last = 0;
    for m in digits.find_iter(text) {
        let m = m.unwrap();
        pieces.push(&text[last..m.start()]);
        pieces.push(m.as_str());
        last = m.end();
    }
    pieces.push(&text[last..]);
    let mut out = Vec::new();
    for piece in pieces.into_iter().filter(|p| !p.is_empty()) {
        for word in gpt2.find_iter(piece) {
            let word = word.unwrap().as_str();
            let mut parts: Vec<String> = word
                .bytes()
                .map(|b| byte_chars[b as usize].to_string())
                .collect();
            loop {
                let best = (0..parts.len().saturating_sub(1))
                    .filter_map(|i| {
                        rank.get(&(parts[i].clone(), parts[i + 1].clone()))
                            .map(|r| (*r, i))
                    })
                    .min();
                let Some((_, i)) = best else { break };
                let merged = format!("{}{}", parts[i], parts[i + 1]);
                parts.splice(i..i + 2, [merged]);
            }
            out.extend(parts.iter().map(|p| ids[p.as_str()]));
        }
    }
    out
}

#[test]
fn smollm2_tokenizer_from_gguf_matches_its_vocabulary() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let file = GgufFile::read(&path).unwrap();
    let tokenizer =
        kiln::data::tokenizer::Tokenizer::from_json(&file.tokenizer_json().unwrap()).unwrap();
    assert_eq!(tokenizer.vocab_size(), 49152);
    for (i, name) in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
    {
        assert_eq!(
            tokenizer.encode(name).unwrap(),
            vec![i as u32],
            "{name} is special"
        );
    }
    for text in [
        "What is the capital of France?",
        "The quick brown fox jumps over the lazy dog.\n\nIt's 2024; prices rose 12.5% (from $1,999).",
        "  Indented code:\n\tfn main() { println!(\"hi\"); }",
        "naïve café — 東京 🎭 don't you'll we've",
    ] {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids, reference_bpe(&file, text), "{text:?}");
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    }
}

/// `kiln convert --to gguf` writes a GGUF file that reads back as the same model (F32
/// exactly, F16 within its rounding), with its tokenizer, chat template and default system
/// prompt; an existing output file is never replaced.
#[test]
fn convert_to_gguf_round_trips() {
    let mut rng = rng();
    let (_, foreign) = random_model(&mut rng);
    let dir = tempfile::tempdir().unwrap();
    let system = "You are a careful assistant";
    let kiln_dir = dir.path().join("kiln");
    let chat = ForeignModel {
        default_system: Some(system.into()),
        ..foreign.clone()
    };
    convert::write(&chat, Format::Kiln, &kiln_dir).unwrap();
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    for (weights, tolerance) in [("f32", 0.0f32), ("f16", 1.0 / 1024.0)] {
        let out = dir.path().join(format!("model-{weights}.gguf"));
        kiln_ok(&[
            "convert",
            &arg(&kiln_dir),
            "--to",
            "gguf",
            "--gguf-weights",
            weights,
            "--out",
            &arg(&out),
        ]);
        let back = convert::read(&out).unwrap();
        assert_eq!(back.format, Format::Gguf);
        // The shape (not init_std or kernels, which no file format stores).
        let shape = kiln::config::ModelConfig {
            init_std: foreign.model_config.init_std,
            kernels: foreign.model_config.kernels,
            ..back.model_config.clone()
        };
        assert_eq!(shape, foreign.model_config);
        assert_eq!(back.template, foreign.template);
        assert_eq!(back.default_system.as_deref(), Some(system));
        let original = by_name(&foreign.tensors);
        for (name, (shape, values)) in by_name(&back.tensors) {
            let (want_shape, want) = &original[&name];
            assert_eq!(&shape, want_shape, "{name}");
            for (g, w) in values.iter().zip(want) {
                // 1-D norms stay F32; F16 rounds to 11 significant bits, and below 2^-14
                // to its subnormal spacing 2^-24 (half of it at most).
                let bound = if shape.len() == 1 || tolerance == 0.0 {
                    0.0
                } else {
                    tolerance * w.abs() + 2f32.powi(-25)
                };
                assert!((g - w).abs() <= bound, "{weights} {name}: {g} vs {w}");
            }
        }
        let text = "KING LEAR.\nBlow, winds, 1606 [INST] rage! </s>";
        let tok = |json: &str| {
            kiln::data::tokenizer::Tokenizer::from_json(json)
                .unwrap()
                .encode(text)
                .unwrap()
        };
        assert_eq!(tok(&back.tokenizer_json), tok(&foreign.tokenizer_json));
        // An existing file is refused and left as it was.
        let before = std::fs::read(&out).unwrap();
        kiln_fails(
            &[
                "convert",
                &arg(&kiln_dir),
                "--to",
                "gguf",
                "--out",
                &arg(&out),
            ],
            &["already exists"],
        );
        assert_eq!(std::fs::read(&out).unwrap(), before);
    }
}
