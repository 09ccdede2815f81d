//! Hugging Face's Llama layout, both ways: a directory with `config.json`, `model.safetensors`
//! (or shards listed by `model.safetensors.index.json`), `tokenizer.json` and, optionally,
//! `tokenizer_config.json` with the chat template.
//!
//! kiln's parameters already carry Hugging Face's names, and kiln applies RoPE in Hugging
//! Face's rotate-half layout, so the Q/K rows need no permutation in either direction (the
//! permutation that Hugging Face's `convert_llama_weights_to_hf.py` applies turns Meta's
//! interleaved layout into this one; GGUF files keep Meta's and are permuted in `gguf.rs`).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use serde_json::{Value, json};

use crate::config::ModelConfig;
use crate::interop::checkpoint;
use crate::interop::convert::{ForeignModel, Format};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Whether `dir` looks like a Hugging Face model directory.
pub fn is_hf_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

/// The model shape from a Llama `config.json`; fails naming the missing or unsupported key.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))?;
    let at = |key: &str| config.get(key).filter(|v| !v.is_null());
    let int = |key: &str| -> Result<usize> {
        let v = at(key).ok_or_else(|| anyhow!("{}: missing key {key}", path.display()))?;
        v.as_u64().map(|n| n as usize).ok_or_else(|| {
            anyhow!(
                "{}: {key} is {v}, not a non-negative integer",
                path.display()
            )
        })
    };
    let float = |key: &str, default: Option<f64>| -> Result<f64> {
        match at(key) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| anyhow!("{}: {key} is {v}, not a number", path.display())),
            None => default.ok_or_else(|| anyhow!("{}: missing key {key}", path.display())),
        }
    };
    if let Some(kind) = at("model_type")
        && kind != "llama"
    {
        bail!(
            "{}: model_type is {kind}; kiln reads Llama models (\"llama\")",
            path.display()
        );
    }
    for (key, expected) in [
        ("hidden_act", json!("silu")),
        ("attention_bias", json!(false)),
        ("mlp_bias", json!(false)),
    ] {
        if let Some(v) = at(key)
            && *v != expected
        {
            bail!(
                "{}: {key} is {v}; kiln's Llama supports only {expected}",
                path.display()
            );
        }
    }
    if let Some(v) = at("rope_scaling") {
        bail!(
            "{}: rope_scaling {v} is not supported (kiln uses plain RoPE)",
            path.display()
        );
    }
    let n_heads = int("num_attention_heads")?;
    let model = ModelConfig {
        dim: int("hidden_size")?,
        n_layers: int("num_hidden_layers")?,
        n_heads,
        n_kv_heads: match at("num_key_value_heads") {
            Some(_) => int("num_key_value_heads")?,
            None => n_heads,
        },
        ffn_dim: int("intermediate_size")?,
        vocab_size: int("vocab_size")?,
        max_seq_len: int("max_position_embeddings")?,
        norm_eps: float("rms_norm_eps", None)?,
        rope_theta: float("rope_theta", Some(10000.0))?,
        tie_embeddings: match at("tie_word_embeddings") {
            Some(v) => v.as_bool().ok_or_else(|| {
                anyhow!(
                    "{}: tie_word_embeddings is {v}, not a boolean",
                    path.display()
                )
            })?,
            None => false,
        },
        ..ModelConfig::default()
    };
    if model.n_heads == 0
        || !model.dim.is_multiple_of(model.n_heads)
        || model.n_kv_heads == 0
        || !model.n_heads.is_multiple_of(model.n_kv_heads)
    {
        bail!(
            "{}: {} heads and {} KV heads do not fit hidden_size {}",
            path.display(),
            model.n_heads,
            model.n_kv_heads,
            model.dim
        );
    }
    if at("head_dim").is_some() && int("head_dim")? != model.head_dim() {
        bail!(
            "{}: head_dim {} differs from hidden_size / num_attention_heads = {}",
            path.display(),
            int("head_dim")?,
            model.head_dim()
        );
    }
    Ok(model)
}

