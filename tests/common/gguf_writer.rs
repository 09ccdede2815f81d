//! A GGUF writer and ggml's reference quantisers: only the tests write GGUF files (llama.cpp's
//! converter is the real writer), so they live here, not in the library.

use half::f16;
use kiln::interop::gguf::{GgmlType, Value};

/// Elements per block of the 32-element quantisation formats.
const QK: usize = 32;
/// GGUF's default alignment of tensor data.
const ALIGNMENT: usize = 32;

/// Quantises `values` (a multiple of 32 long for the block types) as ggml's reference
/// quantisers do.
pub fn quantize(ty: GgmlType, values: &[f32]) -> anyhow::Result<Vec<u8>> {
    if ty.is_blocked() && values.len() % QK != 0 {
        anyhow::bail!("{} needs a multiple of {QK} values", ty.name());
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
        other => anyhow::bail!("kiln cannot write {} tensors", other.name()),
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
    let align = ALIGNMENT;
    let mut out = Vec::new();
    out.extend(b"GGUF");
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
        offset = (offset + t.bytes.len()).next_multiple_of(align);
    }
    out.resize(out.len().next_multiple_of(align), 0);
    for t in tensors {
        out.extend(&t.bytes);
        out.resize(out.len().next_multiple_of(align), 0);
    }
    out
}
