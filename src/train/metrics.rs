//! `OUT/metrics.jsonl`: one JSON object per optimizer step and per evaluation (PPO: per
//! iteration and per evaluation, its own records).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A metrics record, and the step (or iteration) it belongs to: a resumed run drops the
/// records after its checkpoint.
pub trait Stepped: Serialize + DeserializeOwned {
    fn step(&self) -> u64;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    Step {
        step: u64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_s: f64,
        elapsed_s: f64,
    },
    Eval {
        step: u64,
        val_loss: f64,
        val_perplexity: f64,
    },
}

impl Stepped for Record {
    fn step(&self) -> u64 {
        match self {
            Record::Step { step, .. } | Record::Eval { step, .. } => *step,
        }
    }
}

pub struct MetricsLog<R = Record> {
    path: PathBuf,
    file: File,
    records: std::marker::PhantomData<R>,
}

impl<R: Stepped> MetricsLog<R> {
    /// Opens `OUT/metrics.jsonl` for appending. On resume, records of steps after the resumed
    /// checkpoint (written by the interrupted run) are dropped so the log reads as one run.
    pub fn open(out_dir: &Path, resumed_step: Option<u64>) -> Result<Self> {
        let path = out_dir.join("metrics.jsonl");
        if let Some(resumed) = resumed_step
            && path.exists()
        {
            let kept: Vec<R> = read_records(&path)?
                .into_iter()
                .filter(|r: &R| r.step() <= resumed)
                .collect();
            crate::interop::checkpoint::write_jsonl_atomic(&path, &kept)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| anyhow!("cannot open {}: {e}", path.display()))?;
        Ok(Self {
            path,
            file,
            records: std::marker::PhantomData,
        })
    }

    pub fn write(&mut self, record: &R) -> Result<()> {
        let line = serde_json::to_string(record)?;
        writeln!(self.file, "{line}")
            .map_err(|e| anyhow!("cannot write {}: {e}", self.path.display()))
    }
}

/// Reads a metrics file; a torn last line (a run killed mid-write) is skipped.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    read_records(path)
}

/// [`read`] for any kind of record.
pub fn read_records<R: DeserializeOwned>(path: &Path) -> Result<Vec<R>> {
    let file = File::open(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<std::io::Result<_>>()
        .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => records.push(r),
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => return Err(anyhow!("{}:{}: {e}", path.display(), i + 1)),
        }
    }
    Ok(records)
}