/// The weight files of `dir`: the shards its index lists, or the single `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| anyhow!("cannot read {}: {e}", index.display()))?;
        let parsed: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: invalid JSON: {e}", index.display()))?;
        let map = parsed
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{}: missing key weight_map", index.display()))?;
        let mut shards = BTreeSet::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .filter(|f| !f.contains('/') && !f.contains(".."))
                .ok_or_else(|| {
                    anyhow!("{}: weight_map.{name} is not a file name", index.display())
                })?;
            shards.insert(file.to_string());
        }
        return Ok(shards.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: neither {WEIGHTS_FILE} nor {INDEX_FILE} is there",
        dir.display()
    )
}

/// Reads a Hugging Face Llama directory; f16 and bf16 weights are widened to f32.
pub fn read(dir: &Path) -> Result<ForeignModel> {
    let model_config = read_config(dir)?;
    let mut tensors = Vec::new();
    let mut seen = BTreeSet::new();
    for file in weight_files(dir)? {
        let bytes =
            std::fs::read(&file).map_err(|e| anyhow!("cannot read {}: {e}", file.display()))?;
        for tensor in checkpoint::decode_safetensors(&bytes, &file)? {
            // Buffers some exports include, and a tied head some exports write anyway.
            if tensor.name.ends_with("rotary_emb.inv_freq")
                || (model_config.tie_embeddings && tensor.name == "lm_head.weight")
            {
                continue;
            }
            if !seen.insert(tensor.name.clone()) {
                bail!("{}: tensor {} appears twice", file.display(), tensor.name);
            }
            tensors.push(tensor);
        }
    }
    let tokenizer_path = dir.join(TOKENIZER_FILE);
    let tokenizer_json = std::fs::read_to_string(&tokenizer_path)
        .map_err(|e| anyhow!("cannot read {}: {e}", tokenizer_path.display()))?;
    let chat_template = read_chat_template(dir)?;
    Ok(ForeignModel::new(
        Format::Hf,
        dir,
        model_config,
        tensors,
        tokenizer_json,
        chat_template.as_deref(),
    ))
}

/// `chat_template` of `tokenizer_config.json`, if the file and the key are there.
fn read_chat_template(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(TOKENIZER_CONFIG_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let parsed: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))?;
    Ok(parsed
        .get("chat_template")
        .and_then(Value::as_str)
        .map(str::to_string))
}

/// Writes `model` as a Hugging Face Llama directory at `dir`, which must not exist (or be
/// empty). Files go to a temporary directory beside it that is renamed at the end, so a
/// failure leaves nothing behind.
pub fn write(model: &ForeignModel, dir: &Path) -> Result<()> {
    let tokenizer = crate::data::tokenizer::Tokenizer::from_json(&model.tokenizer_json)?;
    let config = &model.model_config;
    let token = |id: u32| tokenizer.decode_with_special(&[id]).unwrap_or_default();
    let (bos, eos) = (tokenizer.bos_id, model.template.stop_token(&tokenizer)?);
    let config_json = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim(),
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": null,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "pretraining_tp": 1,
        "use_cache": true,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    });
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(bos),
        "eos_token": token(eos),
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": false,
        "chat_template": model.template.jinja(model.default_system.as_deref()),
    });
    if let Some(pad) = tokenizer.pad_id {
        tokenizer_config["pad_token"] = json!(token(pad));
    }
    let generation_config = json!({"bos_token_id": bos, "eos_token_id": eos});
    let mut metadata = std::collections::HashMap::new();
    // transformers refuses safetensors files without this marker.
    metadata.insert("format".to_string(), "pt".to_string());
    let weights = checkpoint::encode_safetensors_with(&model.tensors, Some(metadata))?;
    let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("JSON values serialise");
    let files: Vec<(&str, Vec<u8>)> = vec![
        (CONFIG_FILE, pretty(&config_json).into_bytes()),
        (WEIGHTS_FILE, weights),
        (TOKENIZER_FILE, model.tokenizer_json.clone().into_bytes()),
        (
            TOKENIZER_CONFIG_FILE,
            pretty(&tokenizer_config).into_bytes(),
        ),
        (
            GENERATION_CONFIG_FILE,
            pretty(&generation_config).into_bytes(),
        ),
    ];
    checkpoint::write_dir_atomic(dir, &files)
}
