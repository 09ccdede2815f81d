//! GGUF, llama.cpp's model file: reading (v2 and v3: metadata, tensor table, alignment),
//! dequantising F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors to f32, and turning a
//! llama-architecture file into kiln's weights, model shape and tokenizer. A writer with the
//! matching quantisers is here too, so tests can make GGUF files of every supported type.
//!
//! Layout (little-endian): magic `GGUF`, version, tensor count, metadata count; metadata as
//! (key, type, value); tensor infos as (name, n_dims, dims with the fastest-varying first,
//! type, offset into the data section); padding to `general.alignment` (default 32); data.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use half::f16;

use crate::config::ModelConfig;
use crate::interop::checkpoint::NamedTensor;
use crate::interop::convert::{ForeignModel, Format};

pub const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Elements per block of the 32-element quantisation formats.
const QK: usize = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The type's id in a GGUF file.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// An integer of any width, if it is one and non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            // The f32's shortest decimal form: 1e-5 stored as f32 reads as 1e-5, not as
            // 9.99999974e-6, as the model's authors wrote it.
            Value::F32(v) => v.to_string().parse().ok(),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// The ggml tensor types kiln knows by name; only some of them it can dequantise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const BF16: GgmlType = GgmlType(30);

    pub fn name(self) -> String {
        const NAMES: [(u32, &str); 31] = [
            (0, "F32"),
            (1, "F16"),
            (2, "Q4_0"),
            (3, "Q4_1"),
            (6, "Q5_0"),
            (7, "Q5_1"),
            (8, "Q8_0"),
            (9, "Q8_1"),
            (10, "Q2_K"),
            (11, "Q3_K"),
            (12, "Q4_K"),
            (13, "Q5_K"),
            (14, "Q6_K"),
            (15, "Q8_K"),
            (16, "IQ2_XXS"),
            (17, "IQ2_XS"),
            (18, "IQ3_XXS"),
            (19, "IQ1_S"),
            (20, "IQ4_NL"),
            (21, "IQ3_S"),
            (22, "IQ2_S"),
            (23, "IQ4_XS"),
            (24, "I8"),
            (25, "I16"),
            (26, "I32"),
            (27, "I64"),
            (28, "F64"),
            (29, "IQ1_M"),
            (30, "BF16"),
            (34, "TQ1_0"),
            (35, "TQ2_0"),
        ];
        NAMES
            .iter()
            .find(|(id, _)| *id == self.0)
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| format!("type {}", self.0))
    }

    /// Bytes taken by `elements` values of this type, for the types kiln reads.
    fn size_of(self, elements: usize) -> Option<usize> {
        match self {
            GgmlType::F32 => Some(elements * 4),
            GgmlType::F16 | GgmlType::BF16 => Some(elements * 2),
            // Per block: an f16 scale (and an f16 minimum for Q4_1), then the values.
            GgmlType::Q8_0 => Some(elements / QK * (2 + QK)),
            GgmlType::Q4_0 => Some(elements / QK * (2 + QK / 2)),
            GgmlType::Q4_1 => Some(elements / QK * (4 + QK / 2)),
            _ => None,
        }
    }

    /// Whether values come in blocks of 32 (the quantised types).
    pub fn is_blocked(self) -> bool {
        matches!(self, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1)
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: the fastest-varying dimension first (`[in, out]` for a linear weight).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset into the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Row-major shape, slowest dimension first (`[out, in]`), as kiln and PyTorch store it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A GGUF file read into memory.
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data: Vec<u8>,
    data_start: usize,
    path: String,
}

/// Reads little-endian values from a byte slice, failing with the offset on truncation.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                anyhow!(
                    "truncated: needs {n} more bytes at offset {} of {}",
                    self.pos,
                    self.bytes.len()
                )
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count that must fit in what is left of the file (each item takes at least a byte),
    /// so a corrupted length fails here instead of allocating without bound.
    fn count(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        if n > (self.bytes.len() - self.pos) as u64 {
            bail!(
                "truncated or corrupted: {what} count {n} at offset {} exceeds the {} bytes left",
                self.pos - 8,
                self.bytes.len() - self.pos
            );
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let len = self.count("string length")?;
        let at = self.pos;
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| anyhow!("string at offset {at} is not UTF-8"))
    }

    fn value(&mut self, type_id: u32, depth: usize) -> Result<Value> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("boolean byte {b} at offset {}", self.pos - 1),
            },
            8 => Value::String(self.string()?),
            9 if depth < 4 => {
                let item_type = self.u32()?;
                let n = self.count("array")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_type, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => bail!("unknown metadata type {other} at offset {}", self.pos - 4),
        })
    }
}

