//! Writing llama.cpp's GGUF: a Llama model as llama.cpp's converter (`convert_hf_to_gguf.py`)
//! writes it: GGUF tensor names, Q/K rows interleaved for llama.cpp's RoPE, `llama.*` shape
//! metadata, the byte-level BPE tokenizer as `tokenizer.ggml.*`, and the chat template.
//! Weights are F32, F16 or Q8_0 (ggml's reference quantiser); norms stay F32, as llama.cpp
//! keeps them.

use anyhow::{Result, anyhow, bail};
use half::f16;
use serde_json::Value as Json;

use super::convert::ForeignModel;
use super::gguf::{GgmlType, Value, gguf_name, permute_rope_rows};

/// Elements per block of the 32-element quantisation formats.
const QK: usize = 32;
/// GGUF's default alignment of tensor data.
const ALIGNMENT: usize = 32;

/// Quantises `values` (a multiple of 32 long for the block types) as ggml's reference
/// quantisers do.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    if ty.is_blocked() && !values.len().is_multiple_of(QK) {
        bail!("{} needs a multiple of {QK} values", ty.name());
    }
    let mut out = Vec::new();
    let f16_bytes = |v: f32| f16::from_f32(v).to_le_bytes();
    match ty {
        GgmlType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => values.iter().for_each(|&v| out.extend(f16_bytes(v))),
        GgmlType::BF16 => values
            .iter()
            .for_each(|v| out.extend(((v.to_bits() >> 16) as u16).to_le_bytes())),
        GgmlType::Q8_0 => {
            for block in values.chunks_exact(QK) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend(f16_bytes(d));
                out.extend(block.iter().map(|v| (v * inv).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for block in values.chunks_exact(QK) {
                // The value of largest magnitude maps to -8, keeping its sign.
                let max = block
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                let q = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
                out.extend(f16_bytes(d));
                out.extend((0..QK / 2).map(|j| q(block[j]) | (q(block[j + QK / 2]) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for block in values.chunks_exact(QK) {
                let min = block.iter().cloned().fold(f32::INFINITY, f32::min);
                let max = block.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                let q = |v: f32| (((v - min) * inv + 0.5) as i32).clamp(0, 15) as u8;
                out.extend(f16_bytes(d));
                out.extend(f16_bytes(min));
                out.extend((0..QK / 2).map(|j| q(block[j]) | (q(block[j + QK / 2]) << 4)));
            }
        }
        other => bail!("kiln cannot write {} tensors", other.name()),
    }
    Ok(out)
}

/// A tensor to write: its row-major shape and already-encoded bytes.
pub struct TensorToWrite {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    pub bytes: Vec<u8>,
}

/// Serialises a GGUF v3 file with the default alignment.
pub fn write(metadata: &[(String, Value)], tensors: &[TensorToWrite]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(s) => string(out, s),
            Value::Array(items) => {
                let item_type = items.first().map_or(4, Value::type_id);
                out.extend(item_type.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|i| value(out, i));
            }
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
        }
    }
    let mut out = Vec::new();
    out.extend(super::gguf::MAGIC);
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, v) in metadata {
        string(&mut out, key);
        out.extend(v.type_id().to_le_bytes());
        value(&mut out, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        string(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        t.shape
            .iter()
            .rev()
            .for_each(|&d| out.extend((d as u64).to_le_bytes()));
        out.extend(t.ggml_type.0.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset = (offset + t.bytes.len()).next_multiple_of(ALIGNMENT);
    }
    out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
    for t in tensors {
        out.extend(&t.bytes);
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
    }
    out
}

/// The weight types `kiln convert --to gguf` writes (llama.cpp's `--outtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufWeights {
    F32,
    /// llama.cpp's default.
    F16,
    #[value(name = "q8_0")]
    Q8_0,
}

impl GgufWeights {
    pub fn ggml_type(self) -> GgmlType {
        match self {
            GgufWeights::F32 => GgmlType::F32,
            GgufWeights::F16 => GgmlType::F16,
            GgufWeights::Q8_0 => GgmlType::Q8_0,
        }
    }
}

/// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`) of a file whose weights are `ty`.
fn file_type(ty: GgmlType) -> Result<u32> {
    Ok(match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::BF16 => 32,
        other => bail!("kiln cannot write {} weights", other.name()),
    })
}

/// `model` as a llama GGUF file with 2-D weights of type `weights` (any type [`quantize`]
/// writes; the command offers F32, F16 and Q8_0). A block-quantised tensor whose rows are
/// not a multiple of 32 values is written as F16 instead, as llama.cpp's converter does.
pub fn llama_gguf(model: &ForeignModel, weights: GgmlType) -> Result<Vec<u8>> {
    let c = &model.model_config;
    let u32_of = |key: &str, v: usize| -> Result<(String, Value)> {
        let v = u32::try_from(v).map_err(|_| anyhow!("{key} = {v} does not fit GGUF's u32"))?;
        Ok((key.to_string(), Value::U32(v)))
    };
    let name = model
        .path
        .file_stem()
        .map_or("kiln".into(), |s| s.to_string_lossy().to_string());
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("general.name".to_string(), Value::String(name)),
        (
            "general.file_type".to_string(),
            Value::U32(file_type(weights)?),
        ),
        u32_of("llama.block_count", c.n_layers)?,
        u32_of("llama.context_length", c.max_seq_len)?,
        u32_of("llama.embedding_length", c.dim)?,
        u32_of("llama.feed_forward_length", c.ffn_dim)?,
        u32_of("llama.attention.head_count", c.n_heads)?,
        u32_of("llama.attention.head_count_kv", c.n_kv_heads)?,
        u32_of("llama.rope.dimension_count", c.head_dim())?,
        u32_of("llama.vocab_size", c.vocab_size)?,
        (
            "llama.rope.freq_base".to_string(),
            Value::F32(c.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".to_string(),
            Value::F32(c.norm_eps as f32),
        ),
    ];
    metadata.extend(tokenizer_metadata(model)?);
    metadata.push((
        "tokenizer.chat_template".to_string(),
        Value::String(model.template.jinja(model.default_system.as_deref())),
    ));
    let mut tensors = Vec::with_capacity(model.tensors.len());
    for t in &model.tensors {
        let name =
            gguf_name(&t.name).ok_or_else(|| anyhow!("tensor {} has no GGUF name", t.name))?;
        let cols = *t.shape.last().expect("a tensor has a dimension");
        let values = if name.ends_with("attn_q.weight") {
            permute_rope_rows(&t.values, c.n_heads, cols)
        } else if name.ends_with("attn_k.weight") {
            permute_rope_rows(&t.values, c.n_kv_heads, cols)
        } else {
            t.values.clone()
        };
        let ggml_type = match weights {
            _ if t.shape.len() == 1 => GgmlType::F32,
            ty if ty.is_blocked() && cols % QK != 0 => GgmlType::F16,
            ty => ty,
        };
        tensors.push(TensorToWrite {
            name,
            shape: t.shape.clone(),
            ggml_type,
            bytes: quantize(ggml_type, &values)?,
        });
    }
    Ok(write(&metadata, &tensors))
}

/// `tokenizer.ggml.*` for a byte-level BPE `tokenizer.json` (kiln's own, SmolLM2's, GPT-2's):
/// tokens by id (padded to the model's vocabulary with unused `[PAD{id}]` entries, as
/// llama.cpp's converter does), token types, merges, the pre-tokenizer, and the special ids.
/// The end-of-sequence id is the chat template's stop token (`<|im_end|>` for ChatML, as
/// SmolLM2's own GGUF has it), so that llama.cpp stops where kiln does.
fn tokenizer_metadata(model: &ForeignModel) -> Result<Vec<(String, Value)>> {
    let (tokenizer_json, vocab_size) = (&model.tokenizer_json, model.model_config.vocab_size);
    let json: Json = serde_json::from_str(tokenizer_json)
        .map_err(|e| anyhow!("the tokenizer is not valid JSON: {e}"))?;
    let bpe = &json["model"];
    let pre = json["pre_tokenizer"].to_string();
    if bpe["type"] != "BPE" || !pre.contains("\"ByteLevel\"") {
        bail!(
            "kiln writes GGUF for byte-level BPE tokenizers (kiln's own, SmolLM2's); this one is a {} model with pre-tokenizer {}",
            bpe["type"],
            json["pre_tokenizer"]["type"]
        );
    }
    // llama.cpp's name for "byte-level BPE that splits every digit" is SmolLM's.
    let splits_digits = pre.contains("\"Digits\"") && pre.contains("\"individual_digits\":true");
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    // llama.cpp's token types: 1 normal, 3 control (special), 4 user-defined, 5 unused.
    let mut place = |token: &str, id: u64, kind: i32| -> Result<()> {
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| anyhow!("token {token:?} has id {id}, past the vocabulary"))?;
        *slot = Some(token.to_string());
        types[id as usize] = kind;
        Ok(())
    };
    for (token, id) in bpe["vocab"].as_object().into_iter().flatten() {
        place(token, id.as_u64().unwrap_or(u64::MAX), 1)?;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let token = added["content"].as_str().unwrap_or_default();
        let id = added["id"].as_u64().unwrap_or(u64::MAX);
        let special = added["special"].as_bool().unwrap_or(false);
        place(token, id, if special { 3 } else { 4 })?;
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, token)| {
            Value::String(token.unwrap_or_else(|| {
                types[id] = 5;
                format!("[PAD{id}]")
            }))
        })
        .collect();
    let merges: Vec<Value> = bpe["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Value::String(s.clone()),
            pair => Value::String(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
        })
        .collect();
    let tokenizer = crate::data::tokenizer::Tokenizer::from_json(tokenizer_json)?;
    // ChatML turns open with `<|im_start|>`, SmolLM2's beginning-of-sequence token.
    let bos = match model.template {
        crate::data::chat::ChatTemplate::Chatml => tokenizer.token_id("<|im_start|>"),
        crate::data::chat::ChatTemplate::Llama2 => None,
    }
    .unwrap_or(tokenizer.bos_id);
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String(if splits_digits { "smollm" } else { "gpt-2" }.into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(bos)),
        (
            "tokenizer.ggml.eos_token_id".to_string(),
            Value::U32(model.template.stop_token(&tokenizer)?),
        ),
    ];
    if let Some(pad) = tokenizer.pad_id {
        out.push((
            "tokenizer.ggml.padding_token_id".to_string(),
            Value::U32(pad),
        ));
    }
    Ok(out)
}
