//! Checkpoints: a directory per step holding the model, the optimizer state, the training state
//! (step, data cursor, seeds) and the tokenizer, described by a manifest with SHA-256 checksums.
//!
//! A checkpoint is written into a hidden temporary directory, every file fsynced, and then
//! renamed into place: a crash at any instant leaves either the old set of checkpoints or the
//! old set plus the new one, never a half-written checkpoint under a real name.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const FORMAT: &str = "kiln-checkpoint-1";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const CONFIG_FILE: &str = "config.toml";
pub const MANIFEST_FILE: &str = "manifest.json";

/// A tensor by name, as stored on disk (f32, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    /// The run's configuration, as TOML.
    pub config: String,
    /// Checksums of every other file of the checkpoint.
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    // A bare file name's parent is "", which cannot be opened to sync: it is ".".
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("cannot write {}: {e}", path.display())
    })
}

/// Writes `records` to `path` as JSON lines, atomically ([`write_atomic`]).
pub fn write_jsonl_atomic<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut text = String::new();
    for record in records {
        text.push_str(&serde_json::to_string(record)?);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn encode_safetensors(tensors: &[NamedTensor]) -> Result<Vec<u8>> {
    encode_safetensors_with(tensors, None)
}

/// [`encode_safetensors`] with header metadata (`{"format": "pt"}` for Hugging Face).
pub fn encode_safetensors_with(
    tensors: &[NamedTensor],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let view = safetensors::tensor::TensorView::new(
                Dtype::F32,
                t.shape.clone(),
                bytemuck::cast_slice(&t.values),
            )
            .map_err(|e| anyhow!("tensor {}: {e}", t.name))?;
            Ok((t.name.clone(), view))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, metadata).map_err(|e| anyhow!("cannot serialise tensors: {e}"))
}

/// Reads every tensor of a safetensors file as f32 (f16/bf16 are widened), in file order.
pub fn decode_safetensors(bytes: &[u8], path: &Path) -> Result<Vec<NamedTensor>> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let mut names: Vec<(usize, String)> = Vec::new();
    for (name, view) in file.tensors() {
        names.push((view.data().as_ptr() as usize, name));
    }
    names.sort();
    names
        .into_iter()
        .map(|(_, name)| {
            let view = file.tensor(&name).expect("listed tensor");
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
                other => bail!(
                    "{}: tensor {name} has unsupported dtype {other:?}",
                    path.display()
                ),
            };
            Ok(NamedTensor {
                name,
                shape: view.shape().to_vec(),
                values,
            })
        })
        .collect()
}

fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// What a checkpoint holds, before it is written or after it is read.
pub struct CheckpointData {
    pub step: u64,
    pub config_toml: String,
    pub model: Vec<NamedTensor>,
    pub optimizer: Vec<NamedTensor>,
    /// Training state (step, data cursor, seeds) as JSON.
    pub state_json: String,
    pub tokenizer_json: String,
    /// Further tensor files of a stage that trains more than one model (PPO's value model
    /// and its optimizer), by file name; read only with the optimizer state.
    pub extra: Vec<(String, Vec<NamedTensor>)>,
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint under `checkpoints_dir/step-NNNNNNNN` atomically and prunes old ones so
/// that `keep` remain. Returns the checkpoint's directory.
///
/// Weights holding NaN or infinity (a diverged run) are refused before anything is written
/// or pruned, so the newest good checkpoint always survives.
pub fn save(checkpoints_dir: &Path, data: &CheckpointData, keep: usize) -> Result<PathBuf> {
    let mut tensors = data.extra.iter().flat_map(|(_, t)| t).chain(&data.model);
    if let Some(bad) = tensors.find(|t| t.values.iter().any(|v| !v.is_finite())) {
        bail!(
            "training diverged by step {}: weight {} is not finite; its checkpoint was not written and the earlier ones are kept",
            data.step,
            bad.name
        );
    }
    std::fs::create_dir_all(checkpoints_dir)
        .map_err(|e| anyhow!("cannot create {}: {e}", checkpoints_dir.display()))?;
    remove_partials(checkpoints_dir);
    let final_dir = checkpoints_dir.join(step_dir_name(data.step));
    let tmp_dir = checkpoints_dir.join(format!(
        ".partial-{}-{}",
        step_dir_name(data.step),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::create_dir(&tmp_dir)
        .map_err(|e| anyhow!("cannot create {}: {e}", tmp_dir.display()))?;

    let write_all = || -> Result<()> {
        write_checkpoint_files(&tmp_dir, data)?;
        // Re-saving a step that exists (a resume that saves before taking a step) replaces it:
        // move the old one aside first, since a directory cannot be renamed onto another.
        let displaced = checkpoints_dir.join(format!(".replaced-{}", step_dir_name(data.step)));
        if final_dir.exists() {
            let _ = std::fs::remove_dir_all(&displaced);
            std::fs::rename(&final_dir, &displaced)?;
        }
        std::fs::rename(&tmp_dir, &final_dir)?;
        sync_dir(checkpoints_dir)?;
        let _ = std::fs::remove_dir_all(&displaced);
        Ok(())
    };
    if let Err(e) = write_all() {
        let _ = std::fs::remove_dir_all(&tmp_dir);
        return Err(e.context(format!("saving checkpoint {}", final_dir.display())));
    }
    for old in list(checkpoints_dir)?.into_iter().rev().skip(keep) {
        let _ = std::fs::remove_dir_all(old.1);
    }
    Ok(final_dir)
}

/// Writes the files of a checkpoint into the existing directory `dir`, one at a time (each
/// encoded, written and dropped before the next: a PPO checkpoint of a 135M model is six
/// files of 540 MB), the manifest with every other file's checksum last, then syncs `dir`.
fn write_checkpoint_files(dir: &Path, data: &CheckpointData) -> Result<()> {
    let mut entries = BTreeMap::new();
    let mut write = |name: &str, bytes: Vec<u8>| -> Result<()> {
        write_file(dir, name, &bytes)?;
        let entry = FileEntry {
            bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
        };
        entries.insert(name.to_string(), entry);
        Ok(())
    };
    write(MODEL_FILE, encode_safetensors(&data.model)?)?;
    write(OPTIMIZER_FILE, encode_safetensors(&data.optimizer)?)?;
    write(STATE_FILE, data.state_json.clone().into_bytes())?;
    write(TOKENIZER_FILE, data.tokenizer_json.clone().into_bytes())?;
    write(CONFIG_FILE, data.config_toml.clone().into_bytes())?;
    for (name, tensors) in &data.extra {
        write(name, encode_safetensors(tensors)?)?;
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        step: data.step,
        config: data.config_toml.clone(),
        files: entries,
    };
    let manifest = serde_json::to_string_pretty(&manifest)?.into_bytes();
    write_file(dir, MANIFEST_FILE, &manifest)?;
    sync_dir(dir).map_err(|e| anyhow!("cannot sync {}: {e}", dir.display()))
}

/// Writes and fsyncs one file into the existing directory `dir`.
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let mut f = File::create(&path).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

/// Writes and fsyncs each file into the existing directory `dir`, then the directory.
fn write_files(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    for (name, bytes) in files {
        write_file(dir, name, bytes)?;
    }
    sync_dir(dir).map_err(|e| anyhow!("cannot sync {}: {e}", dir.display()))
}

/// Creates the directory `dir` holding `files`, all at once: they are written to a temporary
/// directory beside it, which is renamed into place. `dir` must not exist, or be empty; a
/// failure leaves neither `dir` nor the temporary directory behind.
pub fn write_dir_atomic(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    write_dir_atomic_with(dir, |tmp| write_files(tmp, files))
}

/// [`write_dir_atomic`] with the files written into the temporary directory by `write`.
fn write_dir_atomic_with(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(false);
        if !empty {
            bail!(
                "{} exists and is not empty; kiln does not overwrite it",
                dir.display()
            );
        }
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .map_err(|e| anyhow!("cannot create {}: {e}", parent.display()))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| anyhow!("cannot create {}: {e}", tmp.display()))?;
    let finish = || -> Result<()> {
        write(&tmp)?;
        if dir.exists() {
            std::fs::remove_dir(dir)?;
        }
        std::fs::rename(&tmp, dir)?;
        sync_dir(&parent)?;
        Ok(())
    };
    finish().map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        anyhow!("cannot write {}: {e}", dir.display())
    })
}

/// Writes a checkpoint as the new directory `dir` (see [`write_dir_atomic`]): an imported
/// model, which belongs to no run.
pub fn save_to(dir: &Path, data: &CheckpointData) -> Result<()> {
    write_dir_atomic_with(dir, |tmp| write_checkpoint_files(tmp, data))
}