impl GgufFile {
    pub fn read(path: &Path) -> Result<Self> {
        let data = std::fs::read(path)
            .map_err(|e| anyhow!("cannot read GGUF file {}: {e}", path.display()))?;
        Self::parse(data, &path.display().to_string())
    }

    /// Parses a whole file held in memory; `path` names it in errors.
    pub fn parse(data: Vec<u8>, path: &str) -> Result<Self> {
        let fail = |e: anyhow::Error| anyhow!("{path}: not a valid GGUF file: {e}");
        let (version, metadata, tensors, data_start) = Self::parse_header(&data).map_err(fail)?;
        let file = Self {
            version,
            metadata,
            tensors,
            data,
            data_start,
            path: path.to_string(),
        };
        file.check_tensor_bounds().map_err(fail)?;
        Ok(file)
    }

    #[allow(clippy::type_complexity)]
    fn parse_header(
        bytes: &[u8],
    ) -> Result<(u32, BTreeMap<String, Value>, Vec<TensorInfo>, usize)> {
        let mut c = Cursor { bytes, pos: 0 };
        if bytes.len() < 4 || &bytes[..4] != MAGIC {
            bail!("it does not start with the magic bytes GGUF");
        }
        c.pos = 4;
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            bail!("version {version} is not supported (kiln reads GGUF v2 and v3)");
        }
        let tensor_count = c.count("tensor")?;
        let kv_count = c.count("metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = c.string()?;
            let type_id = c.u32()?;
            let value = c
                .value(type_id, 0)
                .map_err(|e| anyhow!("metadata {key}: {e}"))?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = c.string()?;
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > 4 {
                bail!("tensor {name} has {n_dims} dimensions");
            }
            let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            // Sizes are bounded here, once, so no later reader divides by zero or wraps.
            if dims.contains(&0) {
                bail!("tensor {name} has a dimension of 0 ({dims:?})");
            }
            let elements = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
            if elements.is_none_or(|n| n > (isize::MAX as u64) / 4) {
                bail!("tensor {name} has dimensions {dims:?}, too many values for memory");
            }
            let ggml_type = GgmlType(c.u32()?);
            let offset = c.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| anyhow!("general.alignment {v:?} is not a power of two"))?,
        };
        let data_start = (c.pos as u64).next_multiple_of(alignment) as usize;
        if data_start > bytes.len() {
            bail!("truncated before the tensor data");
        }
        for t in &tensors {
            if t.offset % alignment != 0 {
                bail!(
                    "tensor {} is at offset {}, not a multiple of the alignment {alignment}",
                    t.name,
                    t.offset
                );
            }
        }
        Ok((version, metadata, tensors, data_start))
    }

    /// Every tensor of a supported type lies inside the file: a truncated file fails here,
    /// before anything is converted.
    fn check_tensor_bounds(&self) -> Result<()> {
        for t in &self.tensors {
            let Some(size) = t.ggml_type.size_of(t.elements()) else {
                continue;
            };
            let end = self.data_start as u64 + t.offset + size as u64;
            if end > self.data.len() as u64 {
                bail!(
                    "truncated: tensor {} ends at byte {end}, the file has {}",
                    t.name,
                    self.data.len()
                );
            }
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| anyhow!("{}: metadata key {key} is missing", self.path))
    }

    fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| anyhow!("{}: metadata {key} is {v:?}, not an integer", self.path))
    }

    fn string_array(&self, key: &str) -> Result<Vec<&str>> {
        match self.require(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| anyhow!("{}: {key} holds a non-string", self.path))
                })
                .collect(),
            _ => bail!("{}: metadata {key} is not an array", self.path),
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor's values as f32, row-major in [`TensorInfo::shape`].
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let elements = info.elements();
        let size = info.ggml_type.size_of(elements).ok_or_else(|| {
            anyhow!(
                "{}: tensor {} has quantisation type {}, which kiln cannot read (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                self.path,
                info.name,
                info.ggml_type.name()
            )
        })?;
        if info.ggml_type.is_blocked() && !(info.dims[0] as usize).is_multiple_of(QK) {
            bail!(
                "{}: tensor {} has rows of {} values, not a multiple of the block size {QK}",
                self.path,
                info.name,
                info.dims[0]
            );
        }
        let start = self.data_start + info.offset as usize;
        Ok(dequantize(
            info.ggml_type,
            &self.data[start..start + size],
            elements,
        ))
    }
}