/// Removes temporary directories left by a process that died while writing a checkpoint
/// (one run writes to an output directory at a time).
fn remove_partials(checkpoints_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(".partial-"))
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Committed checkpoints in `checkpoints_dir`, oldest first.
pub fn list(checkpoints_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !checkpoints_dir.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    let entries = std::fs::read_dir(checkpoints_dir)
        .map_err(|e| anyhow!("cannot read {}: {e}", checkpoints_dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse().ok()) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// A checkpoint directory given by the user: a checkpoint itself, or a run directory (its
/// newest checkpoint), or a run's `checkpoints/` directory.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(MANIFEST_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    for dir in [path.join("checkpoints"), path.to_path_buf()] {
        if let Some((_, newest)) = list(&dir)?.pop() {
            return Ok(newest);
        }
    }
    if !path.exists() {
        bail!("checkpoint {} not found", path.display());
    }
    bail!(
        "{} holds no checkpoint ({MANIFEST_FILE} missing)",
        path.display()
    )
}

/// Reads and verifies a checkpoint: every file's size and checksum must match the manifest.
pub fn load(dir: &Path) -> Result<CheckpointData> {
    load_parts(dir, true)
}

/// [`load`] without the optimizer state (left empty, not read): what inference and `--init`
/// need.
pub fn load_weights(dir: &Path) -> Result<CheckpointData> {
    load_parts(dir, false)
}

fn load_parts(dir: &Path, with_optimizer: bool) -> Result<CheckpointData> {
    let manifest = read_manifest(dir)?;
    let mut contents: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (name, entry) in &manifest.files {
        let weights = [MODEL_FILE, STATE_FILE, TOKENIZER_FILE, CONFIG_FILE];
        if !with_optimizer && !weights.contains(&name.as_str()) {
            continue;
        }
        let path = dir.join(name);
        let bytes =
            std::fs::read(&path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        if bytes.len() as u64 != entry.bytes {
            bail!(
                "{}: truncated or altered ({} bytes, manifest says {})",
                path.display(),
                bytes.len(),
                entry.bytes
            );
        }
        if sha256_hex(&bytes) != entry.sha256 {
            bail!(
                "{}: corrupted (checksum does not match the manifest)",
                path.display()
            );
        }
        contents.insert(name.clone(), bytes);
    }
    let mut take = |name: &str| {
        contents.remove(name).ok_or_else(|| {
            anyhow!(
                "{}: manifest lists no {name}",
                dir.join(MANIFEST_FILE).display()
            )
        })
    };
    let text = |bytes: Vec<u8>, name: &str| {
        String::from_utf8(bytes).map_err(|_| anyhow!("{}: not UTF-8", dir.join(name).display()))
    };
    let model = decode_safetensors(&take(MODEL_FILE)?, &dir.join(MODEL_FILE))?;
    let optimizer = if with_optimizer {
        decode_safetensors(&take(OPTIMIZER_FILE)?, &dir.join(OPTIMIZER_FILE))?
    } else {
        Vec::new()
    };
    let state_json = text(take(STATE_FILE)?, STATE_FILE)?;
    let tokenizer_json = text(take(TOKENIZER_FILE)?, TOKENIZER_FILE)?;
    contents.remove(CONFIG_FILE);
    let extra = contents
        .into_iter()
        .map(|(name, bytes)| {
            let tensors = decode_safetensors(&bytes, &dir.join(&name))?;
            Ok((name, tensors))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CheckpointData {
        step: manifest.step,
        config_toml: manifest.config.clone(),
        model,
        optimizer,
        state_json,
        tokenizer_json,
        extra,
    })
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not a kiln manifest: {e}", path.display()))?;
    if manifest.format != FORMAT {
        bail!("{}: unknown format {:?}", path.display(), manifest.format);
    }
    Ok(manifest)
}

/// Puts `tensors` into `expected` order and checks each shape, naming the first mismatch.
pub fn match_shapes(
    tensors: Vec<NamedTensor>,
    expected: &[(String, Vec<usize>)],
    source: &Path,
) -> Result<Vec<NamedTensor>> {
    check_shapes(&tensors, expected, source)?;
    let mut by_name: BTreeMap<String, NamedTensor> =
        tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    Ok(expected
        .iter()
        .map(|(name, _)| by_name.remove(name).expect("checked"))
        .collect())
}

/// Fails, naming the first difference in `expected`'s order, unless `tensors` are exactly the
/// `expected` names and shapes.
pub fn check_shapes(
    tensors: &[NamedTensor],
    expected: &[(String, Vec<usize>)],
    source: &Path,
) -> Result<()> {
    let by_name: BTreeMap<&str, &NamedTensor> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for (name, shape) in expected {
        let t = by_name
            .get(name.as_str())
            .ok_or_else(|| anyhow!("{}: tensor {name} is missing", source.display()))?;
        if &t.shape != shape {
            bail!(
                "{}: tensor {name} has shape {:?}, the model expects {:?}",
                source.display(),
                t.shape,
                shape
            );
        }
    }
    let known: BTreeSet<&str> = expected.iter().map(|(name, _)| name.as_str()).collect();
    if let Some(extra) = by_name.keys().find(|name| !known.contains(*name)) {
        bail!("{}: unexpected tensor {extra}", source.display());
    }
    Ok(())
}

impl CheckpointData {
    /// The run's whole configuration, as the stage that wrote the checkpoint defines it.
    pub fn config<T: serde::de::DeserializeOwned>(&self, dir: &Path) -> Result<T> {
        toml::from_str(&self.config_toml).with_context(|| {
            format!(
                "{}: not a configuration of this stage",
                dir.join(MANIFEST_FILE).display()
            )
        })
    }

    /// The model's shape: the `[model]` section, which every stage's configuration has.
    pub fn model_config(&self, dir: &Path) -> Result<crate::config::ModelConfig> {
        #[derive(Deserialize)]
        struct ModelSection {
            model: crate::config::ModelConfig,
        }
        let context = || {
            format!(
                "{}: invalid [model] config",
                dir.join(MANIFEST_FILE).display()
            )
        };
        let table: toml::Table = toml::from_str(&self.config_toml).with_context(context)?;
        let section = table.get("model").cloned().ok_or_else(|| {
            anyhow!(
                "{}: config has no [model]",
                dir.join(MANIFEST_FILE).display()
            )
        })?;
        let mut only_model = toml::Table::new();
        only_model.insert("model".into(), section);
        let parsed: ModelSection = toml::Value::Table(only_model)
            .try_into()
            .with_context(context)?;
        Ok(parsed.model)
    }

    pub fn tokenizer(&self, dir: &Path) -> Result<crate::data::tokenizer::Tokenizer> {
        crate::data::tokenizer::Tokenizer::from_json(&self.tokenizer_json)
            .with_context(|| dir.join(TOKENIZER_FILE).display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(step: u64) -> CheckpointData {
        CheckpointData {
            step,
            config_toml: "x = 1\n".into(),
            model: vec![NamedTensor {
                name: "w".into(),
                shape: vec![2, 3],
                values: vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE, 0.0, 7.0],
            }],
            optimizer: vec![],
            state_json: "{}".into(),
            tokenizer_json: "{}".into(),
            extra: vec![],
        }
    }

    #[test]
    fn round_trip_prune_and_detect_corruption() {
        let dir = tempfile::tempdir().unwrap();
        // What a process killed mid-write leaves behind is ignored, then cleaned up.
        let stale = dir.path().join(".partial-step-00000009-1");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join(MODEL_FILE), b"half").unwrap();
        assert!(list(dir.path()).unwrap().is_empty());
        for step in [1, 2, 3] {
            save(dir.path(), &sample(step), 2).unwrap();
        }
        assert!(!stale.exists());
        let steps: Vec<u64> = list(dir.path()).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(steps, vec![2, 3]);
        let newest = resolve(dir.path()).unwrap();
        let back = load(&newest).unwrap();
        assert_eq!(back.step, 3);
        assert_eq!(back.model, sample(3).model);

        // Flip one byte of the model: the checksum names the file.
        let model = newest.join(MODEL_FILE);
        let mut bytes = std::fs::read(&model).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&model, &bytes).unwrap();
        let e = load(&newest).err().unwrap().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("corrupted"),
            "{e}"
        );
        // Truncate it.
        std::fs::write(&model, &bytes[..10]).unwrap();
        let e = load(&newest).err().unwrap().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn half_precision_is_widened() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}