fn read_f16(bytes: &[u8]) -> f32 {
    f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

/// Dequantises `elements` values of `ty` from `bytes` (whose size the caller checked).
fn dequantize(ty: GgmlType, bytes: &[u8], elements: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(elements);
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(read_f16)),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)),
        ),
        // x = d * q, q a signed byte.
        GgmlType::Q8_0 => {
            for block in bytes.chunks_exact(2 + QK) {
                let d = read_f16(block);
                out.extend(block[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        // x = d * (q - 8); byte j holds value j in its low nibble and value j + 16 in its high.
        GgmlType::Q4_0 => {
            for block in bytes.chunks_exact(2 + QK / 2) {
                let d = read_f16(block);
                let qs = &block[2..];
                out.extend(qs.iter().map(|&b| d * ((b & 0x0f) as i32 - 8) as f32));
                out.extend(qs.iter().map(|&b| d * ((b >> 4) as i32 - 8) as f32));
            }
        }
        // x = d * q + m, same nibble order as Q4_0.
        GgmlType::Q4_1 => {
            for block in bytes.chunks_exact(4 + QK / 2) {
                let (d, m) = (read_f16(block), read_f16(&block[2..]));
                let qs = &block[4..];
                out.extend(qs.iter().map(|&b| d * (b & 0x0f) as f32 + m));
                out.extend(qs.iter().map(|&b| d * (b >> 4) as f32 + m));
            }
        }
        _ => unreachable!("size_of admits only the types above"),
    }
    out
}

/// Whole-model tensors: (GGUF name, kiln/Hugging Face name).
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Per-layer tensors, after `blk.N.` and `model.layers.N.`: (GGUF part, kiln part).
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// A tensor's name in the other naming: GGUF to kiln (Hugging Face) with `to_kiln`, else
/// kiln to GGUF. `None` for a name no Llama tensor has.
fn rename(name: &str, to_kiln: bool) -> Option<String> {
    let pick = |(gguf, kiln): (&'static str, &'static str)| {
        if to_kiln { (gguf, kiln) } else { (kiln, gguf) }
    };
    if let Some((_, to)) = MODEL_TENSORS
        .map(pick)
        .into_iter()
        .find(|(from, _)| *from == name)
    {
        return Some(to.to_string());
    }
    let (from_prefix, to_prefix) = pick(("blk.", "model.layers."));
    let (layer, part) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, to) = LAYER_TENSORS
        .map(pick)
        .into_iter()
        .find(|(from, _)| *from == part)?;
    Some(format!("{to_prefix}{layer}.{to}"))
}

/// The kiln (Hugging Face) name of a GGUF tensor.
pub fn kiln_name(gguf_name: &str) -> Option<String> {
    rename(gguf_name, true)
}

/// The GGUF name of a kiln (Hugging Face) tensor.
pub fn gguf_name(kiln_name: &str) -> Option<String> {
    rename(kiln_name, false)
}

/// Reorders the rows of a Q or K projection (`[heads * head_dim, dim]`) from GGUF's order to
/// the rotate-half order kiln and Hugging Face use. llama.cpp's converter interleaves each
/// head's rows (row `s * head_dim/2 + i` moves to `2i + s`) so that RoPE rotates adjacent
/// pairs, as Meta's original code does; this undoes it.
pub fn unpermute_rope_rows(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    move_rope_rows(values, heads, cols, false)
}

/// The inverse of [`unpermute_rope_rows`]: llama.cpp's converter's `permute`, for writing.
pub fn permute_rope_rows(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    move_rope_rows(values, heads, cols, true)
}

/// Row `h * head_dim + s * head_dim/2 + i` (rotate-half order) is row `h * head_dim + 2i + s`
/// in GGUF's interleaved order; `to_gguf` picks the direction.
fn move_rope_rows(values: &[f32], heads: usize, cols: usize, to_gguf: bool) -> Vec<f32> {
    let head_dim = values.len() / cols / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let rotate_half = h * head_dim + s * half + i;
                let interleaved = h * head_dim + 2 * i + s;
                let (to, from) = if to_gguf {
                    (interleaved, rotate_half)
                } else {
                    (rotate_half, interleaved)
                };
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

impl GgufFile {
    /// The model shape from `llama.*` metadata; fails naming the key that is missing or
    /// unsupported.
    pub fn llama_config(&self) -> Result<ModelConfig> {
        let arch = self.require("general.architecture")?;
        if arch.as_str() != Some("llama") {
            bail!(
                "{}: general.architecture is {arch:?}; kiln reads llama-architecture models",
                self.path
            );
        }
        if let Some(kind) = self.get("llama.rope.scaling.type").and_then(Value::as_str)
            && kind != "none"
        {
            bail!(
                "{}: llama.rope.scaling.type {kind} is not supported",
                self.path
            );
        }
        let dim = self.require_u64("llama.embedding_length")? as usize;
        let n_heads = self.require_u64("llama.attention.head_count")? as usize;
        let n_kv_heads = match self.get("llama.attention.head_count_kv") {
            Some(_) => self.require_u64("llama.attention.head_count_kv")? as usize,
            None => n_heads,
        };
        let embedding = self
            .tensor("token_embd.weight")
            .ok_or_else(|| anyhow!("{}: tensor token_embd.weight is missing", self.path))?;
        let vocab_size = embedding.dims.get(1).copied().unwrap_or(0) as usize;
        let config = ModelConfig {
            dim,
            n_layers: self.require_u64("llama.block_count")? as usize,
            n_heads,
            n_kv_heads,
            ffn_dim: self.require_u64("llama.feed_forward_length")? as usize,
            vocab_size,
            max_seq_len: self.require_u64("llama.context_length")? as usize,
            norm_eps: self
                .require("llama.attention.layer_norm_rms_epsilon")?
                .as_f64()
                .ok_or_else(|| anyhow!("{}: layer_norm_rms_epsilon is not a number", self.path))?,
            rope_theta: self
                .get("llama.rope.freq_base")
                .and_then(Value::as_f64)
                .unwrap_or(10000.0),
            tie_embeddings: self.tensor("output.weight").is_none(),
            ..ModelConfig::default()
        };
        if n_heads == 0
            || !dim.is_multiple_of(n_heads)
            || n_kv_heads == 0
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            bail!(
                "{}: {n_heads} heads and {n_kv_heads} KV heads do not fit dimension {dim}",
                self.path
            );
        }
        if let Some(rope_dims) = self.get("llama.rope.dimension_count")
            && rope_dims.as_u64() != Some(config.head_dim() as u64)
        {
            bail!(
                "{}: llama.rope.dimension_count {rope_dims:?} differs from the head dimension {} (partial RoPE is not supported)",
                self.path,
                config.head_dim()
            );
        }
        Ok(config)
    }

    /// The whole model: shape, dequantised weights under kiln's names, and tokenizer.
    pub fn to_llama(&self) -> Result<ForeignModel> {
        let model_config = self.llama_config()?;
        let mut tensors = Vec::with_capacity(self.tensors.len());
        for info in &self.tensors {
            let name = kiln_name(&info.name).ok_or_else(|| {
                anyhow!(
                    "{}: tensor {} has no counterpart in a Llama model",
                    self.path,
                    info.name
                )
            })?;
            let shape = info.shape();
            let mut values = self.dequantize(info)?;
            let cols = *shape.last().expect("at least one dimension");
            if name.ends_with("q_proj.weight") {
                values = unpermute_rope_rows(&values, model_config.n_heads, cols);
            } else if name.ends_with("k_proj.weight") {
                values = unpermute_rope_rows(&values, model_config.n_kv_heads, cols);
            }
            tensors.push(NamedTensor {
                name,
                shape,
                values,
            });
        }
        Ok(ForeignModel::new(
            Format::Gguf,
            Path::new(&self.path),
            model_config,
            tensors,
            self.tokenizer_json()?,
            self.get("tokenizer.chat_template").and_then(Value::as_str),
        ))
    }

    /// A Hugging Face `tokenizer.json` rebuilt from `tokenizer.ggml.*`: byte-level BPE with
    /// the file's vocabulary and merges, its control tokens as special tokens, and the
    /// pre-tokenizer that `tokenizer.ggml.pre` names.
    pub fn tokenizer_json(&self) -> Result<String> {
        let model = self
            .require("tokenizer.ggml.model")?
            .as_str()
            .unwrap_or_default();
        if model != "gpt2" {
            bail!(
                "{}: tokenizer.ggml.model is {model:?}; kiln rebuilds byte-level BPE (\"gpt2\") tokenizers only",
                self.path
            );
        }
        let pre = self
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let split_digits = match pre {
            "default" | "gpt2" | "gpt-2" => false,
            "smollm" => true,
            other => bail!(
                "{}: tokenizer.ggml.pre {other:?} is not supported (known: default, gpt-2, smollm)",
                self.path
            ),
        };
        let tokens = self.string_array("tokenizer.ggml.tokens")?;
        let merges = self.string_array("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match self.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::I32(t) => *t as i64,
                    other => other.as_u64().map_or(1, |t| t as i64),
                })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        // llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte.
        let specials: Vec<(u32, &str)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| (i as u32, *t))
            .collect();
        crate::data::tokenizer::byte_level_bpe_json(&tokens, &merges, &specials, split_digits)
            .map_err(|e| anyhow!("{}: cannot rebuild the tokenizer: {e}", self.path))
    }
}
